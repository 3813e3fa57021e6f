/**
 * Streamed tensor calls through a real server: tensors larger than one message, equal results to
 * the unary calls, the stream budget, and malformed streams refused without any change.
 */
import { credentials, type ClientDuplexStream, type ServiceError } from '@grpc/grpc-js';
import { afterEach, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import type { Config } from '../../src/config.js';
import { Status } from '../../src/errors.js';
import { grpcObject } from '../../src/wire/proto.js';
import { clientChannelOptions } from '../../src/wire/transport.js';
import { channelData } from '../support/data.js';
import { rejection } from '../support/rejection.js';
import { startTestServer, type TestServer } from '../support/server.js';

const servers: TestServer[] = [];
const clients: NormserveClient[] = [];

async function start(overrides: Partial<Config> = {}) {
  const server = await startTestServer(overrides);
  servers.push(server);
  const client = new NormserveClient(server.address, { streamChunkBytes: 100_000 });
  clients.push(client);
  return { server, client };
}

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await Promise.all(servers.splice(0).map((s) => s.stop()));
});

// 4 x 8 x 96 x 96 float32: 1.18 MB, four times the 256 KiB message limit below.
const SHAPE = [4, 8, 96, 96];
const input = (seed = 1) => ({ shape: SHAPE, data: channelData(4, 8, 96 * 96, 5, 2, seed) });

