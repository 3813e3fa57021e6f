/** The service as a whole, through a real server: lifecycle, listing, concurrency, health, reflection, logs. */
import { credentials, loadPackageDefinition, type GrpcObject, type ServiceClientConstructor } from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient, NormserveClientError } from '../../src/client/client.js';
import { Status } from '../../src/errors.js';
import { channelData } from '../support/data.js';
import { capturedLogger } from '../support/log-capture.js';
import { startTestServer, type TestServer } from '../support/server.js';

let server: TestServer;
let client: NormserveClient;
let logLines: Record<string, unknown>[] = [];

beforeAll(async () => {
  const captured = capturedLogger('info');
  server = await startTestServer({}, captured.logger);
  logLines = captured.lines;
  client = new NormserveClient(server.address);
});
afterAll(async () => {
  client?.close();
  await server?.stop();
});

describe('module lifecycle', () => {
  it('creates with PyTorch defaults, reads, updates, deletes', async () => {
    const created = await client.createModule('life', { kind: 'BATCH_NORM_3D', numFeatures: 5 });
    expect(created).toMatchObject({
      name: 'life',
      kind: 'BATCH_NORM_3D',
      numFeatures: 5,
      eps: 1e-5,
      momentum: 0.1,
      affine: true,
      builtWithRunningStats: true,
      training: true,
      trackRunningStats: true,
      numBatchesTracked: 0n,
      repr: 'BatchNorm3d(5, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)',
    });
    const state = await client.getState('life');
    expect(Object.keys(state)).toEqual(['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']);
    expect(Array.from(state.running_var!)).toEqual([1, 1, 1, 1, 1]);

    const changed = await client.updateModule('life', { training: false, momentum: null, eps: 1e-3, trackRunningStats: false });
    expect(changed).toMatchObject({ training: false, momentum: null, eps: 1e-3, trackRunningStats: false, builtWithRunningStats: true });
    expect(changed.repr).toBe('BatchNorm3d(5, eps=0.001, momentum=None, affine=True, track_running_stats=False)');

    await client.deleteModule('life');
    await expect(client.getModule('life')).rejects.toMatchObject({ code: Status.NOT_FOUND, reason: 'BN_ERR_MODULE_NOT_FOUND' });
  });

  it('round-trips a state_dict through GetState and LoadState', async () => {
    await client.createModule('src', { kind: 'BATCH_NORM_2D', numFeatures: 4 });
    await client.createModule('dst', { kind: 'BATCH_NORM_2D', numFeatures: 4 });
    await client.loadState('src', { weight: Float32Array.of(1, 2, 3, 4), bias: Float32Array.of(-1, 0, 1, 2) }, { strict: false });
    for (let i = 0; i < 3; i++) await client.forward('src', { shape: [3, 4, 5, 5], data: channelData(3, 4, 25, 1, 2, i + 1) });
    const state = await client.getState('src');
    expect(state.num_batches_tracked).toBe(3n);
    const result = await client.loadState('dst', state);
    expect(result).toMatchObject({ missingKeys: [], unexpectedKeys: [] });
    expect(await client.getState('dst')).toEqual(state);
    await client.eval('src');
    await client.eval('dst');
    const x = { shape: [2, 4, 3, 3], data: channelData(2, 4, 9, 0, 1, 9) };
    expect((await client.forward('dst', x)).data).toEqual((await client.forward('src', x)).data);
  });

  it('returns an empty output for an empty batch, with the shape preserved', async () => {
    await client.createModule('empty', { kind: 'BATCH_NORM_2D', numFeatures: 3 });
    const out = await client.forward('empty', { shape: [0, 3, 4, 4], data: new Float32Array(0) });
    expect(out.shape).toEqual([0, 3, 4, 4]);
    expect(out.data.length).toBe(0);
    expect((await client.getModule('empty')).numBatchesTracked).toBe(1n);
  });
});

describe('ListModules', () => {
  it('pages through every module in name order', async () => {
    const names = Array.from({ length: 23 }, (_, i) => `list/m${String(i).padStart(2, '0')}`);
    for (const name of [...names].reverse()) await client.createModule(name, { kind: 'BATCH_NORM_1D', numFeatures: 1 });
    const seen: string[] = [];
    let token = '';
    let pages = 0;
    do {
      const page = await client.listModules(5, token);
      expect(page.modules.length).toBeLessThanOrEqual(5);
      seen.push(...page.modules.map((m) => m.name));
      token = page.nextPageToken;
      pages++;
    } while (token !== '');
    const listed = seen.filter((n) => n.startsWith('list/'));
    expect(listed).toEqual(names);
    expect(seen).toEqual([...seen].sort());
    expect(pages).toBeGreaterThanOrEqual(5);
  });
});

