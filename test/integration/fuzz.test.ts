/**
 * Bad input at scale: fast-check throws malformed and hostile requests at a real server through a
 * raw grpc-js stub: random shapes and byte lengths, NaN and infinities, huge, negative and
 * overflowing dimensions, unknown enum values, odd names. For every request an oracle that knows
 * the documented rules says which status must come back; afterwards the server is still up and no
 * existing module's state has changed. Seeded, so a failure reproduces.
 */
import { credentials, status, type ServiceError } from '@grpc/grpc-js';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import type { BatchNormServiceClient } from '../../src/generated/normserve/v1/BatchNormService.js';
import { grpcObject } from '../../src/wire/proto.js';
import { startTestServer, type TestServer } from '../support/server.js';

const SEED = 4534;
const MAX_ELEMENTS = 4096;
const MAX_MESSAGE = 64 * 1024;
const NAME = /^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,255}$/;

let server: TestServer;
let stub: BatchNormServiceClient;
let client: NormserveClient;
const ran: Record<string, number> = {};

/** Modules in eval mode with buffers: a request that succeeds on them changes nothing either. */
const MODULES = {
  'fz/bn2d': { kind: 'BATCH_NORM_2D' as const, channels: 3, ranks: [4] },
  'fz/bn1d': { kind: 'BATCH_NORM_1D' as const, channels: 4, ranks: [2, 3] },
  'fz/sync': { kind: 'SYNC_BATCH_NORM' as const, channels: 2, ranks: [2, 3, 4, 5, 6, 7] },
};
type ModuleName = keyof typeof MODULES;

async function fingerprint() {
  return Promise.all(Object.keys(MODULES).map(async (n) => [await client.getModule(n), await client.getState(n)]));
}

function call(method: string, request: object): Promise<number> {
  return new Promise((resolve) => {
    (stub as unknown as Record<string, Function>)[method]!.call(stub, request, { deadline: Date.now() + 10_000 }, (err: ServiceError | null) =>
      resolve(err ? err.code : status.OK),
    );
  });
}

beforeAll(async () => {
  server = await startTestServer({ maxTensorElements: MAX_ELEMENTS, maxMessageBytes: MAX_MESSAGE, maxModules: 1000 });
  stub = new grpcObject.normserve.v1.BatchNormService(server.address, credentials.createInsecure());
  client = new NormserveClient(server.address);
  for (const [name, m] of Object.entries(MODULES)) {
    await client.createModule(name, { kind: m.kind, numFeatures: m.channels });
    await client.loadState(name, { running_mean: Float32Array.from({ length: m.channels }, (_, i) => i / 3), running_var: new Float32Array(m.channels).fill(2), num_batches_tracked: 5n }, { strict: false });
    await client.eval(name);
  }
});
afterAll(async () => {
  stub?.close();
  client?.close();
  await server?.stop();
  const total = Object.values(ran).reduce((a, b) => a + b, 0);
  process.stdout.write(`[fuzz] ${total} hostile requests: ${JSON.stringify(ran)}\n`);
});

// Dimensions: mostly small, sometimes 0, negative, past 2^53 or past int64 products.
const dim = fc.oneof(
  { weight: 8, arbitrary: fc.integer({ min: 0, max: 6 }).map(String) },
  { weight: 1, arbitrary: fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n }).map(String) },
  { weight: 1, arbitrary: fc.constantFrom('9007199254740993', '4294967296', '-1', '0') },
);
// Shapes that fit one of the modules (so that valid requests, NaN and infinities included, get through).
const fitting = fc.constantFrom<string[]>(['4', '3', '2', '2'], ['1', '3', '5', '5'], ['0', '3', '2', '2'], ['2', '4'], ['3', '4', '5'], ['1', '4'], ['2', '2', '3', '1', '1'], ['5', '2']);
const shape = fc.oneof(
  { weight: 5, arbitrary: fc.array(dim, { maxLength: 7 }) },
  { weight: 4, arbitrary: fitting },
  { weight: 1, arbitrary: fc.array(dim, { minLength: 65, maxLength: 70 }) },
);
const dtype = fc.oneof(
  { weight: 6, arbitrary: fc.constant<string | number>('FLOAT32') },
  { weight: 1, arbitrary: fc.constantFrom<string | number>('FLOAT64', 'FLOAT16', 'BFLOAT16', 'DTYPE_UNSPECIFIED') },
  { weight: 1, arbitrary: fc.integer({ min: -3, max: 1000 }) },
);
const hostileFloat = fc.oneof(fc.float(), fc.constantFrom(Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, -0, 3.4e38, 1e-45));
const name = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom(...(Object.keys(MODULES) as ModuleName[])) },
  { weight: 1, arbitrary: fc.string({ maxLength: 300, unit: 'binary' }) },
  { weight: 1, arbitrary: fc.constantFrom('', ' ', 'fz/missing', 'x'.repeat(257), '../etc', 'a\u0000b', '🤖', 'fz/bn2d ') },
);

