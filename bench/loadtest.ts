/**
 * `npm run loadtest`: many concurrent clients against one server on loopback, bounded in time and
 * count. Each scenario starts a fresh server (child process, the native backend, strict durability
 * unless --durability process or relaxed),
 * then runs two kinds of workers at once:
 *   - model workers, each on its own module: training forward with save_for_backward, backward,
 *     then a state read, in a loop;
 *   - group pairs: two workers stepping a two-rank SyncBatchNorm group with GatherStats.
 * It reports calls per second, tensor MB/s, p50/p99 latency per method, errors by status, and the
 * server's peak resident memory (VmHWM). Scenarios grow in clients and tensor size to find where
 * the service stops keeping up. Only 127.0.0.1 is ever contacted.
 *
 *   node dist/bench/loadtest.js [--seconds 5] [--max-calls 20000] [--durability strict|process|relaxed]
 */
import { once } from 'node:events';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { parseArgs } from 'node:util';
import { NormserveClient, NormserveClientError } from '../src/client/client.js';
import { startServerProcess } from './server-process.js';

const { values } = parseArgs({
  options: { seconds: { type: 'string', default: '5' }, 'max-calls': { type: 'string', default: '20000' }, durability: { type: 'string', default: 'strict' } },
});
const SECONDS = Number(values.seconds);
const MAX_CALLS = Number(values['max-calls']);

const SCENARIOS = [
  { clients: 4, shape: [8, 64, 8, 8] },
  { clients: 16, shape: [8, 64, 8, 8] },
  { clients: 64, shape: [8, 64, 8, 8] },
  { clients: 128, shape: [8, 64, 8, 8] },
  { clients: 4, shape: [32, 64, 28, 28] },
  { clients: 16, shape: [32, 64, 28, 28] },
  { clients: 32, shape: [32, 64, 56, 56] },
];

const log = (text: string) => process.stderr.write(`${text}\n`);
const quantile = (sorted: number[], q: number) => (sorted.length === 0 ? 0 : sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!);

async function startServer() {
  // The per-call log goes to a pipe that is read and dropped: its cost is part of the load.
  const { child, address } = await startServerProcess(['--backend', 'native', '--durability', values.durability!]);
  return { server: child, address };
}

function peakRss(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? 0);
  return kb * 1024;
}

