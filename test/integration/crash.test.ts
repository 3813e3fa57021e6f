/**
 * The crash harness. The real server runs as a child process (the reference kernels, so that a
 * replay is exact) while clients drive training forwards, flag changes, loads and resets on two
 * modules and GatherStats steps on a two-rank group. At a seeded random moment the server is
 * killed with SIGKILL, then restarted on the same data directory, 24 times: with strict
 * durability, and with process durability (changes written before their answer and synced to disk
 * every --checkpoint-ms: the death of the process, which is what SIGKILL is, must lose nothing;
 * the interval is an hour here, so no periodic sync happens).
 *
 * After each restart: every module equals, bit for bit, a replay of the calls that were
 * acknowledged, with or without the one call that was in flight (which may have been committed
 * just before the kill). The group's counter shows every acknowledged step once; a retry of the
 * step in flight gets the committed result if it committed, and runs it if it did not.
 */
import type { ChildProcessWithoutNullStreams } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { NormserveClient, type StepStats } from '../../src/client/client.js';
import { createReferenceKernels } from '../../src/kernels/reference.js';
import { BatchNorm, torchSize } from '../../src/nn/batch-norm.js';
import { resolveConfig, type ModuleConfigInput } from '../../src/nn/config.js';
import { mergeStats } from '../../src/sync/merge.js';
import { startServerProcess } from '../../bench/server-process.js';
import { channelData } from '../support/data.js';

const KILLS = 24;
const SEED = 20261126;

/** mulberry32: a small seeded generator. */
function random(seed: number) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Op =
  | { kind: 'forward'; shape: number[]; data: Float32Array }
  | { kind: 'train'; mode: boolean }
  | { kind: 'load'; weight: Float32Array }
  | { kind: 'reset' };

interface Tracked {
  readonly name: string;
  readonly spec: ModuleConfigInput;
  readonly shape: number[];
  /** Acknowledged operations, in order. */
  acked: Op[];
}

const kernels = createReferenceKernels();

async function replay(t: Tracked, ops: Op[]): Promise<BatchNorm> {
  const m = new BatchNorm(resolveConfig(t.spec));
  for (const op of ops) {
    try {
      if (op.kind === 'forward') await m.forward(op.data, op.shape, kernels);
      else if (op.kind === 'train') m.update({ training: op.mode });
      else if (op.kind === 'load') m.loadStateDict({ weight: { shape: [op.weight.length], data: op.weight } }, 2, false);
      else m.resetRunningStats();
    } catch {
      // A call PyTorch refuses after moving the counter (none here) would be replayed the same way.
    }
  }
  return m;
}

async function apply(client: NormserveClient, name: string, op: Op): Promise<void> {
  if (op.kind === 'forward') await client.forward(name, { shape: op.shape, data: op.data });
  else if (op.kind === 'train') await client.train(name, op.mode);
  else if (op.kind === 'load') await client.loadState(name, { weight: op.weight }, { strict: false });
  else await client.resetRunningStats(name);
}

async function observed(client: NormserveClient, name: string) {
  const [m, s] = await Promise.all([client.getModule(name), client.getState(name)]);
  return { training: m.training, ...s };
}

/** What `observed` reads from the server, from a module of the replay. */
function expectedOf(m: BatchNorm) {
  return { training: m.training, ...m.stateDict() };
}

interface Server {
  child: ChildProcessWithoutNullStreams;
  client: NormserveClient;
  ranks: NormserveClient[];
}

let server: Server | undefined;

async function startIn(dataDir: string, durability: string): Promise<Server> {
  const { child, address } = await startServerProcess(['--backend', 'reference', '--durability', durability, '--checkpoint-ms', '3600000'], dataDir);
  return { child, client: new NormserveClient(address), ranks: [new NormserveClient(address), new NormserveClient(address)] };
}

async function kill(s: Server) {
  s.child.kill('SIGKILL');
  await once(s.child, 'exit');
  for (const c of [s.client, ...s.ranks]) c.close();
}

afterAll(async () => {
  if (server) await kill(server);
});

