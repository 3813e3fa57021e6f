/**
 * State across restarts through real servers: every module comes back bit for bit, a group step
 * that completed before a restart answers a retry with its result, and the relaxed mode loses at
 * most its last interval on a crash (the crash-test harness in crash.test.ts covers strict mode
 * under SIGKILL at random moments).
 */
import { once } from 'node:events';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import { Status } from '../../src/errors.js';
import { startServerProcess } from '../../bench/server-process.js';
import { channelData } from '../support/data.js';
import { startTestServer } from '../support/server.js';

const tempDir = () => mkdtempSync(join(tmpdir(), 'normserve-durable-'));

/** Every module's whole observable state. */
async function everything(client: NormserveClient) {
  const { modules } = await client.listModules(1000);
  return Promise.all(modules.map(async (m) => ({ module: m, state: await client.getState(m.name) })));
}

describe('a restart', () => {
  it('brings every module back bit for bit', async () => {
    const dataDir = tempDir();
    let server = await startTestServer({ store: `sqlite:${dataDir}` });
    let client = new NormserveClient(server.address);
    await client.createModule('a/bn2d', { kind: 'BATCH_NORM_2D', numFeatures: 3, momentum: null });
    await client.createModule('a/bn1d', { kind: 'BATCH_NORM_1D', numFeatures: 4, affine: false, eps: 0 });
    await client.createModule('a/bn3d', { kind: 'BATCH_NORM_3D', numFeatures: 2, trackRunningStats: false });
    await client.createModule('a/group', { kind: 'SYNC_BATCH_NORM', numFeatures: 2, worldSize: 2, syncRule: 'SYNC_WHEN_TRAINING' });
    await client.loadState('a/bn2d', { weight: Float32Array.of(0.1, Number.NaN, -0), bias: Float32Array.of(1e-45, 2, 3) }, { strict: false });
    for (let i = 0; i < 3; i++) await client.forward('a/bn2d', { shape: [2, 3, 2, 2], data: channelData(2, 3, 4, i, 1, i + 1) });
    await client.forward('a/bn1d', { shape: [5, 4], data: channelData(5, 4, 1, 3, 2) });
    await client.updateModule('a/bn1d', { training: false, trackRunningStats: false, clearBuffers: ['running_var'] });
    await client.updateModule('a/bn3d', { momentum: 0.25, eps: 0.01 });
    await Promise.all([0, 1].map((rank) => client.gatherStats('a/group', { step: 0, rank, worldSize: 2 }, { count: 3, mean: [rank, 1], var: [1, 2] })));
    await client.createModule('a/converted', { kind: 'BATCH_NORM_2D', numFeatures: 2 });
    await client.convertToSync('a/converted', 4);
    const before = await everything(client);
    client.close();
    await server.stop();

    server = await startTestServer({ store: `sqlite:${dataDir}` });
    client = new NormserveClient(server.address);
    expect(await everything(client)).toEqual(before);
    // And they keep working where they left off.
    await client.forward('a/bn2d', { shape: [2, 3, 2, 2], data: channelData(2, 3, 4, 0, 1, 9) });
    expect((await client.getModule('a/bn2d')).numBatchesTracked).toBe(4n);
    client.close();
    await server.stop();
  });

  it('answers a retry of a group step that completed before it with the committed result', async () => {
    const dataDir = tempDir();
    let server = await startTestServer({ store: `sqlite:${dataDir}` });
    let client = new NormserveClient(server.address);
    await client.createModule('g', { kind: 'SYNC_BATCH_NORM', numFeatures: 2, worldSize: 2 });
    const stats = (rank: number) => ({ count: 4, mean: [rank, -rank], var: [1, 1 + rank] });
    const ref = (step: number, rank: number) => ({ step, rank, worldSize: 2 });
    for (let step = 0; step < 3; step++) await Promise.all([0, 1].map((r) => client.gatherStats('g', ref(step, r), stats(r + step))));
    const committed = await client.gatherStats('g', ref(2, 0), stats(2));
    const state = await client.getState('g');
    client.close();
    await server.stop();

    server = await startTestServer({ store: `sqlite:${dataDir}` });
    client = new NormserveClient(server.address);
    expect(await client.gatherStats('g', ref(2, 0), stats(2))).toEqual(committed);
    expect(await client.getState('g')).toEqual(state);
    await expect(client.gatherStats('g', ref(2, 1), stats(7))).rejects.toMatchObject({ code: Status.ALREADY_EXISTS });
    await expect(client.gatherStats('g', ref(1, 1), stats(2))).resolves.toMatchObject({ count: 8 });
    // The next step runs as usual.
    await Promise.all([0, 1].map((r) => client.gatherStats('g', ref(3, r), stats(r))));
    expect((await client.getModule('g')).numBatchesTracked).toBe(4n);
    client.close();
    await server.stop();
  });
});

/** The real program, as a child process on a data directory. */
async function startProgram(dataDir: string, args: string[] = []) {
  const { child, address } = await startServerProcess(['--backend', 'reference', ...args], dataDir);
  return { child, client: new NormserveClient(address) };
}

describe('relaxed durability', () => {
  it('writes at every checkpoint and at shutdown; a crash loses at most the last interval', async () => {
    const dataDir = tempDir();
    const slow = ['--durability', 'relaxed', '--checkpoint-ms', '600000'];
    // Nothing has been written when the process is killed before its first checkpoint.
    let p = await startProgram(dataDir, slow);
    await p.client.createModule('lost', { kind: 'BATCH_NORM_1D', numFeatures: 1 });
    p.child.kill('SIGKILL');
    await once(p.child, 'exit');
    p.client.close();
    // SIGTERM writes what is pending.
    p = await startProgram(dataDir, slow);
    expect((await p.client.listModules()).modules).toEqual([]);
    await p.client.createModule('kept', { kind: 'BATCH_NORM_1D', numFeatures: 1 });
    p.child.kill('SIGTERM');
    await once(p.child, 'exit');
    p.client.close();
    // A short interval: written by the time the process is killed.
    p = await startProgram(dataDir, ['--durability', 'relaxed', '--checkpoint-ms', '50']);
    expect((await p.client.listModules()).modules.map((m) => m.name)).toEqual(['kept']);
    await p.client.forward('kept', { shape: [2, 1], data: Float32Array.of(1, 3) });
    await new Promise((r) => setTimeout(r, 300));
    p.child.kill('SIGKILL');
    await once(p.child, 'exit');
    p.client.close();
    p = await startProgram(dataDir);
    expect((await p.client.getModule('kept')).numBatchesTracked).toBe(1n);
    p.child.kill('SIGTERM');
    await once(p.child, 'exit');
    p.client.close();
  });
});