/** Elements of a shape, or null when a dimension is negative or not a safe integer. */
function elements(dims: string[]): bigint | null {
  let n = 1n;
  for (const d of dims) {
    const v = BigInt(d);
    if (v < 0n || v > BigInt(Number.MAX_SAFE_INTEGER)) return null;
    n *= v;
  }
  return n;
}

const tensor = fc
  .record({ shape, dtype, exact: fc.constantFrom(true, true, true, false), extra: fc.integer({ min: -9, max: 9 }) })
  .chain(({ shape: dims, dtype: dt, exact, extra }) => {
    const n = elements(dims);
    const count = n !== null && n <= 2048n ? Number(n) : fc.sample(fc.integer({ min: 0, max: 64 }), 1)[0]!;
    const width = dt === 'FLOAT64' ? 8 : dt === 'FLOAT16' || dt === 'BFLOAT16' ? 2 : 4;
    const bytes = Math.max(0, count * width + (exact ? 0 : extra));
    return fc.array(hostileFloat, { minLength: Math.ceil(bytes / 4), maxLength: Math.ceil(bytes / 4) }).map((values) => {
      const data = Buffer.from(new Float32Array(values).buffer).subarray(0, bytes);
      return { shape: dims, dtype: dt, data };
    });
  });

/** The status the documented rules give a Forward; null when grpc-js may refuse the message itself. */
function expectedForward(n: string, t: { shape: string[]; dtype: string | number; data: Buffer } | undefined): number | null {
  if (!NAME.test(n)) return status.INVALID_ARGUMENT;
  const m = MODULES[n as ModuleName];
  if (!m) return status.NOT_FOUND;
  if (t === undefined) return status.INVALID_ARGUMENT;
  if (t.dtype !== 'FLOAT32') return status.INVALID_ARGUMENT;
  if (t.shape.length > 64) return status.INVALID_ARGUMENT;
  const count = elements(t.shape);
  if (count === null) return status.INVALID_ARGUMENT;
  if (count > BigInt(MAX_ELEMENTS)) return status.RESOURCE_EXHAUSTED;
  if (BigInt(t.data.length) !== count * 4n) return status.INVALID_ARGUMENT;
  const dims = t.shape.map(Number);
  if (!m.ranks.includes(dims.length)) return status.INVALID_ARGUMENT;
  if (m.kind === 'SYNC_BATCH_NORM' && dims[1] === 0) return status.INVALID_ARGUMENT;
  if (count === 0n) return status.OK;
  if (dims[1] !== m.channels) return status.INVALID_ARGUMENT;
  return status.OK;
}

