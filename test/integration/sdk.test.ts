/**
 * The TypeScript SDK on top of the client: RemoteBatchNorm and RemoteSyncBatchNorm against a
 * real server, typed errors, retries for UNAVAILABLE only (against real grpc-js servers that
 * answer UNAVAILABLE and count the calls), deadlines over all attempts, and shared memory chosen
 * by size and locality.
 */
import { existsSync, mkdtempSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Server, ServerCredentials, status, type ServiceError, type UntypedServiceImplementation } from '@grpc/grpc-js';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient, type TensorData } from '../../src/client/client.js';
import { NormserveClientError } from '../../src/client/errors.js';
import { RemoteBatchNorm, RemoteSyncBatchNorm } from '../../src/client/remote-batch-norm.js';
import { bnError } from '../../src/errors.js';
import { toServiceError } from '../../src/server/status.js';
import { grpcObject } from '../../src/wire/proto.js';
import { channelData } from '../support/data.js';
import { rejection } from '../support/rejection.js';
import { startTestServer, type TestServer } from '../support/server.js';

let server: TestServer;
let client: NormserveClient;
beforeAll(async () => {
  server = await startTestServer();
  client = new NormserveClient(server.address);
});
afterAll(async () => {
  await client.close();
  await server.stop();
});

const x = (n: number, c: number, s: number, seed: number): TensorData => ({ shape: [n, c, s], data: channelData(n, c, s, seed, 1 + seed, seed + 3) });

describe('RemoteBatchNorm', () => {
  it('trains like the client\'s own calls on a twin module, backward included, and reads its state as PyTorch keys', async () => {
    const bn = await RemoteBatchNorm.create(client, 'sdk/bn', { kind: 'BATCH_NORM_1D', numFeatures: 3 });
    await client.createModule('sdk/twin', { kind: 'BATCH_NORM_1D', numFeatures: 3 });
    for (let step = 0; step < 3; step++) {
      const input = x(4, 3, 5, step);
      const y = await bn.forward(input);
      const twin = await client.forward('sdk/twin', input, { saveForBackward: true });
      expect(y.data).toEqual(twin.data);
      const dy = x(4, 3, 5, step + 10);
      const g = await y.backward(dy);
      const gTwin = await client.backward('sdk/twin', twin.contextId, dy);
      expect(g).toEqual(gTwin);
      await expect(y.backward(dy)).rejects.toThrow('was differentiated already; a saved context serves one backward');
    }
    expect(await bn.stateDict()).toEqual(await client.getState('sdk/twin'));
    expect((await bn.refresh()).numBatchesTracked).toBe(3n);
    await bn.eval();
    const evalOut = await bn.forward(x(2, 3, 5, 7));
    await expect(evalOut.backward(x(2, 3, 5, 8))).rejects.toThrow('saved nothing for backward (eval mode; pass saveForBackward: true)');
    const saved = await bn.forward(x(2, 3, 5, 7), { saveForBackward: true });
    expect((await saved.backward(x(2, 3, 5, 8))).gradInput.shape).toEqual([2, 3, 5]);
    expect((await bn.refresh()).numBatchesTracked).toBe(3n);
  });

  it('attaches to an existing module with the same configuration, and refuses another configuration', async () => {
    await RemoteBatchNorm.create(client, 'sdk/attach', { kind: 'BATCH_NORM_2D', numFeatures: 4, momentum: 0.2 });
    const again = await RemoteBatchNorm.create(client, 'sdk/attach', { kind: 'BATCH_NORM_2D', numFeatures: 4, momentum: 0.2 }, { attach: true });
    expect(again.info.momentum).toBe(0.2);
    await expect(RemoteBatchNorm.create(client, 'sdk/attach', { kind: 'BATCH_NORM_2D', numFeatures: 8 }, { attach: true })).rejects.toThrow(
      "module 'sdk/attach' exists with another numFeatures; delete it or use another name",
    );
    const err = await rejection(RemoteBatchNorm.create(client, 'sdk/attach', { kind: 'BATCH_NORM_2D', numFeatures: 4 }));
    expect([err.statusName, err.reason]).toEqual(['ALREADY_EXISTS', 'BN_ERR_MODULE_EXISTS']);
  });
});