describe.each(['strict', 'process'])('SIGKILL at random moments, %s durability', (durability) => {
  it(`keeps every acknowledged change across ${KILLS} kills`, async () => {
    const dataDir = mkdtempSync(join(tmpdir(), `normserve-crash-${durability}-`));
    const start = () => startIn(dataDir, durability);
    const rand = random(SEED);
    const modules: Tracked[] = [
      { name: 'crash/bn2d', spec: { kind: 'BATCH_NORM_2D', numFeatures: 3n, cumulativeAverage: false, momentum: 0.3 }, shape: [4, 3, 2, 2], acked: [] },
      { name: 'crash/bn1d', spec: { kind: 'BATCH_NORM_1D', numFeatures: 4n, cumulativeAverage: true }, shape: [6, 4], acked: [] },
    ];
    const group = { name: 'crash/group', spec: { kind: 'SYNC_BATCH_NORM', numFeatures: 2n, cumulativeAverage: true, worldSize: 2 } as ModuleConfigInput };
    const groupSteps: { r0: { count: number; mean: number[]; var: number[] }; r1: { count: number; mean: number[]; var: number[] } }[] = [];
    let committedSteps = 0;

    server = await start();
    for (const t of modules) await server.client.createModule(t.name, { kind: t.spec.kind, numFeatures: Number(t.spec.numFeatures), ...(t.spec.cumulativeAverage ? { momentum: null } : { momentum: t.spec.momentum! }) });
    await server.client.createModule(group.name, { kind: 'SYNC_BATCH_NORM', numFeatures: 2, momentum: null, worldSize: 2 });

    let seed = 1;
    const nextOp = (t: Tracked): Op => {
      const r = rand();
      if (r < 0.8) {
        const [n, c] = t.shape as [number, number];
        const s = t.shape.slice(2).reduce((a, b) => a * b, 1);
        return { kind: 'forward', shape: t.shape, data: channelData(n, c, s, rand() * 4 - 2, 0.5 + rand(), seed++) };
      }
      if (r < 0.9) return { kind: 'train', mode: rand() < 0.7 };
      if (r < 0.95) return { kind: 'load', weight: Float32Array.from({ length: c(t) }, () => rand() + 0.5) };
      return { kind: 'reset' };
    };
    const c = (t: Tracked) => t.shape[1]!;
    const rankStats = () => ({ count: 2 + Math.floor(rand() * 6), mean: [rand() * 2 - 1, rand() * 2 - 1], var: [0.5 + rand(), 0.5 + rand()] });

    for (let round = 0; round < KILLS; round++) {
      const s = server;
      const inflight = new Map<string, Op>();
      let stop = false;
      const driveModule = async (t: Tracked) => {
        while (!stop) {
          const op = nextOp(t);
          inflight.set(t.name, op);
          try {
            await apply(s.client, t.name, op);
          } catch {
            return;
          }
          t.acked.push(op);
          inflight.delete(t.name);
        }
      };
      const received: (StepStats | undefined)[] = [];
      let openStep: (typeof groupSteps)[number] | undefined;
      const driveGroup = async () => {
        while (!stop) {
          const step = groupSteps.length;
          openStep = { r0: rankStats(), r1: rankStats() };
          received.length = 0;
          const results = await Promise.allSettled(
            [openStep.r0, openStep.r1].map((st, rank) =>
              s.ranks[rank]!.gatherStats(group.name, { step, rank, worldSize: 2 }, st).then((r) => (received[rank] = r)),
            ),
          );
          if (results.some((r) => r.status === 'rejected')) return;
          groupSteps.push(openStep);
          openStep = undefined;
          committedSteps++;
        }
      };
      const work = Promise.all([...modules.map(driveModule), driveGroup()]);
      await new Promise((r) => setTimeout(r, 30 + rand() * 200));
      await kill(s);
      stop = true;
      await work;

      server = await start();
      // Every module: the acknowledged calls, with or without the one in flight.
      for (const t of modules) {
        const got = await observed(server.client, t.name);
        const withoutInflight = expectedOf(await replay(t, t.acked));
        const op = inflight.get(t.name);
        if (op === undefined) {
          expect(got, `${t.name} after kill ${round}`).toEqual(withoutInflight);
          continue;
        }
        const withInflight = expectedOf(await replay(t, [...t.acked, op]));
        const matches = [withoutInflight, withInflight].filter((e) => JSON.stringify(e, replacer) === JSON.stringify(got, replacer));
        expect(matches.length, `${t.name} after kill ${round}: state matches neither replay`).toBeGreaterThan(0);
        if (JSON.stringify(withInflight, replacer) === JSON.stringify(got, replacer)) t.acked.push(op);
      }
      // The group: each acknowledged step counted once; the step in flight committed or not.
      const counter = (await server.client.getModule(group.name)).numBatchesTracked!;
      expect(counter === BigInt(committedSteps) || (openStep !== undefined && counter === BigInt(committedSteps + 1)), `group counter ${counter} after kill ${round}`).toBe(true);
      if (openStep) {
        const step = groupSteps.length;
        const retried = await Promise.all(
          [openStep.r0, openStep.r1].map((st, rank) => server!.ranks[rank]!.gatherStats(group.name, { step, rank, worldSize: 2 }, st)),
        );
        for (const [rank, r] of received.entries()) if (r) expect(retried[rank], `a retry after kill ${round} gets the committed result`).toEqual(r);
        groupSteps.push(openStep);
        committedSteps++;
      }
      expect((await server.client.getModule(group.name)).numBatchesTracked).toBe(BigInt(committedSteps));
      const replayed = new BatchNorm(resolveConfig(group.spec));
      for (const st of groupSteps) {
        const rank = (x: typeof st.r0) => ({ count: x.count, mean: Float64Array.from(x.mean), m2: Float64Array.from(x.var, (v) => v * x.count) });
        replayed.commitGroupStep(mergeStats([rank(st.r0), rank(st.r1)], 2), replayed.plan(), torchSize([1, 2]));
      }
      expect(await observed(server.client, group.name), `group state after kill ${round}`).toEqual(expectedOf(replayed));
    }
    // The workload really ran: many acknowledged calls, and kills landed mid-work.
    expect(modules.reduce((n, t) => n + t.acked.length, 0)).toBeGreaterThan(KILLS * 5);
    expect(committedSteps).toBeGreaterThan(KILLS);
    await kill(server);
    server = undefined;
  }, 180_000);
});

function replacer(_key: string, value: unknown) {
  if (typeof value === 'bigint') return `${value}n`;
  if (value instanceof Float32Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString('hex');
  return value;
}