describe('hostile requests', () => {
  it('Forward: each gets the status the rules say, and nothing changes', async () => {
    const before = await fingerprint();
    await fc.assert(
      fc.asyncProperty(name, fc.option(tensor, { nil: undefined, freq: 20 }), async (n, t) => {
        ran.Forward = (ran.Forward ?? 0) + 1;
        const code = await call('Forward', t === undefined ? { name: n } : { name: n, input: t });
        const expected = expectedForward(n, t);
        if (t && t.data.length + t.shape.length * 11 + n.length > MAX_MESSAGE - 64) expect([expected, status.RESOURCE_EXHAUSTED]).toContain(code);
        else expect(code).toBe(expected);
      }),
      { seed: SEED, numRuns: 1500 },
    );
    expect(await fingerprint()).toEqual(before);
  });

  it('CreateModule with odd names and configs: created exactly when valid', async () => {
    const kinds = fc.constantFrom<string | number>('BATCH_NORM_1D', 'BATCH_NORM_2D', 'BATCH_NORM_3D', 'SYNC_BATCH_NORM', 'MODULE_KIND_UNSPECIFIED', 7, -1);
    const config = fc.record(
      {
        kind: kinds,
        num_features: fc.oneof(
          { weight: 4, arbitrary: fc.integer({ min: -5, max: 70 }).map(String) },
          { weight: 1, arbitrary: fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n }).map(String) },
        ),
        eps: fc.oneof(fc.double({ min: 0, max: 1, noNaN: true }), hostileFloat),
        momentum: fc.oneof(fc.double({ min: -1, max: 2, noNaN: true }), hostileFloat),
        cumulative_average: fc.boolean(),
        world_size: fc.integer({ min: -2, max: 5000 }),
      },
      { requiredKeys: ['kind', 'num_features'] },
    );
    const freshName = fc.stringMatching(/^[a-z][a-z0-9_.:/-]{0,30}$/).map((n) => `new/${n}`);
    const before = await fingerprint();
    let created = 0;
    await fc.assert(
      fc.asyncProperty(fc.oneof(name, freshName), config, async (n, c) => {
        ran.CreateModule = (ran.CreateModule ?? 0) + 1;
        const code = await call('CreateModule', { name: n, config: c });
        const features = BigInt(c.num_features);
        const sync = c.kind === 'SYNC_BATCH_NORM';
        const valid =
          typeof c.kind === 'string' &&
          c.kind !== 'MODULE_KIND_UNSPECIFIED' &&
          features >= 1n &&
          features <= 1048576n &&
          !(c.cumulative_average && c.momentum !== undefined) &&
          (c.eps === undefined || (Number.isFinite(c.eps) && c.eps >= 0)) &&
          (c.momentum === undefined || c.cumulative_average || Number.isFinite(c.momentum)) &&
          (c.world_size === undefined || c.world_size === 0 || (sync ? c.world_size >= 1 && c.world_size <= 4096 : c.world_size === 1));
        if (!NAME.test(n)) expect(code).toBe(status.INVALID_ARGUMENT);
        else if (n in MODULES) expect([status.ALREADY_EXISTS, status.INVALID_ARGUMENT]).toContain(code);
        else if (!valid) expect(code).toBe(status.INVALID_ARGUMENT);
        else {
          expect([status.OK, status.ALREADY_EXISTS]).toContain(code);
          if (code === status.OK) {
            created++;
            expect(await call('DeleteModule', { name: n })).toBe(status.OK);
          }
        }
      }),
      { seed: SEED + 1, numRuns: 600 },
    );
    expect(created).toBeGreaterThan(10);
    expect(await fingerprint()).toEqual(before);
  });

  it('LoadState with malformed tensors and UpdateModule with bad values: refused, nothing changes', async () => {
    const before = await fingerprint();
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...(Object.keys(MODULES) as ModuleName[])),
        tensor,
        fc.record({ eps: hostileFloat, momentum: hostileFloat, cumulative_average: fc.boolean(), clear_buffers: fc.array(fc.integer({ min: 4, max: 99 }), { minLength: 1, maxLength: 3 }) }, { requiredKeys: [] }),
        async (n, t, update) => {
          ran.LoadState = (ran.LoadState ?? 0) + 1;
          // Every field's tensor is the same malformed one unless it happens to be a valid vector.
          const code = await call('LoadState', { name: n, state: { running_mean: t, version: 2 }, strict: true });
          // A strict load of only running_mean misses keys: refused whatever the tensor.
          expect([status.INVALID_ARGUMENT, status.RESOURCE_EXHAUSTED]).toContain(code);
          ran.UpdateModule = (ran.UpdateModule ?? 0) + 1;
          const bad = { name: n, ...update, clear_buffers: update.clear_buffers ?? [42], eps: Number.NaN };
          expect(await call('UpdateModule', bad)).toBe(status.INVALID_ARGUMENT);
        },
      ),
      { seed: SEED + 2, numRuns: 500 },
    );
    expect(await fingerprint()).toEqual(before);
  });

  it('leaves the server up and serving', async () => {
    expect(await client.health()).toBe('SERVING');
    expect((await client.listModules()).modules.map((m) => m.name).sort()).toEqual(Object.keys(MODULES).sort());
  });
});
