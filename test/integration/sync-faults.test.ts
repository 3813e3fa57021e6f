/**
 * The coordinator's faults through a real server, each with a defined outcome and never a hang:
 * missing ranks, retries, conflicting payloads, bad ranks and sizes, cancelled calls, step order,
 * and shutdown. After every test the gauge of open steps and waiting calls is back to zero.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient, type StepRef } from '../../src/client/client.js';
import { Status } from '../../src/errors.js';
import { channelData } from '../support/data.js';
import { startTestServer, type TestServer } from '../support/server.js';

const TIMEOUT_MS = 400;
let server: TestServer;
const ranks: NormserveClient[] = [];
let counter = 0;

beforeAll(async () => {
  server = await startTestServer({ stepTimeoutMs: TIMEOUT_MS, stepResultsKept: 4 });
  for (let r = 0; r < 4; r++) ranks.push(new NormserveClient(server.address));
});
afterAll(async () => {
  for (const c of ranks) c.close();
  await server?.stop();
});
afterEach(async () => {
  // Every test leaves no open step and no waiting call behind.
  expect(server.running.coordinator.pending()).toEqual({ steps: 0, waiters: 0 });
});

/** A fresh group module of `world` ranks with 2 channels. */
async function group(world: number, extra: Parameters<NormserveClient['createModule']>[1] extends infer S ? Partial<S> : never = {}) {
  const name = `faults/g${++counter}`;
  await ranks[0]!.createModule(name, { kind: 'SYNC_BATCH_NORM', numFeatures: 2, worldSize: world, ...extra });
  return name;
}

const at = (step: number, rank: number, worldSize = 2): StepRef => ({ step, rank, worldSize });
const stats = (seed: number) => ({ count: 4, mean: [seed, -seed], var: [1 + seed, 2] });
const settle = <T>(p: Promise<T>) => p.then((v) => ({ ok: true as const, v }), (e: { code: number; message: string }) => ({ ok: false as const, e }));

describe('a rank that never arrives', () => {
  it('aborts the step for every waiting rank after the step timeout, naming the missing ranks; nothing changes; the step can run again', async () => {
    const name = await group(3);
    const before = await ranks[0]!.getState(name);
    const started = Date.now();
    const waiting = await Promise.all([settle(ranks[0]!.gatherStats(name, at(0, 0, 3), stats(1))), settle(ranks[2]!.gatherStats(name, at(0, 2, 3), stats(2)))]);
    expect(Date.now() - started).toBeGreaterThanOrEqual(TIMEOUT_MS - 50);
    for (const w of waiting) {
      expect(w.ok).toBe(false);
      expect(w.ok || w.e.code).toBe(Status.ABORTED);
      expect(w.ok || w.e.message).toMatch(new RegExp(`step 0 of module '${name}' timed out after step_timeout_ms=${TIMEOUT_MS} waiting for ranks 1 \\(joined: 0, 2\\)`));
    }
    expect(await ranks[0]!.getState(name)).toEqual(before);
    const again = await Promise.all([0, 1, 2].map((r) => ranks[r]!.gatherStats(name, at(0, r, 3), stats(r))));
    expect(again.map((s) => s.count)).toEqual([12, 12, 12]);
    expect((await ranks[0]!.getModule(name)).numBatchesTracked).toBe(1n);
  });
});

describe('retries', () => {
  it('gives a rank that repeats a completed step with the same payload the same result, and updates nothing twice', async () => {
    const name = await group(2);
    const first = await Promise.all([ranks[0]!.gatherStats(name, at(0, 0), stats(1)), ranks[1]!.gatherStats(name, at(0, 1), stats(3))]);
    const state = await ranks[0]!.getState(name);
    const retry = await ranks[0]!.gatherStats(name, at(0, 0), stats(1));
    expect(retry).toEqual(first[0]);
    expect(await ranks[0]!.getState(name)).toEqual(state);
    expect(state.num_batches_tracked).toBe(1n);
  });

  it('lets a duplicate call of a waiting rank wait for the same result', async () => {
    const name = await group(2);
    const a = ranks[0]!.gatherStats(name, at(0, 0), stats(1));
    const again = ranks[2]!.gatherStats(name, at(0, 0), stats(1));
    const b = ranks[1]!.gatherStats(name, at(0, 1), stats(2));
    const [ra, rAgain] = await Promise.all([a, again, b]);
    expect(rAgain).toEqual(ra);
  });

  it('answers ALREADY_EXISTS to a different payload for a rank and step, open or completed', async () => {
    const name = await group(2);
    const a = ranks[0]!.gatherStats(name, at(0, 0), stats(1));
    await expect(ranks[2]!.gatherStats(name, at(0, 0), stats(5))).rejects.toMatchObject({
      code: Status.ALREADY_EXISTS,
      message: `rank 0 already sent different statistics for step 0 of module '${name}'`,
    });
    await ranks[1]!.gatherStats(name, at(0, 1), stats(2));
    await a;
    await expect(ranks[1]!.gatherStats(name, at(0, 1), stats(9))).rejects.toMatchObject({ code: Status.ALREADY_EXISTS });
  });

  it('refuses a step older than the last completed one once its result is no longer kept', async () => {
    const name = await group(1);
    for (let s = 0; s < 6; s++) await ranks[0]!.gatherStats(name, at(s, 0, 1), stats(s));
    await expect(ranks[0]!.gatherStats(name, at(0, 0, 1), stats(0))).rejects.toMatchObject({
      code: Status.FAILED_PRECONDITION,
      message: expect.stringMatching(/step 0 is not newer than step 5, the last completed/),
    });
    await expect(ranks[0]!.gatherStats(name, at(5, 0, 1), stats(5))).resolves.toMatchObject({ count: 4 });
  });
});

