/**
 * `npm run bench` (second part): the GatherStats round trip of a SyncBatchNorm group, C = 64, with
 * 2, 4 and 8 ranks, each rank a separate process and the server another, all on loopback, with
 * strict and with relaxed durability. Reports
 * p50 and p99 of the per-call round trip over every rank's calls, and of the slowest rank per step
 * (what a training step waits for). Progress on stderr; a table on stdout; JSON in
 * bench-results/sync-latency.json.
 *
 * For scale: a gloo all_gather of 129 floats between 2 local processes takes about 0.13 ms median
 * on these machines (batchnorm-semantics.md §11).
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { NormserveClient } from '../src/client/client.js';
import { startServerProcess } from './server-process.js';

const CHANNELS = 64;
const GROUPS: { world: number; warmup: number; steps: number }[] = [
  { world: 2, warmup: 200, steps: 2000 },
  { world: 4, warmup: 100, steps: 1000 },
  { world: 8, warmup: 50, steps: 500 },
];
const log = (text: string) => process.stderr.write(`${text}\n`);
const quantile = (sorted: number[], q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;

async function startServer(durability: string) {
  const { child, address } = await startServerProcess(['--backend', 'reference', '--durability', durability]);
  return { server: child, address };
}

async function main() {
  const rows = [];
  // Strict durability writes every step with an fsync before answering; relaxed shows the
  // coordinator and the transport alone.
  for (const durability of ['strict', 'relaxed']) {
    const { server, address } = await startServer(durability);
    const admin = new NormserveClient(address);
    for (const { world, warmup, steps } of GROUPS) {
      const name = `bench/group-${world}`;
      await admin.createModule(name, { kind: 'SYNC_BATCH_NORM', numFeatures: CHANNELS, worldSize: world });
      log(`${durability}, ${world} ranks: ${warmup} warm-up and ${steps} measured steps`);
      const ranks = Array.from({ length: world }, (_, rank) => {
        const child = spawn(process.execPath, ['dist/bench/sync-rank.js', address, name, String(rank), String(world), String(CHANNELS), String(warmup), String(steps)], {
          stdio: ['ignore', 'pipe', 'inherit'],
        });
        let out = '';
        child.stdout!.on('data', (d) => (out += d));
        return once(child, 'exit').then(([code]) => {
          if (code !== 0) throw new Error(`rank ${rank} exited with ${code}`);
          return JSON.parse(out) as number[];
        });
      });
      const times = await Promise.all(ranks);
      const all = times.flat().sort((a, b) => a - b);
      const slowest = Array.from({ length: steps }, (_, s) => Math.max(...times.map((t) => t[s]!))).sort((a, b) => a - b);
      const row = {
        durability,
        ranks: world,
        channels: CHANNELS,
        steps,
        p50_ms: quantile(all, 0.5),
        p99_ms: quantile(all, 0.99),
        slowest_rank_p50_ms: quantile(slowest, 0.5),
        slowest_rank_p99_ms: quantile(slowest, 0.99),
      };
      rows.push(row);
      log(`  p50 ${row.p50_ms.toFixed(3)} ms, p99 ${row.p99_ms.toFixed(3)} ms`);
    }
    admin.close();
    server.kill('SIGTERM');
    await once(server, 'exit');
  }

  const machine = `${cpus().length} x ${cpus()[0]?.model ?? 'cpu'}, Node ${process.version}`;
  console.log(`\nGatherStats round trip, C=${CHANNELS}, each rank and the server in its own process on loopback; ${machine}`);
  console.log('| durability | ranks | steps | p50 ms | p99 ms | slowest rank p50 ms | slowest rank p99 ms |');
  console.log('|------------|-------|-------|--------|--------|---------------------|---------------------|');
  for (const r of rows) {
    console.log(
      `| ${r.durability.padEnd(10)} | ${String(r.ranks).padEnd(5)} | ${String(r.steps).padEnd(5)} | ${r.p50_ms.toFixed(3).padEnd(6)} | ${r.p99_ms.toFixed(3).padEnd(6)} | ${r.slowest_rank_p50_ms.toFixed(3).padEnd(19)} | ${r.slowest_rank_p99_ms.toFixed(3).padEnd(19)} |`,
    );
  }
  console.log('Reference: gloo all_gather of 129 floats between 2 local processes, about 0.13 ms median (same machines).');
  mkdirSync('bench-results', { recursive: true });
  writeFileSync('bench-results/sync-latency.json', `${JSON.stringify({ machine, date: new Date().toISOString(), rows }, null, 2)}\n`);
  log('wrote bench-results/sync-latency.json');
}

await main();
