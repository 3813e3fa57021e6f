/**
 * `npm run bench` (third part): what durability costs per training step. The same training
 * forward ((32, 64) through BatchNorm1d) and the same one-rank GatherStats step, against the real
 * server in strict, process and relaxed mode, each in its own process with its own data
 * directory, interleaved three times (medians of the three); and the store's own write of one
 * module (C = 64) with an fsync, timed in-process.
 */
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { NormserveClient } from '../src/client/client.js';
import { BatchNorm } from '../src/nn/batch-norm.js';
import { resolveConfig } from '../src/nn/config.js';
import { SqliteStore } from '../src/store/sqlite-store.js';
import { startServerProcess } from './server-process.js';
import { median } from './median.js';

const CALLS = 600;
/** Each mode's server runs this many times, the modes interleaved: a noisy minute hits all of them. */
const ROUNDS = 3;
const WARMUP = 50;
const log = (text: string) => process.stderr.write(`${text}\n`);

async function server(args: string[]) {
  const { child, address } = await startServerProcess(['--backend', 'reference', ...args]);
  return { child, client: new NormserveClient(address) };
}

async function time(fn: (i: number) => Promise<unknown>): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < WARMUP + CALLS; i++) {
    const t = process.hrtime.bigint();
    await fn(i);
    if (i >= WARMUP) times.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  return median(times);
}

async function endToEnd(mode: string, args: string[]) {
  log(`${mode}: ${CALLS} training forwards and ${CALLS} group steps`);
  const { child, client } = await server(args);
  await client.createModule('bn', { kind: 'BATCH_NORM_1D', numFeatures: 64 });
  await client.createModule('g', { kind: 'SYNC_BATCH_NORM', numFeatures: 64, worldSize: 1 });
  const x = { shape: [32, 64], data: Float32Array.from({ length: 32 * 64 }, (_, i) => Math.sin(i)) };
  const forward = await time(() => client.forward('bn', x));
  const stats = { count: 32, mean: Array.from({ length: 64 }, (_, i) => i / 64), var: Array.from({ length: 64 }, () => 1) };
  const step = await time((i) => client.gatherStats('g', { step: i, rank: 0, worldSize: 1 }, stats));
  client.close();
  child.kill('SIGTERM');
  await once(child, 'exit');
  return { mode, forward_ms: forward, step_ms: step };
}

async function storeWrite() {
  const store = new SqliteStore(mkdtempSync(join(tmpdir(), 'normserve-bench-')), 16);
  const m = new BatchNorm(resolveConfig({ kind: 'BATCH_NORM_2D', numFeatures: 64n, cumulativeAverage: false }));
  const times: number[] = [];
  for (let i = 0; i < WARMUP + CALLS; i++) {
    m.update({ training: i % 2 === 0 });
    const t = process.hrtime.bigint();
    await store.write({ modules: [{ name: 'bn', snapshot: m.snapshot() }] });
    if (i >= WARMUP) times.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  await store.close();
  return median(times);
}

async function main() {
  // --checkpoint-ms keeps its default (1000 ms) in process and relaxed mode.
  const modes = ['strict', 'process', 'relaxed'] as const;
  const runs = new Map(modes.map((mode) => [mode, [] as Awaited<ReturnType<typeof endToEnd>>[]]));
  for (let round = 0; round < ROUNDS; round++) for (const mode of modes) runs.get(mode)!.push(await endToEnd(mode, ['--durability', mode]));
  const summary = (mode: (typeof modes)[number]) => {
    const r = runs.get(mode)!;
    return { mode, forward_ms: median(r.map((x) => x.forward_ms)), step_ms: median(r.map((x) => x.step_ms)) };
  };
  const strict = summary('strict');
  const processMode = summary('process');
  const relaxed = summary('relaxed');
  const write = await storeWrite();
  const machine = `${cpus().length} x ${cpus()[0]?.model ?? 'cpu'}, Node ${process.version}`;
  console.log(`\nDurability cost per training step, medians of ${CALLS} calls (median of ${ROUNDS} servers per mode, interleaved); ${machine}`);
  console.log('| durability | training forward (32,64) ms | GatherStats step (1 rank, C=64) ms |');
  console.log('|------------|-----------------------------|------------------------------------|');
  for (const r of [strict, processMode, relaxed]) console.log(`| ${r.mode.padEnd(10)} | ${r.forward_ms.toFixed(3).padEnd(27)} | ${r.step_ms.toFixed(3).padEnd(34)} |`);
  const over = (r: typeof strict) => `${(r.forward_ms - relaxed.forward_ms).toFixed(3)} ms per forward and ${(r.step_ms - relaxed.step_ms).toFixed(3)} ms per step`;
  console.log(`Over relaxed, strict costs ${over(strict)}, process ${over(processMode)}; one store write (C=64, fsync): ${write.toFixed(3)} ms.`);
  mkdirSync('bench-results', { recursive: true });
  writeFileSync('bench-results/durability.json', `${JSON.stringify({ machine, date: new Date().toISOString(), strict, process: processMode, relaxed, store_write_ms: write }, null, 2)}\n`);
}

await main();