describe('calls the group cannot take', () => {
  it.each([
    ['a rank out of range', at(0, 2), Status.INVALID_ARGUMENT, /rank 2 is outside 0\.\.1 of a group of 2 ranks/],
    ['a negative rank', at(0, -1), Status.INVALID_ARGUMENT, /rank -1 is outside/],
    ['a world size that disagrees', { step: 0, rank: 1, worldSize: 3 }, Status.FAILED_PRECONDITION, /world_size 3 disagrees with module .*, a group of 2 ranks/],
  ])('%s: refused at once, and the open step is aborted for the others with the reason', async (_, ref, code, message) => {
    const name = await group(2);
    const waiting = settle(ranks[0]!.gatherStats(name, at(0, 0), stats(1)));
    await new Promise((r) => setTimeout(r, 20));
    await expect(ranks[1]!.gatherStats(name, ref, stats(2))).rejects.toMatchObject({ code, message: expect.stringMatching(message) });
    const w = await waiting;
    expect(w.ok || w.e.code).toBe(Status.ABORTED);
    expect(w.ok || w.e.message).toMatch(message);
  });

  it('a channel count that disagrees with the module: INVALID_ARGUMENT, step aborted', async () => {
    const name = await group(2);
    const waiting = settle(ranks[0]!.gatherStats(name, at(0, 0), stats(1)));
    await new Promise((r) => setTimeout(r, 20));
    await expect(ranks[1]!.gatherStats(name, at(0, 1), { count: 4, mean: [1, 2, 3], var: [1, 1, 1] })).rejects.toMatchObject({
      code: Status.INVALID_ARGUMENT,
      message: 'invalid mean: 3 values; the module has 2 channels',
    });
    expect((await waiting).ok).toBe(false);
  });

  it('shards with different channel counts on a module that checks none: FAILED_PRECONDITION, step aborted', async () => {
    const name = await group(2, { affine: false, trackRunningStats: false });
    const waiting = settle(ranks[0]!.syncForward(name, at(0, 0), { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) }));
    await new Promise((r) => setTimeout(r, 20));
    await expect(ranks[1]!.syncForward(name, at(0, 1), { shape: [2, 3], data: new Float32Array(6) })).rejects.toMatchObject({
      code: Status.FAILED_PRECONDITION,
      message: expect.stringMatching(/rank 1 sent 3 channels for step 0 .*; rank 0 sent 2/),
    });
    expect((await waiting).ok).toBe(false);
  });

  it('a shard of the wrong rank: PyTorch\'s ValueError for that rank, step aborted for the others', async () => {
    const name = await group(2);
    const waiting = settle(ranks[0]!.syncForward(name, at(0, 0), { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) }));
    await new Promise((r) => setTimeout(r, 20));
    await expect(ranks[1]!.syncForward(name, at(0, 1), { shape: [4], data: new Float32Array(4) })).rejects.toMatchObject({
      code: Status.INVALID_ARGUMENT,
      message: 'expected at least 2D input (got 1D input)',
      pythonType: 'ValueError',
    });
    const w = await waiting;
    expect(w.ok || w.e.message).toMatch(/aborted: rank 1: expected at least 2D input/);
  });

  it('a rank that runs ahead to another step: refused, and the open step is aborted', async () => {
    const name = await group(2);
    const waiting = settle(ranks[0]!.gatherStats(name, at(5, 0), stats(1)));
    await new Promise((r) => setTimeout(r, 20));
    await expect(ranks[1]!.gatherStats(name, at(6, 1), stats(2))).rejects.toMatchObject({
      code: Status.FAILED_PRECONDITION,
      message: expect.stringMatching(/rank 1 sent step 6 while step 5 waits for ranks 1: every rank must run every step, in order/),
    });
    expect((await waiting).ok).toBe(false);
  });

  it('a module that is not a group, and a plain Forward on a group that pools', async () => {
    await ranks[0]!.createModule('faults/plain', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    await expect(ranks[0]!.gatherStats('faults/plain', at(0, 0, 1), stats(1))).rejects.toMatchObject({
      code: Status.FAILED_PRECONDITION,
      message: "module 'faults/plain' is a BatchNorm1d: SyncBatchNormService serves SYNC_BATCH_NORM modules (ConvertToSync makes one)",
    });
    const name = await group(2);
    await expect(ranks[0]!.forward(name, { shape: [2, 2], data: new Float32Array(4) })).rejects.toMatchObject({
      code: Status.FAILED_PRECONDITION,
      message: expect.stringMatching(/a SyncBatchNorm group of 2 ranks that pools its statistics in this mode: use SyncBatchNormService.SyncForward/),
    });
    await ranks[0]!.eval(name);
    await expect(ranks[0]!.forward(name, { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) })).resolves.toBeDefined();
  });

  it('ReduceGrads for a step with no completed forward, and SyncBackward with another step\'s context', async () => {
    const name = await group(1);
    await expect(ranks[0]!.reduceGrads(name, at(3, 0, 1), { sumDy: [1, 2], sumDyXmu: [3, 4] })).rejects.toMatchObject({
      code: Status.FAILED_PRECONDITION,
      message: `step 3 of module '${name}' has no completed forward here: SyncForward or GatherStats must complete it first`,
    });
    const f = await ranks[0]!.syncForward(name, at(0, 0, 1), { shape: [3, 2], data: channelData(3, 2, 1, 0, 1) }, { saveForBackward: true });
    await expect(ranks[0]!.syncBackward(name, at(1, 0, 1), f.contextId, { shape: [3, 2], data: new Float32Array(6) })).rejects.toMatchObject({
      code: Status.INVALID_ARGUMENT,
      message: `context ${f.contextId} is from SyncForward step 0 rank 0, not step 1 rank 0`,
    });
  });
});