async function run(clients: number, shape: number[]) {
  const { server, address } = await startServer();
  const elements = shape.reduce((a, b) => a * b, 1);
  const data = Float32Array.from({ length: elements }, (_, i) => Math.sin(i) * 2 + 1);
  const latency = new Map<string, number[]>();
  const errors = new Map<string, number>();
  let calls = 0;
  let bytes = 0;
  const deadline = Date.now() + SECONDS * 1000;
  const going = () => Date.now() < deadline && calls < MAX_CALLS;
  const timed = async <T>(method: string, moved: number, fn: () => Promise<T>): Promise<T | undefined> => {
    const t = process.hrtime.bigint();
    try {
      const r = await fn();
      const list = latency.get(method) ?? [];
      list.push(Number(process.hrtime.bigint() - t) / 1e6);
      latency.set(method, list);
      bytes += moved;
      return r;
    } catch (err) {
      const code = err instanceof NormserveClientError ? String(err.code) : 'client';
      errors.set(`${method}:${code}`, (errors.get(`${method}:${code}`) ?? 0) + 1);
      return undefined;
    } finally {
      calls++;
    }
  };

  // Each NormserveClient has a connection of its own, as training processes would (docs/load.md:
  // on grpc-js's one shared connection, two Node.js ends with large windows can deadlock).
  const pairs = Math.max(1, Math.floor(clients / 4));
  const models = clients - 2 * pairs;
  const admin = new NormserveClient(address);
  for (let m = 0; m < models; m++) await admin.createModule(`load/m${m}`, { kind: shape.length === 4 ? 'BATCH_NORM_2D' : 'BATCH_NORM_1D', numFeatures: shape[1]! });
  for (let p = 0; p < pairs; p++) await admin.createModule(`load/g${p}`, { kind: 'SYNC_BATCH_NORM', numFeatures: 64, worldSize: 2 });

  const workers: Promise<void>[] = [];
  for (let m = 0; m < models; m++) {
    workers.push(
      (async () => {
        const c = new NormserveClient(address);
        const name = `load/m${m}`;
        while (going()) {
          const f = await timed('Forward', 8 * elements, () => c.forward(name, { shape, data }, { saveForBackward: true }));
          if (f) await timed('Backward', 8 * elements, () => c.backward(name, f.contextId, { shape, data }));
          await timed('GetState', 0, () => c.getState(name));
        }
        c.close();
      })(),
    );
  }
  for (let p = 0; p < pairs; p++) {
    const stats = { count: 64, mean: Array.from({ length: 64 }, (_, i) => i / 64), var: Array.from({ length: 64 }, () => 1) };
    // Both ranks must stop after the same step, or one would wait for the other: the first to see
    // time run out ends the group after the newest step either rank has started.
    const group = { started: -1, stopAt: Number.POSITIVE_INFINITY };
    for (let rank = 0; rank < 2; rank++) {
      workers.push(
        (async () => {
          const c = new NormserveClient(address);
          for (let step = 0; ; step++) {
            if (!going() && group.stopAt === Number.POSITIVE_INFINITY) group.stopAt = group.started + 1;
            if (step >= group.stopAt) break;
            group.started = Math.max(group.started, step);
            const r = await timed('GatherStats', 0, () => c.gatherStats(`load/g${p}`, { step, rank, worldSize: 2 }, stats));
            if (!r) break;
          }
          c.close();
        })(),
      );
    }
  }
  const started = Date.now();
  await Promise.all(workers);
  const seconds = (Date.now() - started) / 1000;
  const rss = peakRss(server.pid!);
  admin.close();
  server.kill('SIGKILL');
  await once(server, 'exit');

  const methods = Object.fromEntries(
    [...latency].map(([m, list]) => {
      list.sort((a, b) => a - b);
      return [m, { calls: list.length, p50_ms: quantile(list, 0.5), p99_ms: quantile(list, 0.99) }];
    }),
  );
  return {
    clients,
    shape: `(${shape.join(',')})`,
    tensor_mb: (elements * 4) / 1e6,
    seconds,
    calls,
    calls_per_s: calls / seconds,
    mb_per_s: bytes / 1e6 / seconds,
    methods,
    errors: Object.fromEntries(errors),
    server_peak_rss_mb: rss / 1e6,
  };
}

async function main() {
  const rows = [];
  for (const s of SCENARIOS) {
    log(`${s.clients} clients, tensor (${s.shape.join(',')}) for up to ${SECONDS} s or ${MAX_CALLS} calls`);
    const r = await run(s.clients, s.shape);
    log(`  ${r.calls} calls, ${r.calls_per_s.toFixed(0)}/s, ${Object.keys(r.errors).length ? `errors ${JSON.stringify(r.errors)}` : 'no errors'}, peak RSS ${r.server_peak_rss_mb.toFixed(0)} MB`);
    rows.push(r);
  }
  const machine = `${cpus().length} x ${cpus()[0]?.model ?? 'cpu'}, Node ${process.version}`;
  console.log(`\nLoad test on loopback, server and clients on one machine, durability ${values.durability}; ${machine}`);
  console.log('| clients | tensor | calls/s | MB/s | Forward p50/p99 ms | Backward p50/p99 ms | GatherStats p50/p99 ms | errors | server peak RSS MB |');
  console.log('|---|---|---|---|---|---|---|---|---|');
  const pp = (m?: { p50_ms: number; p99_ms: number }) => (m ? `${m.p50_ms.toFixed(1)} / ${m.p99_ms.toFixed(1)}` : '-');
  for (const r of rows) {
    const errs = Object.entries(r.errors).map(([k, v]) => `${k}×${v}`).join(' ') || '0';
    console.log(
      `| ${r.clients} | ${r.shape} | ${r.calls_per_s.toFixed(0)} | ${r.mb_per_s.toFixed(0)} | ${pp(r.methods.Forward)} | ${pp(r.methods.Backward)} | ${pp(r.methods.GatherStats)} | ${errs} | ${r.server_peak_rss_mb.toFixed(0)} |`,
    );
  }
  mkdirSync('bench-results', { recursive: true });
  writeFileSync('bench-results/loadtest.json', `${JSON.stringify({ machine, date: new Date().toISOString(), seconds: SECONDS, max_calls: MAX_CALLS, rows }, null, 2)}\n`);
  log('wrote bench-results/loadtest.json');
}

await main();