describe('streamed tensor calls', () => {
  it('carry a tensor larger than one message, with the results of the unary calls', async () => {
    const small = await start({ maxMessageBytes: 256 * 1024, streamChunkBytes: 64 * 1024 });
    const large = await start();
    for (const { client } of [small, large]) await client.createModule('bn', { kind: 'BATCH_NORM_2D', numFeatures: 8 });

    const tooBig = await rejection(small.client.forward('bn', input(), { transport: 'unary' }));
    expect(tooBig.code).toBe(Status.RESOURCE_EXHAUSTED);

    const streamed = await small.client.forward('bn', input(), { transport: 'stream', saveForBackward: true });
    const unary = await large.client.forward('bn', input(), { transport: 'unary', saveForBackward: true });
    expect(streamed.shape).toEqual(SHAPE);
    expect(Buffer.from(streamed.data.buffer).equals(Buffer.from(unary.data.buffer))).toBe(true);
    expect(await small.client.getState('bn')).toEqual(await large.client.getState('bn'));

    const dy = input(7);
    const g1 = await small.client.backward('bn', streamed.contextId, dy, { transport: 'stream' });
    const g2 = await large.client.backward('bn', unary.contextId, dy, { transport: 'unary' });
    expect(Buffer.from(g1.gradInput.data.buffer).equals(Buffer.from(g2.gradInput.data.buffer))).toBe(true);
    expect(Array.from(g1.gradWeight!)).toEqual(Array.from(g2.gradWeight!));
    expect(Array.from(g1.gradBias!)).toEqual(Array.from(g2.gradBias!));

    // The client streams on its own above its threshold.
    const auto = new NormserveClient(small.server.address, { streamAboveBytes: 200_000, streamChunkBytes: 200_000 });
    clients.push(auto);
    const again = await auto.forward('bn', input(3));
    expect(again.data.length).toBe(input().data.length);
  });

  it('run SyncBatchNorm steps, with the results of the unary calls', async () => {
    const { client } = await start({ maxMessageBytes: 256 * 1024 });
    await client.createModule('s', { kind: 'SYNC_BATCH_NORM', numFeatures: 8, worldSize: 2 });
    await client.createModule('u', { kind: 'SYNC_BATCH_NORM', numFeatures: 8, worldSize: 2 });
    const shard = (rank: number) => ({ shape: [2, 8, 96, 96], data: channelData(2, 8, 96 * 96, rank, 1 + rank, 10 + rank) });
    const small = (rank: number) => ({ shape: [1, 8, 8, 8], data: shard(rank).data.subarray(0, 512) });
    const streamed = await Promise.all([0, 1].map((rank) => client.syncForward('s', { step: 0n, rank, worldSize: 2 }, shard(rank), { transport: 'stream', saveForBackward: true })));
    expect(streamed.every((r) => r.synced && r.count === 4 * 96 * 96)).toBe(true);
    const grads = await Promise.all(
      [0, 1].map((rank) => client.syncBackward('s', { step: 0n, rank, worldSize: 2 }, streamed[rank]!.contextId, shard(rank + 2), { transport: 'stream' })),
    );
    expect(grads[0]!.gradWeightTotal).toEqual(grads[1]!.gradWeightTotal);
    expect(grads[0]!.gradInput.data.length).toBe(2 * 8 * 96 * 96);
    // The same step on small shards, unary, still works beside it.
    const unary = await Promise.all([0, 1].map((rank) => client.syncForward('u', { step: 0n, rank, worldSize: 2 }, small(rank))));
    expect(unary[0]!.mean).toEqual(unary[1]!.mean);
  });

  it('refuse a stream over the budget before reading it, and change nothing', async () => {
    const { client } = await start({ streamBudgetBytes: 2_000_000 });
    await client.createModule('bn', { kind: 'BATCH_NORM_2D', numFeatures: 8 });
    const err = await rejection(client.forward('bn', input(), { transport: 'stream' }));
    expect(err.code).toBe(Status.RESOURCE_EXHAUSTED);
    expect(err.reason).toBe('BN_ERR_STREAM_BUDGET');
    expect(err.message).toContain('stream_budget_bytes=2000000');
    expect((await client.getModule('bn')).numBatchesTracked).toBe(0n);
    // A smaller one fits, and the budget is free again afterwards.
    const half = { shape: [2, 8, 96, 96], data: input().data.subarray(0, 2 * 8 * 96 * 96) };
    await client.forward('bn', half, { transport: 'stream' });
    await client.forward('bn', half, { transport: 'stream' });
    expect((await client.getModule('bn')).numBatchesTracked).toBe(2n);
  });

  it('refuse malformed streams with INVALID_ARGUMENT and change nothing', async () => {
    const { server, client } = await start();
    await client.createModule('bn', { kind: 'BATCH_NORM_2D', numFeatures: 8 });
    const stub = new grpcObject.normserve.v1.BatchNormService(server.address, credentials.createInsecure(), clientChannelOptions());
    const head = (data = Buffer.alloc(0)) => ({ head: { name: 'bn', input: { shape: ['1', '8', '2', '2'], dtype: 'FLOAT32', data } } });
    const bytes = (n: number) => ({ chunk: Buffer.alloc(n, 1) });
    const cases: [string, object[], RegExp][] = [
      ['data before the head', [bytes(128), head()], /data arrived before the head/],
      ['two heads', [head(), head()], /a second head/],
      ['data in the head', [head(Buffer.alloc(128))], /carries data/],
      ['too many bytes', [head(), bytes(100), bytes(100)], /more than the 128 bytes/],
      ['too few bytes', [head(), bytes(100)], /100 bytes before the stream ended, of the 128/],
      ['no head at all', [], /ended without a head/],
      ['a bad shape', [{ head: { name: 'bn', input: { shape: ['1', '-8'], dtype: 'FLOAT32' } } }], /dimension 1 is -8/],
    ];
    for (const [what, messages, pattern] of cases) {
      const err = await new Promise<ServiceError>((resolve, reject) => {
        const call = (stub as unknown as { ForwardStream(): ClientDuplexStream<object, unknown> }).ForwardStream();
        call.on('data', () => reject(new Error(`${what}: answered`)));
        call.on('error', resolve);
        call.on('end', () => reject(new Error(`${what}: ended without an error`)));
        for (const m of messages) call.write(m);
        call.end();
      });
      expect(err.code, what).toBe(Status.INVALID_ARGUMENT);
      expect(err.details, what).toMatch(pattern);
    }
    stub.close();
    expect((await client.getModule('bn')).numBatchesTracked).toBe(0n);
    expect(server.running.inFlight()).toBe(0);
  });
});
