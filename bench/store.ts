/**
 * `npm run bench` (fourth part): what the shared etcd store costs beside the default SQLite store,
 * and how long a module is out of service when its owner dies.
 *
 * 1. A training Forward (batch statistics, running-statistic update, normalisation, and the
 *    module's new state committed before the reply) on (32,64,56,56) and (4,16,8,8), against two
 *    real servers (`dist/src/main.js`, native backend) side by side: one on `--store sqlite:DIR`
 *    (strict: an fsync per change), one on `--store etcd://...` with a real etcd (Debian's
 *    etcd-server, with its data in a temporary directory: etcd fsyncs its log too). Calls alternate
 *    between the two servers; medians.
 * 2. Group commit: 16 modules of (4,16,8,8), one training Forward in flight on each at once, as
 *    the 16 BatchNorm layers of one model's step would be when called concurrently: forwards per
 *    second through each store.
 * 3. Takeover: three replicas on one etcd, 12 modules; the replica that owns the most is killed
 *    with SIGKILL, and a client that knows a survivor calls a training Forward on each of the
 *    victim's modules in a loop (no retry policy: a new attempt every 10 ms) until the call
 *    succeeds. Reported: SIGKILL to the first module served again, and to the last, for the
 *    default lease (10 s) and for a 2 s lease.
 */
import { once } from 'node:events';
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { Etcd3 } from 'etcd3';
import { NormserveClient, type TensorData } from '../src/client/client.js';
import { SLOTS } from '../src/cluster/slots.js';
import { startEtcd, type EtcdServer } from './etcd-process.js';
import { startServerProcess, type ServerProcess } from './server-process.js';
import { median } from './median.js';

const QUICK = process.argv.includes('--quick');
const log = (text: string) => process.stderr.write(`${text}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const SHAPES = [
  { label: '(32,64,56,56)', shape: [32, 64, 56, 56], runs: QUICK ? 5 : 40 },
  { label: '(4,16,8,8)', shape: [4, 16, 8, 8], runs: QUICK ? 50 : 1000 },
];
const TAKEOVER_TTLS = [10, 2];
const TAKEOVER_TRIALS = QUICK ? 1 : 3;

function tensor(shape: number[]): TensorData {
  const n = shape.reduce((a, b) => a * b, 1);
  return { shape, data: Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.37) * 2 + 0.5) };
}

async function stop(server: ServerProcess): Promise<void> {
  if (server.child.exitCode !== null || server.child.signalCode !== null) return;
  server.child.kill('SIGTERM');
  await once(server.child, 'exit');
}

async function until(done: () => Promise<boolean>, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!(await done().catch(() => false))) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(50);
  }
}

/** A replica on `etcd` under `prefix`, once its readiness says it serves. */
async function replica(etcd: EtcdServer, prefix: string, ttl = 10): Promise<ServerProcess> {
  const server = await startServerProcess(['--backend', 'native', '--store', `etcd://${etcd.endpoint}/${prefix}`, '--lease-ttl-seconds', String(ttl)]);
  const health = new NormserveClient(server.address, { retry: false });
  await until(async () => (await health.health('normserve.v1.BatchNormService')) === 'SERVING', 20_000, `${server.address} to serve`);
  await health.close();
  return server;
}

/** Waits until etcd says every slot is owned, by exactly `members` replicas. */
async function settled(kv: Etcd3, prefix: string, members: number): Promise<void> {
  const ns = kv.namespace(`/${prefix}/`);
  await until(
    async () => {
      const owners = Object.values(await ns.getAll().prefix('slots/').strings());
      return owners.length === SLOTS && new Set(owners).size === members && Object.keys(await ns.getAll().prefix('members/').strings()).length === members;
    },
    30_000,
    'the slots to settle',
  );
}

async function forwardCost(sqlite: NormserveClient, etcd: NormserveClient) {
  const rows = [];
  for (const { label, shape, runs } of SHAPES) {
    const name = `bench/store/${shape.join('x')}`;
    const x = tensor(shape);
    for (const c of [sqlite, etcd]) await c.createModule(name, { kind: 'BATCH_NORM_2D', numFeatures: shape[1]! });
    const times = { sqlite: [] as number[], etcd: [] as number[] };
    const warmup = 3;
    for (let i = 0; i < warmup + runs; i++) {
      for (const [key, c] of [['sqlite', sqlite], ['etcd', etcd]] as const) {
        const t = process.hrtime.bigint();
        await c.forward(name, x);
        if (i >= warmup) times[key].push(Number(process.hrtime.bigint() - t) / 1e6);
      }
    }
    const row = { shape: label, runs, sqlite_ms: median(times.sqlite), etcd_ms: median(times.etcd) };
    log(`forward ${label}: sqlite ${row.sqlite_ms.toFixed(3)} ms, etcd ${row.etcd_ms.toFixed(3)} ms`);
    rows.push(row);
  }
  return rows;
}

async function groupCommit(sqlite: NormserveClient, etcd: NormserveClient) {
  const modules = 16;
  const rounds = QUICK ? 20 : 300;
  const shape = [4, 16, 8, 8];
  const x = tensor(shape);
  const out: Record<string, number> = {};
  for (const [key, c] of [['sqlite', sqlite], ['etcd', etcd]] as const) {
    const names = Array.from({ length: modules }, (_, i) => `bench/store/group-${i}`);
    for (const name of names) await c.createModule(name, { kind: 'BATCH_NORM_2D', numFeatures: 16 });
    for (let r = 0; r < 10; r++) await Promise.all(names.map((n) => c.forward(n, x)));
    const t = process.hrtime.bigint();
    for (let r = 0; r < rounds; r++) await Promise.all(names.map((n) => c.forward(n, x)));
    out[key] = (modules * rounds) / (Number(process.hrtime.bigint() - t) / 1e9);
    log(`group commit, ${modules} modules at once: ${key} ${out[key]!.toFixed(0)} forwards/s`);
  }
  return { modules, shape: '(4,16,8,8)', sqlite_per_s: out.sqlite!, etcd_per_s: out.etcd! };
}