describe('RemoteSyncBatchNorm', () => {
  it('gives each rank what one BatchNorm over the whole batch gives, step after step', async () => {
    const ranks = await Promise.all([0, 1].map((rank) => RemoteSyncBatchNorm.create(client, 'sdk/sync', { numFeatures: 3 }, { rank, worldSize: 2 })));
    await client.createModule('sdk/whole', { kind: 'BATCH_NORM_1D', numFeatures: 3 });
    for (let step = 0; step < 3; step++) {
      const shards = [x(2, 3, 4, step), x(3, 3, 4, step + 5)];
      const outs = await Promise.all(ranks.map((r, i) => r.forward(shards[i]!)));
      const whole = await client.forward('sdk/whole', { shape: [5, 3, 4], data: Float32Array.from([...shards[0]!.data, ...shards[1]!.data]) }, { saveForBackward: true });
      const joined = Float32Array.from([...outs[0]!.data, ...outs[1]!.data]);
      for (let i = 0; i < joined.length; i++) expect(joined[i]).toBeCloseTo(whole.data[i]!, 5);
      expect(outs.map((o) => [o.synced, o.count])).toEqual([[true, 20], [true, 20]]);
      const dys = [x(2, 3, 4, step + 20), x(3, 3, 4, step + 30)];
      const grads = await Promise.all(outs.map((o, i) => o.backward(dys[i]!)));
      const wholeGrad = await client.backward('sdk/whole', whole.contextId, { shape: [5, 3, 4], data: Float32Array.from([...dys[0]!.data, ...dys[1]!.data]) });
      const gradJoined = Float32Array.from([...grads[0]!.gradInput.data, ...grads[1]!.gradInput.data]);
      for (let i = 0; i < gradJoined.length; i++) expect(gradJoined[i]).toBeCloseTo(wholeGrad.gradInput.data[i]!, 4);
    }
    expect(ranks.map((r) => r.step)).toEqual([3n, 3n]);
    const state = await ranks[0]!.stateDict();
    const whole = await client.getState('sdk/whole');
    for (const key of ['running_mean', 'running_var'] as const) for (let c = 0; c < 3; c++) expect(state[key]![c]).toBeCloseTo(whole[key]![c]!, 5);
    expect(state.num_batches_tracked).toBe(3n);
    await expect(RemoteSyncBatchNorm.attach(client, 'sdk/sync', { rank: 2, worldSize: 2 })).rejects.toThrow('rank 2 is outside 0..1');
  });
});

describe('typed errors', () => {
  it('carry the status name, the catalogue reason, PyTorch\'s class and the field at fault', async () => {
    await client.createModule('sdk/errors', { kind: 'BATCH_NORM_2D', numFeatures: 2 });
    const rank = await rejection(client.forward('sdk/errors', { shape: [2, 2], data: new Float32Array(4) }));
    expect([rank.statusName, rank.reason, rank.pythonType]).toEqual(['INVALID_ARGUMENT', 'BN_ERR_INPUT_RANK', 'ValueError']);
    const dtype = await rejection(client.forward('sdk/errors', { shape: [1, 2, 1, 1], data: new Float32Array(1) }));
    expect(dtype.reason).toBe('BN_ERR_INVALID_TENSOR');
    expect(dtype.fieldViolations).toEqual([{ field: 'input', description: dtype.message }]);
  });
});

