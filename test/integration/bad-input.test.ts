/**
 * Bad input through a real server with a raw grpc-js stub (so that requests the typed client
 * would never build can be sent): each gets its precise status and leaves every module as it was.
 */
import { credentials, Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import type { BatchNormServiceClient } from '../../src/generated/normserve/v1/BatchNormService.js';
import { grpcObject, RpcStatus, ErrorInfo, BadRequest } from '../../src/wire/proto.js';
import { startTestServer, type TestServer } from '../support/server.js';

let server: TestServer;
let stub: BatchNormServiceClient;
let client: NormserveClient;

function call<T = unknown>(method: string, request: object): Promise<T> {
  return new Promise((resolve, reject) => {
    (stub as unknown as Record<string, Function>)[method]!.call(stub, request, (err: ServiceError | null, res: T) => (err ? reject(err) : resolve(res)));
  });
}

async function rejection(method: string, request: object): Promise<ServiceError> {
  try {
    await call(method, request);
  } catch (err) {
    return err as ServiceError;
  }
  throw new Error(`${method} succeeded but should have failed`);
}

const f32 = (values: number[]) => Buffer.from(new Float32Array(values).buffer);
const tensor = (shape: (number | string)[], data: Buffer, dtype: string | number = 'FLOAT32') => ({ shape: shape.map(String), dtype, data });

/** The module's whole observable state, to show a failed call changed nothing. */
async function fingerprint(name: string) {
  return { module: await client.getModule(name), state: await client.getState(name) };
}

beforeAll(async () => {
  server = await startTestServer({ maxTensorElements: 1000, maxModules: 50, maxMessageBytes: 64 * 1024 });
  stub = new grpcObject.normserve.v1.BatchNormService(server.address, credentials.createInsecure());
  client = new NormserveClient(server.address);
});
afterAll(async () => {
  stub?.close();
  client?.close();
  await server?.stop();
});

beforeEach(async () => {
  for (const m of (await client.listModules(1000)).modules) await client.deleteModule(m.name);
  await client.createModule('bn', { kind: 'BATCH_NORM_2D', numFeatures: 3 });
  // Move the state away from its defaults, so that an accidental reset would show.
  await client.forward('bn', { shape: [2, 3, 2, 2], data: new Float32Array(24).map((_, i) => (i * 7) % 5) });
});

describe('names', () => {
  it('NOT_FOUND for an unknown module, on every method', async () => {
    for (const method of ['GetModule', 'DeleteModule', 'UpdateModule', 'ResetRunningStats', 'ResetParameters', 'GetState', 'LoadState', 'Forward']) {
      const err = await rejection(method, { name: 'nope', input: tensor([2, 3], f32([1, 2, 3, 4, 5, 6])) });
      expect(err.code, method).toBe(status.NOT_FOUND);
      expect(err.details).toBe("module 'nope' not found");
    }
  });

  it('ALREADY_EXISTS for a duplicate name, and the module is untouched', async () => {
    const before = await fingerprint('bn');
    const err = await rejection('CreateModule', { name: 'bn', config: { kind: 'BATCH_NORM_1D', num_features: '9' } });
    expect(err.code).toBe(status.ALREADY_EXISTS);
    expect(await fingerprint('bn')).toEqual(before);
  });

  it.each(['', ' bn', 'a b', '.hidden', 'x'.repeat(257), 'tab\there', 'ünïcode', 'semi;colon'])('INVALID_ARGUMENT for the name %j', async (name) => {
    const err = await rejection('CreateModule', { name, config: { kind: 'BATCH_NORM_2D', num_features: '3' } });
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(err.details).toMatch(/^invalid module name/);
    expect((await rejection('GetModule', { name })).code).toBe(status.INVALID_ARGUMENT);
  });

  it('accepts the names a model uses', async () => {
    for (const name of ['tenant-a/resnet50/layer1.0.bn1', 'x', '_', 'a:b', 'x'.repeat(256)]) {
      await client.createModule(name, { kind: 'BATCH_NORM_1D', numFeatures: 2 });
      expect((await client.getModule(name)).name).toBe(name);
    }
  });
});

describe('configs', () => {
  it.each([
    [{ kind: 'BATCH_NORM_2D', num_features: '0' }, /num_features must be between 1/],
    [{ kind: 'BATCH_NORM_2D', num_features: '-4' }, /num_features must be between 1/],
    [{ kind: 'BATCH_NORM_2D', num_features: '9223372036854775807' }, /num_features must be between 1/],
    [{ kind: 'MODULE_KIND_UNSPECIFIED', num_features: '3' }, /kind must be one of/],
    [{ kind: 99, num_features: '3' }, /kind must be one of .* got 99/],
    [{ kind: 'BATCH_NORM_2D', num_features: '3', eps: -1 }, /eps must be a finite number >= 0/],
    [{ kind: 'BATCH_NORM_2D', num_features: '3', eps: Number.NaN }, /eps must be a finite number/],
    [{ kind: 'BATCH_NORM_2D', num_features: '3', momentum: Number.POSITIVE_INFINITY }, /momentum must be a finite number/],
    [{ kind: 'BATCH_NORM_2D', num_features: '3', momentum: 0.1, cumulative_average: true }, /momentum must be unset/],
  ])('INVALID_ARGUMENT for %j', async (config, message) => {
    const err = await rejection('CreateModule', { name: 'new', config });
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(err.details).toMatch(message);
    expect((await rejection('GetModule', { name: 'new' })).code).toBe(status.NOT_FOUND);
  });

  it('INVALID_ARGUMENT for a missing config', async () => {
    expect((await rejection('CreateModule', { name: 'new' })).code).toBe(status.INVALID_ARGUMENT);
  });

  it('RESOURCE_EXHAUSTED past max_modules, naming the limit', async () => {
    for (let i = 1; i < 50; i++) await client.createModule(`m${i}`, { kind: 'BATCH_NORM_1D', numFeatures: 1 });
    const err = await rejection('CreateModule', { name: 'one-too-many', config: { kind: 'BATCH_NORM_1D', num_features: '1' } });
    expect(err.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(err.details).toMatch(/max_modules=50/);
  });
});

describe('tensors', () => {
  const cases: [string, object, number, RegExp][] = [
    ['a missing input', {}, status.INVALID_ARGUMENT, /the tensor is missing/],
    ['an unset dtype', { input: tensor([2, 3], f32([1, 2, 3, 4, 5, 6]), 'DTYPE_UNSPECIFIED') }, status.INVALID_ARGUMENT, /dtype is unset/],
    ['an unknown dtype', { input: tensor([2, 3], f32([1, 2, 3, 4, 5, 6]), 42) }, status.INVALID_ARGUMENT, /unknown dtype 42/],
    ['FLOAT64 input to a float32 module', { input: tensor([2, 3, 1, 1], Buffer.alloc(48), 'FLOAT64') }, status.INVALID_ARGUMENT, /input has dtype FLOAT64; this call takes FLOAT32/],
    ['FLOAT16 input', { input: tensor([2, 3, 1, 1], Buffer.alloc(12), 'FLOAT16') }, status.INVALID_ARGUMENT, /dtype FLOAT16/],
    ['too few bytes', { input: tensor([2, 3, 1, 1], f32([1, 2, 3, 4, 5])) }, status.INVALID_ARGUMENT, /data has 20 bytes, but shape \[2, 3, 1, 1\] of FLOAT32 needs 24/],
    ['too many bytes', { input: tensor([2, 3, 1, 1], f32([1, 2, 3, 4, 5, 6, 7])) }, status.INVALID_ARGUMENT, /needs 24/],
    ['bytes not a multiple of 4', { input: tensor([2, 3, 1, 1], Buffer.alloc(23)) }, status.INVALID_ARGUMENT, /data has 23 bytes/],
    ['a negative dimension', { input: tensor([2, -3, 1, 1], f32([])) }, status.INVALID_ARGUMENT, /dimension 1 is -3/],
    ['a dimension over 2^53', { input: tensor([0, '9007199254740993', 1, 1], f32([])) }, status.INVALID_ARGUMENT, /over 2\^53/],
    ['a product that overflows int64', { input: tensor(['4294967296', '4294967296', '4294967296', 1], f32([])) }, status.RESOURCE_EXHAUSTED, /max_tensor_elements=1000/],
    ['too many elements', { input: tensor([2, 3, 20, 20], Buffer.alloc(9600)) }, status.RESOURCE_EXHAUSTED, /input has 2400 elements, over the limit max_tensor_elements=1000/],
    ['a rank over 64', { input: tensor(new Array(65).fill(1), f32([1])) }, status.INVALID_ARGUMENT, /rank 65 is over the maximum of 64/],
  ];
  it.each(cases)('%s', async (_, request, code, message) => {
    const before = await fingerprint('bn');
    const err = await rejection('Forward', { name: 'bn', ...request });
    expect(err.code).toBe(code);
    expect(err.details).toMatch(message);
    expect(await fingerprint('bn')).toEqual(before);
  });

  it('a message over max_message_bytes: RESOURCE_EXHAUSTED from grpc-js, state untouched', async () => {
    const before = await fingerprint('bn');
    const err = await rejection('Forward', { name: 'bn', input: tensor([2, 3, 100, 100], Buffer.alloc(240_000)) });
    expect(err.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(err.details).toMatch(/larger than max/);
    expect(await fingerprint('bn')).toEqual(before);
  });

  it('a channel count that disagrees with the module: PyTorch\'s RuntimeError, and the counter moves as in PyTorch', async () => {
    const before = await fingerprint('bn');
    const err = await rejection('Forward', { name: 'bn', input: tensor([2, 4, 1, 1], f32([1, 2, 3, 4, 5, 6, 7, 8])) });
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(err.details).toBe('running_mean should contain 4 elements not 3');
    const after = await fingerprint('bn');
    expect(after.state).toEqual({ ...before.state, num_batches_tracked: before.state.num_batches_tracked! + 1n });
  });

  it('the wrong rank: ValueError, nothing changes', async () => {
    const before = await fingerprint('bn');
    const err = await rejection('Forward', { name: 'bn', input: tensor([2, 3], f32([1, 2, 3, 4, 5, 6])) });
    expect(err.details).toBe('expected 4D input (got 2D input)');
    expect(await fingerprint('bn')).toEqual(before);
  });

  it('carries the reason, the Python type and the field in the status details', async () => {
    const err = await rejection('Forward', { name: 'bn', input: tensor([2, 3], f32([1, 2, 3, 4, 5, 6])) });
    expect(err.metadata.get('normserve-error-reason')).toEqual(['BN_ERR_INPUT_RANK']);
    expect(err.metadata.get('normserve-python-type')).toEqual(['ValueError']);
    const details = RpcStatus.toObject(RpcStatus.decode(err.metadata.get('grpc-status-details-bin')[0] as Buffer)) as {
      code: number;
      message: string;
      details: { type_url: string; value: Uint8Array }[];
    };
    expect(details.code).toBe(status.INVALID_ARGUMENT);
    expect(details.message).toBe('expected 4D input (got 2D input)');
    const info = ErrorInfo.toObject(ErrorInfo.decode(details.details[0]!.value));
    expect(info).toEqual({ reason: 'BN_ERR_INPUT_RANK', domain: 'normserve.dev', metadata: { python_type: 'ValueError' } });

    const bad = await rejection('Forward', { name: 'bn', input: tensor([2, 3, 1, 1], f32([1])) });
    const badDetails = RpcStatus.toObject(RpcStatus.decode(bad.metadata.get('grpc-status-details-bin')[0] as Buffer)) as {
      details: { type_url: string; value: Uint8Array }[];
    };
    const violation = badDetails.details.find((d) => d.type_url.endsWith('BadRequest'))!;
    expect(BadRequest.toObject(BadRequest.decode(violation.value))).toMatchObject({ field_violations: [{ field: 'input' }] });
  });

  it('decodes tensors whose bytes sit at an odd offset in the received buffer', async () => {
    // A 3-byte name pushes the bytes field off 4-byte alignment in the serialized message.
    await client.createModule('odd', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    await client.eval('odd');
    const out = await client.forward('odd', { shape: [3, 2], data: Float32Array.of(1, 2, 3, 4, 5, 6) });
    const invstd = 1 / Math.sqrt(1 + 1e-5);
    expect(Array.from(out.data)).toEqual([1, 2, 3, 4, 5, 6].map((v) => Math.fround(v * invstd)));
  });
});

describe('Forward with weight and bias', () => {
  const x = () => tensor([2, 3, 2, 2], f32(Array.from({ length: 24 }, (_, i) => ((i * 5) % 7) - 3)));
  const w = f32([0.5, -2, 3]);
  const b = f32([1, 0.25, -4]);

  it('equals LoadState(strict=false) then Forward, committed as one change', async () => {
    await client.createModule('twin', { kind: 'BATCH_NORM_2D', numFeatures: 3 });
    await client.forward('twin', { shape: [2, 3, 2, 2], data: new Float32Array(24).map((_, i) => (i * 7) % 5) });
    await client.loadState('twin', { weight: new Float32Array(w.buffer, w.byteOffset, 3), bias: new Float32Array(b.buffer, b.byteOffset, 3) }, { strict: false });
    const apart = await call<{ output: { data: Buffer } }>('Forward', { name: 'twin', input: x() });
    const together = await call<{ output: { data: Buffer } }>('Forward', { name: 'bn', input: x(), weight: tensor([3], w), bias: tensor([3], b) });
    expect(Buffer.from(together.output.data)).toEqual(Buffer.from(apart.output.data));
    expect(await client.getState('bn')).toEqual(await client.getState('twin'));
    // The typed client sends them the same way.
    await client.forward('bn', { shape: [2, 3, 2, 2], data: new Float32Array(24).fill(1) }, { parameters: { weight: Float32Array.of(7, 8, 9), bias: Float32Array.of(0, 0, 1) } });
    expect(Array.from((await client.getState('bn')).weight!)).toEqual([7, 8, 9]);
  });

  const refusals: [string, object, RegExp][] = [
    ['only a weight', { weight: tensor([3], w) }, /^Forward's weight and bias come together: the request has only weight; nothing was changed$/],
    ['only a bias', { bias: tensor([3], b) }, /the request has only bias/],
    ['a weight of the wrong size', { weight: tensor([4], f32([1, 2, 3, 4])), bias: tensor([3], b) }, /size mismatch for weight: copying a param with shape torch.Size\(\[4\]\) from checkpoint, the shape in current model is torch.Size\(\[3\]\)/],
    ['a bias with too few bytes', { weight: tensor([3], w), bias: tensor([3], f32([1])) }, /invalid tensor bias: data has 4 bytes/],
    ['a float16 weight', { weight: tensor([3], Buffer.alloc(6), 'FLOAT16'), bias: tensor([3], b) }, /^weight has dtype FLOAT16; this call takes FLOAT32/],
    ['a good pair with an input of the wrong rank', { input: tensor([2, 3], f32([1, 2, 3, 4, 5, 6])), weight: tensor([3], w), bias: tensor([3], b) }, /^expected 4D input \(got 2D input\)$/],
  ];
  it.each(refusals)('INVALID_ARGUMENT for %s, and the parameters stay as they were', async (_, parameters, message) => {
    const before = await fingerprint('bn');
    const err = await rejection('Forward', { name: 'bn', input: x(), ...parameters });
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(err.details).toMatch(message);
    expect(await fingerprint('bn')).toEqual(before);
  });

  it('a channel mismatch counts the batch as PyTorch does, but keeps the old parameters', async () => {
    const before = await fingerprint('bn');
    const err = await rejection('Forward', { name: 'bn', input: tensor([2, 4, 1, 1], f32([1, 2, 3, 4, 5, 6, 7, 8])), weight: tensor([3], w), bias: tensor([3], b) });
    expect(err.details).toBe('running_mean should contain 4 elements not 3');
    expect((await fingerprint('bn')).state).toEqual({ ...before.state, num_batches_tracked: before.state.num_batches_tracked! + 1n });
  });

  it('INVALID_ARGUMENT for parameters sent to a module without them (affine=False)', async () => {
    await client.createModule('plain', { kind: 'BATCH_NORM_2D', numFeatures: 3, affine: false });
    const before = await fingerprint('plain');
    const err = await rejection('Forward', { name: 'plain', input: x(), weight: tensor([3], w), bias: tensor([3], b) });
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(err.details).toBe("Forward's weight and bias are for an affine module, and module 'plain' has affine=False; nothing was changed");
    expect(await fingerprint('plain')).toEqual(before);
  });
});

describe('updates and state', () => {
  it('INVALID_ARGUMENT for contradictory or bad updates, nothing changes', async () => {
    const before = await fingerprint('bn');
    for (const [request, message] of [
      [{ momentum: 0.2, cumulative_average: true }, /either momentum or cumulative_average/],
      [{ cumulative_average: false }, /needs a momentum/],
      [{ eps: -1 }, /eps must be a finite number >= 0/],
      [{ momentum: Number.NaN }, /momentum must be a finite number/],
      [{ training: false, clear_buffers: [7] }, /unknown buffer 7/],
      [{ training: false, eps: Number.POSITIVE_INFINITY }, /eps/],
    ] as const) {
      const err = await rejection('UpdateModule', { name: 'bn', ...request });
      expect(err.code).toBe(status.INVALID_ARGUMENT);
      expect(err.details).toMatch(message);
    }
    expect(await fingerprint('bn')).toEqual(before);
  });

  it('LoadState refuses bad tensors before touching anything', async () => {
    const before = await fingerprint('bn');
    const err = await rejection('LoadState', {
      name: 'bn',
      state: { weight: tensor([3], f32([1, 1, 1])), bias: tensor([3], f32([1, 2])), version: 2 },
      strict: false,
    });
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(err.details).toMatch(/invalid tensor state.bias/);
    expect(await fingerprint('bn')).toEqual(before);
  });

  it('LoadState is all or nothing where PyTorch copies part of the dict before raising', async () => {
    const before = await fingerprint('bn');
    const err = await rejection('LoadState', {
      name: 'bn',
      state: { weight: tensor([3], f32([5, 5, 5])), bias: tensor([4], f32([1, 2, 3, 4])), version: 2 },
      strict: false,
    });
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(err.details).toBe(
      'Error(s) in loading state_dict for BatchNorm2d:\n\tsize mismatch for bias: copying a param with shape torch.Size([4]) from checkpoint, the shape in current model is torch.Size([3]).',
    );
    expect(await fingerprint('bn')).toEqual(before);
  });

  it('LoadState takes FLOAT64 tensors and converts them, as copy_ does', async () => {
    const weight = Buffer.from(new Float64Array([0.5, 0.25, 2]).buffer);
    await call('LoadState', { name: 'bn', state: { weight: tensor([3], weight, 'FLOAT64'), version: 2 }, strict: false });
    expect(Array.from((await client.getState('bn')).weight!)).toEqual([0.5, 0.25, 2]);
  });

  it('ListModules refuses a page token it did not issue', async () => {
    const err = await rejection('ListModules', { page_size: 1, page_token: 'not a token!' });
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(err.details).toMatch(/page_token .* was not issued by ListModules/);
  });
});

describe('the server stays up', () => {
  it('after all of the above, and answers a call with large metadata', async () => {
    const metadata = new Metadata();
    metadata.set('x-large', 'v'.repeat(4000));
    await new Promise<void>((resolve, reject) =>
      stub.GetModule({ name: 'bn' }, metadata, (err) => (err ? reject(err) : resolve())),
    );
    expect((await client.getModule('bn')).name).toBe('bn');
  });
});