describe('cancelled calls', () => {
  it('release their slot when the deadline passes, and the step completes when the ranks come back', async () => {
    const name = await group(2);
    const hasty = new NormserveClient(server.address, { deadlineMs: 100 });
    await expect(hasty.gatherStats(name, at(0, 0), stats(1))).rejects.toMatchObject({ code: Status.DEADLINE_EXCEEDED });
    await new Promise((r) => setTimeout(r, 20));
    expect(server.running.coordinator.pending()).toEqual({ steps: 0, waiters: 0 });
    const done = await Promise.all([ranks[0]!.gatherStats(name, at(0, 0), stats(7)), ranks[1]!.gatherStats(name, at(0, 1), stats(2))]);
    expect(done[0].count).toBe(8);
    hasty.close();
  });
});

describe('ConvertToSync', () => {
  it('keeps config, parameters, buffers, counter and the training flag', async () => {
    const c = ranks[0]!;
    await c.createModule('faults/convert', { kind: 'BATCH_NORM_2D', numFeatures: 2, eps: 1e-3, momentum: null });
    await c.loadState('faults/convert', { weight: Float32Array.of(2, 3), bias: Float32Array.of(-1, 1) }, { strict: false });
    await c.forward('faults/convert', { shape: [2, 2, 2, 2], data: channelData(2, 2, 4, 1, 1) });
    await c.eval('faults/convert');
    const before = await c.getState('faults/convert');
    const converted = await c.convertToSync('faults/convert', 2, 'SYNC_WHEN_TRAINING');
    expect(converted).toMatchObject({ kind: 'SYNC_BATCH_NORM', worldSize: 2, syncRule: 'SYNC_WHEN_TRAINING', training: false, eps: 1e-3, momentum: null, numBatchesTracked: 1n });
    expect(converted.repr).toBe('SyncBatchNorm(2, eps=0.001, momentum=None, affine=True, track_running_stats=True)');
    expect(await c.getState('faults/convert')).toEqual(before);
  });
});

describe('shutdown', () => {
  it('aborts open steps with UNAVAILABLE', async () => {
    const own = await startTestServer({ stepTimeoutMs: 60_000 });
    const client = new NormserveClient(own.address);
    await client.createModule('g', { kind: 'SYNC_BATCH_NORM', numFeatures: 2, worldSize: 2 });
    const waiting = settle(client.gatherStats('g', at(0, 0), stats(1)));
    await new Promise((r) => setTimeout(r, 20));
    await own.running.shutdown(5_000);
    const w = await waiting;
    expect(w.ok || w.e.code).toBe(Status.UNAVAILABLE);
    client.close();
  });
});