/** A real grpc-js server whose every BatchNormService call fails with `error` (or never answers), counting calls per method. */
async function failingServer(error: Partial<ServiceError> | 'hang') {
  const calls: Record<string, number> = {};
  const s = new Server();
  const service = grpcObject.normserve.v1.BatchNormService.service;
  const handlers: UntypedServiceImplementation = {};
  for (const method of Object.keys(service)) {
    handlers[method] = (_call: unknown, callback: (e: Partial<ServiceError> | null) => void) => {
      calls[method] = (calls[method] ?? 0) + 1;
      if (error !== 'hang') callback(error);
    };
  }
  s.addService(service, handlers);
  const port = await new Promise<number>((resolve, reject) => s.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  return { calls, address: `127.0.0.1:${port}`, stop: () => s.forceShutdown() };
}

describe('retries', () => {
  const fast = { initialBackoffMs: 1, maxBackoffMs: 5 };
  const tensor = { shape: [2, 1], data: Float32Array.of(1, 2) };

  it('repeat any call the server refused unchanged (UNAVAILABLE with a reason), up to the policy\'s attempts', async () => {
    const refused = await failingServer(toServiceError(bnError('BN_ERR_SHUTTING_DOWN', {}), pino({ level: 'silent' })));
    const c = new NormserveClient(refused.address, { retry: { ...fast, maxAttempts: 3 } });
    expect((await rejection(c.forward('m', tensor, { saveForBackward: true }))).reason).toBe('BN_ERR_SHUTTING_DOWN');
    expect((await rejection(c.createModule('m', { kind: 'BATCH_NORM_1D', numFeatures: 1 }))).code).toBe(status.UNAVAILABLE);
    expect(refused.calls).toEqual({ Forward: 3, CreateModule: 3 });
    await c.close();
    refused.stop();
  });

  it('repeat only calls safe to repeat after a bare UNAVAILABLE, never other statuses, and not at all with retry: false', async () => {
    const bare = await failingServer({ code: status.UNAVAILABLE, details: 'connection reset' });
    const c = new NormserveClient(bare.address, { retry: fast });
    await rejection(c.forward('m', tensor));
    await rejection(c.getModule('m'));
    await rejection(c.updateModule('m', { training: false }));
    await rejection(c.deleteModule('m'));
    // The default policy: 8 attempts for calls that are safe to repeat, one for the others.
    expect(bare.calls).toEqual({ Forward: 1, GetModule: 8, UpdateModule: 8, DeleteModule: 1 });
    await c.close();
    const none = new NormserveClient(bare.address, { retry: false });
    await rejection(none.getModule('m'));
    expect(bare.calls.GetModule).toBe(9);
    await none.close();
    bare.stop();
    const invalid = await failingServer({ code: status.INVALID_ARGUMENT, details: 'no' });
    const d = new NormserveClient(invalid.address, { retry: fast });
    await rejection(d.getModule('m'));
    expect(invalid.calls).toEqual({ GetModule: 1 });
    await d.close();
    invalid.stop();
  });

  it('keep to one deadline over all attempts', async () => {
    const hang = await failingServer('hang');
    const c = new NormserveClient(hang.address, { deadlineMs: 1500 });
    const started = Date.now();
    const err = await rejection(c.getModule('m'));
    expect(err.code).toBe(status.DEADLINE_EXCEEDED);
    expect(Date.now() - started).toBeGreaterThanOrEqual(1400);
    const quick = Date.now();
    expect((await rejection(c.forward('m', tensor, { deadlineMs: 150 }))).code).toBe(status.DEADLINE_EXCEEDED);
    expect(Date.now() - quick).toBeLessThan(1400);
    await c.close();
    hang.stop();
  }, 30_000);
});

describe('shared memory chosen by size and locality', () => {
  it('moves large tensors to a loopback replica through registered files, bit-equal to the wire, and cleans up on close', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'normserve-sdk-shm-'));
    const shm = await startTestServer({ shmDir: dir });
    const wire = new NormserveClient(shm.address);
    const auto = new NormserveClient(shm.address, { sharedMemory: { dir, aboveBytes: 1024 } });
    await wire.createModule('shm/a', { kind: 'BATCH_NORM_1D', numFeatures: 4 });
    await wire.createModule('shm/b', { kind: 'BATCH_NORM_1D', numFeatures: 4 });
    for (const size of [8, 4096]) {
      const input = x(size, 4, 1, size);
      const viaWire = await wire.forward('shm/a', input, { saveForBackward: true });
      const viaAuto = await auto.forward('shm/b', input, { saveForBackward: true });
      expect(viaAuto.data).toEqual(viaWire.data);
      const dy = x(size, 4, 1, size + 1);
      expect(await auto.backward('shm/b', viaAuto.contextId, dy)).toEqual(await wire.backward('shm/a', viaWire.contextId, dy));
    }
    // Only the large tensors went through shared memory: one region, reused by forward and backward.
    expect(readdirSync(dir)).toHaveLength(1);
    expect((await auto.listRegions()).length).toBe(1);
    await auto.close();
    expect(readdirSync(dir)).toEqual([]);
    expect(await wire.listRegions()).toEqual([]);
    await wire.close();
    await shm.stop();
  });

  it('falls back to the wire when the replica refuses regions', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'normserve-sdk-noshm-'));
    const auto = new NormserveClient(server.address, { sharedMemory: { dir, aboveBytes: 16 } });
    await client.createModule('shm/off', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    const y = await auto.forward('shm/off', { shape: [64, 2], data: channelData(64, 2, 1, 0, 1) });
    expect(y.shape).toEqual([64, 2]);
    expect(readdirSync(dir)).toEqual([]);
    expect(existsSync(dir)).toBe(true);
    await auto.close();
  });
});

it('NormserveClientError decodes what a server sends', () => {
  const e = new NormserveClientError(toServiceError(bnError('BN_ERR_NOT_OWNER', { name: 'm', slot: 7, member: 'b-1', owner: 'b:1', self: 'a-1 at a:1' }).with({ owner: 'b:1' }), pino({ level: 'silent' })) as ServiceError);
  expect([e.statusName, e.reason, e.info.owner, e.refusedUnchanged]).toEqual(['FAILED_PRECONDITION', 'BN_ERR_NOT_OWNER', 'b:1', false]);
});