describe('concurrency', () => {
  it('never interleaves the state updates of concurrent training forwards on one module', async () => {
    // With momentum=None the running mean is the plain average of the batch means, whatever the
    // order; a lost or torn update shows in the counter or in the average.
    await client.createModule('busy', { kind: 'BATCH_NORM_2D', numFeatures: 2, momentum: null });
    const batches = Array.from({ length: 16 }, (_, i) => channelData(4, 2, 16, i, 1, i + 100));
    await Promise.all(batches.map((data) => client.forward('busy', { shape: [4, 2, 4, 4], data })));
    const state = await client.getState('busy');
    expect(state.num_batches_tracked).toBe(16n);
    for (let ch = 0; ch < 2; ch++) {
      let total = 0;
      for (const x of batches) {
        let sum = 0;
        for (let b = 0; b < 4; b++) for (let i = 0; i < 16; i++) sum += x[(b * 2 + ch) * 16 + i]!;
        total += sum / 64;
      }
      expect(state.running_mean![ch]).toBeCloseTo(total / 16, 4);
    }
  });

  it('serves other modules while one module is busy', async () => {
    await client.createModule('slow', { kind: 'BATCH_NORM_2D', numFeatures: 1 });
    await client.createModule('fast', { kind: 'BATCH_NORM_1D', numFeatures: 1 });
    let released!: () => void;
    const gate = new Promise<void>((resolve) => (released = resolve));
    const held = server.running.registry.exclusive('slow', () => gate);
    const out = await client.forward('fast', { shape: [2, 1], data: Float32Array.of(1, 3) });
    expect(Array.from(out.data).map((v) => Math.round(v))).toEqual([-1, 1]);
    released();
    await held;
  });
});

describe('health and reflection', () => {
  it('reports SERVING for the server and the module API, and SERVICE_UNKNOWN otherwise', async () => {
    expect(await client.health('')).toBe('SERVING');
    expect(await client.health('normserve.v1.BatchNormService')).toBe('SERVING');
    await expect(client.health('no.such.Service')).rejects.toMatchObject({ code: Status.NOT_FOUND });
  });

  it('lists the services through server reflection', async () => {
    const require = createRequire(import.meta.url);
    const protoDir = join(dirname(require.resolve('@grpc/reflection')), '..', 'proto');
    const def = loadSync('grpc/reflection/v1/reflection.proto', { includeDirs: [protoDir], keepCase: true });
    const grpcObj = loadPackageDefinition(def) as unknown as { grpc: { reflection: { v1: GrpcObject } } };
    const Reflection = grpcObj.grpc.reflection.v1.ServerReflection as ServiceClientConstructor;
    const stub = new Reflection(server.address, credentials.createInsecure());
    const services = await new Promise<string[]>((resolve, reject) => {
      const call = (stub as unknown as { ServerReflectionInfo: () => NodeJS.ReadWriteStream & { end(): void } }).ServerReflectionInfo();
      call.on('data', (r: { list_services_response?: { service: { name: string }[] } }) => resolve(r.list_services_response!.service.map((s) => s.name)));
      call.on('error', reject);
      call.write({ list_services: '' } as never);
      call.end();
    });
    stub.close();
    expect(services).toContain('normserve.v1.BatchNormService');
  });
});

describe('logs', () => {
  it('writes one line per call with method, module, status, duration and bytes, never the tensor', async () => {
    await client.createModule('logged', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    const data = Float32Array.of(123.5, 2, 3, 4);
    await client.forward('logged', { shape: [2, 2], data });
    await expect(client.forward('logged', { shape: [2], data: Float32Array.of(1, 2) })).rejects.toBeInstanceOf(NormserveClientError);
    const lines = logLines.filter((l) => l.module === 'logged');
    expect(lines.map((l) => [l.method, l.status])).toEqual([
      ['/normserve.v1.BatchNormService/CreateModule', 'OK'],
      ['/normserve.v1.BatchNormService/Forward', 'OK'],
      ['/normserve.v1.BatchNormService/Forward', 'INVALID_ARGUMENT'],
    ]);
    expect(lines[1]).toMatchObject({ bytes_in: 16, bytes_out: 16, msg: 'call' });
    expect(typeof lines[1]!.ms).toBe('number');
    expect(lines[2]).toMatchObject({ error: 'expected 2D or 3D input (got 1D input)' });
    expect(JSON.stringify(lines)).not.toContain('123.5');
  });
});