async function takeover(etcd: EtcdServer, kv: Etcd3, ttl: number, trial: number) {
  const prefix = `bench-takeover-${ttl}-${trial}`;
  const replicas = [await replica(etcd, prefix, ttl), await replica(etcd, prefix, ttl), await replica(etcd, prefix, ttl)];
  await settled(kv, prefix, 3);
  const client = new NormserveClient(replicas[0]!.address);
  const names = Array.from({ length: 12 }, (_, i) => `bench/takeover/m${i}`);
  const x = tensor([4, 16, 8, 8]);
  for (const name of names) {
    await client.createModule(name, { kind: 'BATCH_NORM_2D', numFeatures: 16 });
    await client.forward(name, x);
  }
  // Replicas advertise this host's name and their port (no --advertise-address here): match the port.
  const port = (address: string) => address.slice(address.lastIndexOf(':'));
  const owned = (r: ServerProcess) => names.filter((n) => port(client.addressFor(n)) === port(r.address));
  const victim = replicas.slice(1).reduce((a, b) => (owned(b).length > owned(a).length ? b : a));
  const lost = owned(victim);
  if (lost.length === 0) throw new Error('no replica but the first owns any of the modules');
  const probe = new NormserveClient(replicas[0]!.address, { retry: false });
  const killed = Date.now();
  victim.child.kill('SIGKILL');
  await once(victim.child, 'exit');
  const served = await Promise.all(
    lost.map(async (name) => {
      for (;;) {
        try {
          await probe.forward(name, x);
          return Date.now() - killed;
        } catch {
          if (Date.now() - killed > 60_000) throw new Error(`${name} not served again within 60 s of the SIGKILL`);
          await sleep(10);
        }
      }
    }),
  );
  for (const c of [client, probe]) await c.close();
  for (const r of replicas) await stop(r);
  const row = { lease_ttl_s: ttl, trial, modules: lost.length, first_ms: Math.min(...served), last_ms: Math.max(...served) };
  log(`takeover, ${ttl} s lease, trial ${trial}: ${row.modules} modules, first served again after ${row.first_ms} ms, last after ${row.last_ms} ms`);
  return row;
}

async function main() {
  const machine = `${cpus().length} x ${cpus()[0]?.model ?? 'cpu'}, Node ${process.version}`;
  const etcd = await startEtcd();
  const kv = new Etcd3({ hosts: etcd.endpoint });
  try {
    const sqliteServer = await startServerProcess(['--backend', 'native']);
    const etcdServer = await replica(etcd, 'bench-store');
    const sqlite = new NormserveClient(sqliteServer.address);
    const shared = new NormserveClient(etcdServer.address);
    const forward = await forwardCost(sqlite, shared);
    const group = await groupCommit(sqlite, shared);
    for (const c of [sqlite, shared]) await c.close();
    for (const s of [sqliteServer, etcdServer]) await stop(s);

    const takeovers = [];
    for (const ttl of TAKEOVER_TTLS) for (let t = 0; t < TAKEOVER_TRIALS; t++) takeovers.push(await takeover(etcd, kv, ttl, t));

    console.log(`\nStores: a training Forward through the SQLite store and through etcd, medians, calls alternating; ${machine}`);
    console.log('| shape | runs | sqlite ms | etcd ms | etcd − sqlite ms | etcd ÷ sqlite |');
    console.log('|-------|------|-----------|---------|------------------|---------------|');
    for (const r of forward) {
      console.log(`| ${r.shape} | ${r.runs} | ${r.sqlite_ms.toFixed(3)} | ${r.etcd_ms.toFixed(3)} | ${(r.etcd_ms - r.sqlite_ms).toFixed(3)} | ${(r.etcd_ms / r.sqlite_ms).toFixed(2)} |`);
    }
    console.log(`Group commit, ${group.modules} modules ${group.shape} with a forward each in flight: sqlite ${group.sqlite_per_s.toFixed(0)}/s, etcd ${group.etcd_per_s.toFixed(0)}/s.`);
    console.log('\nTakeover after SIGKILL of the owner (three replicas; a client that knows a survivor retries every 10 ms):');
    console.log('| lease TTL s | median first module served ms | median last module served ms | trials |');
    console.log('|-------------|-------------------------------|------------------------------|--------|');
    for (const ttl of TAKEOVER_TTLS) {
      const rows = takeovers.filter((r) => r.lease_ttl_s === ttl);
      console.log(`| ${ttl} | ${median(rows.map((r) => r.first_ms))} | ${median(rows.map((r) => r.last_ms))} | ${rows.length} |`);
    }
    mkdirSync('bench-results', { recursive: true });
    writeFileSync('bench-results/store.json', `${JSON.stringify({ machine, date: new Date().toISOString(), quick: QUICK, forward, group_commit: group, takeover: takeovers }, null, 2)}\n`);
  } finally {
    kv.close();
    await etcd.stop();
  }
}

await main();
