/**
 * Replicas that share their modules through a real etcd (test/support/etcd.ts), as the real
 * program (`node dist/src/main.js --store etcd://...`) in child processes on loopback: ownership
 * split by etcd, clients led to owners, SIGKILL of an owner in the middle of training (every
 * acknowledged forward is still there, checked against a replay in PyTorch), a replica added and
 * one removed mid-run, a sync group whose coordinator dies mid-step, and etcd itself going away.
 */
import { spawn } from 'node:child_process';
import { credentials } from '@grpc/grpc-js';
import { Etcd3 } from 'etcd3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient, type ModuleSpec, type TensorData } from '../../src/client/client.js';
import type { NormserveClientError } from '../../src/client/errors.js';
import { slotOf, SLOTS } from '../../src/cluster/slots.js';
import { Status } from '../../src/errors.js';
import { grpcObject } from '../../src/wire/proto.js';
import { channelData } from '../support/data.js';
import { settled as settledOn, slotsByAddress as slotsOf, startEtcd, startReplica as startEtcdReplica, type EtcdServer, type Replica } from '../support/etcd.js';
import { until } from '../support/until.js';
import { freePorts, runNode, startMain, type Started } from '../support/main-process.js';
import { rejection } from '../support/rejection.js';

const PYTHON = '/usr/bin/python3';
const TTL_SECONDS = 2;

let etcd: EtcdServer;
let kv: Etcd3;
const started: Started[] = [];

beforeAll(async () => {
  etcd = await startEtcd();
  kv = new Etcd3({ hosts: etcd.endpoint });
}, 30_000);

afterAll(async () => {
  for (const r of started) if (r.child.exitCode === null && r.child.signalCode === null) r.child.kill('SIGKILL');
  kv?.close();
  await etcd?.stop();
});

/** A replica on `prefix` of the suite's etcd (or `endpoint`), killed at the end if still running. */
async function startReplica(prefix: string, endpoint = etcd.endpoint, extra: string[] = []): Promise<Replica> {
  const replica = await startEtcdReplica(endpoint, prefix, TTL_SECONDS, extra);
  started.push(replica.process);
  return replica;
}

const slotsByAddress = (prefix: string) => slotsOf(kv, prefix);
const settled = (prefix: string, replicas: readonly Replica[]) => settledOn(kv, prefix, replicas);

const sigkill = async (r: Replica) => {
  r.process.child.kill('SIGKILL');
  await r.process.exit;
};

// Training runs checked against PyTorch.

interface Trained {
  readonly name: string;
  readonly spec: ModuleSpec;
  readonly shape: number[];
  /** The inputs of the forwards that are in the module: acknowledged, or found there afterwards. */
  readonly applied: TensorData[];
  /** A forward whose answer was lost: it may or may not be in the module. */
  pending?: TensorData;
  refused: number;
}

function trained(name: string, i: number): Trained {
  const specs: [ModuleSpec, number[]][] = [
    [{ kind: 'BATCH_NORM_2D', numFeatures: 3 }, [4, 3, 2, 2]],
    [{ kind: 'BATCH_NORM_1D', numFeatures: 4, momentum: null }, [6, 4]],
    [{ kind: 'BATCH_NORM_1D', numFeatures: 2, momentum: 0.3 }, [3, 2, 5]],
  ];
  const [spec, shape] = specs[i % specs.length]!;
  return { name, spec, shape, applied: [], refused: 0 };
}

const input = (m: Trained, step: number, salt: number): TensorData => {
  const [n, c, ...rest] = m.shape;
  const s = rest.reduce((a, b) => a * b, 1);
  return { shape: m.shape, data: channelData(n!, c!, s, 0.5 * (step % 5) - 1, 1 + (step % 3) * 0.5, 1 + step * 131 + salt * 7919) };
};

/** A forward whose outcome the caller cannot know: the transport failed, or the store did not confirm. */
const unknownOutcome = (e: NormserveClientError) => (e.code === Status.UNAVAILABLE && e.reason === undefined) || e.code === Status.UNKNOWN || e.code === Status.DEADLINE_EXCEEDED;

/** Reads back a module whose last forward is pending, and decides from its counter whether it landed. */
async function settle(client: NormserveClient, m: Trained): Promise<void> {
  if (!m.pending) return;
  let nbt: bigint | undefined;
  await until(
    async () => {
      nbt = await client.getState(m.name).then((s) => s.num_batches_tracked as bigint, () => undefined);
      return nbt !== undefined;
    },
    30_000,
    `the state of ${m.name} to be readable again`,
  );
  if (nbt === BigInt(m.applied.length + 1)) m.applied.push(m.pending);
  else expect(nbt, `${m.name}: neither with nor without its pending forward`).toBe(BigInt(m.applied.length));
  m.pending = undefined;
}

/** One training forward: recorded as applied, refused (nothing changed), or pending. */
async function trainStep(client: NormserveClient, m: Trained, x: TensorData): Promise<void> {
  await settle(client, m);
  try {
    await client.forward(m.name, x);
    m.applied.push(x);
  } catch (err) {
    const e = err as NormserveClientError;
    if (unknownOutcome(e)) m.pending = x;
    else if (e.code === Status.UNAVAILABLE) m.refused++;
    else throw err;
  }
}

/** PyTorch's running statistics and counter after each module's applied forwards. */
async function replay(modules: readonly Trained[]): Promise<Record<string, { running_mean: number[]; running_var: number[]; num_batches_tracked: number }>> {
  const spec = {
    modules: modules.map((m) => ({
      name: m.name,
      kind: m.spec.kind,
      num_features: m.spec.numFeatures,
      eps: 1e-5,
      momentum: m.spec.momentum === undefined ? 0.1 : m.spec.momentum,
      inputs: m.applied.map((x) => ({ shape: x.shape, data: Buffer.from(x.data.buffer, x.data.byteOffset, x.data.byteLength).toString('base64') })),
    })),
  };
  const child = spawn(PYTHON, ['test/python/replay_batchnorm.py'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (err += d));
  child.stdin.end(JSON.stringify(spec));
  const code = await new Promise<number | null>((r) => child.on('exit', r));
  expect(code, `replay_batchnorm.py: ${err}`).toBe(0);
  return JSON.parse(out);
}

/** Every module's state on the cluster equals PyTorch's replay of its applied forwards. */
async function expectReplayed(client: NormserveClient, modules: readonly Trained[]): Promise<void> {
  for (const m of modules) await settle(client, m);
  const expected = await replay(modules);
  for (const m of modules) {
    const state = await client.getState(m.name);
    const want = expected[m.name]!;
    expect(state.num_batches_tracked, m.name).toBe(BigInt(want.num_batches_tracked));
    expect(want.num_batches_tracked, m.name).toBe(m.applied.length);
    for (const key of ['running_mean', 'running_var'] as const) {
      const got = state[key] as Float32Array;
      want[key].forEach((v, i) => expect(Math.abs(got[i]! - v), `${m.name} ${key}[${i}]: ${got[i]} vs PyTorch ${v}`).toBeLessThanOrEqual(1e-6 + 1e-5 * Math.abs(v)));
    }
  }
}

async function createAll(client: NormserveClient, modules: readonly Trained[]): Promise<void> {
  for (const m of modules) await client.createModule(m.name, m.spec);
}

/** Three replicas on `prefix`, settled; a client that knows the first; `count` modules created through it. */
async function trainingCluster(prefix: string, count: number) {
  const replicas = [await startReplica(prefix), await startReplica(prefix), await startReplica(prefix)];
  await settled(prefix, replicas);
  const client = new NormserveClient(replicas[0]!.address);
  const modules = Array.from({ length: count }, (_, i) => trained(`${prefix}/m${i}`, i));
  await createAll(client, modules);
  return { replicas, client, modules };
}

describe('three replicas on one etcd', () => {
  const prefix = 'three';
  let replicas: Replica[];
  let direct: NormserveClient[];

  beforeAll(async () => {
    replicas = [];
    for (let i = 0; i < 3; i++) replicas.push(await startReplica(prefix));
    await settled(prefix, replicas);
    direct = replicas.map((r) => new NormserveClient(r.address, { followOwner: false, retry: false }));
  }, 60_000);

  afterAll(async () => {
    for (const c of direct ?? []) await c.close();
    expect(await Promise.all(replicas.map((r) => r.process.stop()))).toEqual(replicas.map(() => 0));
  });

  it('split the slots, lead a client that knows one replica to each owner, and list the whole cluster anywhere', async () => {
    const counts = await slotsByAddress(prefix);
    // Rendezvous over three members: each takes about a third.
    for (const r of replicas) expect(counts.get(r.address)).toBeGreaterThan(SLOTS / 6);
    const client = new NormserveClient(replicas[0]!.address);
    const names = Array.from({ length: 12 }, (_, i) => `split/m${i}`);
    for (const name of names) {
      await client.createModule(name, { kind: 'BATCH_NORM_1D', numFeatures: 3 });
      await client.forward(name, { shape: [4, 3], data: channelData(4, 3, 1, 1, 2) });
    }
    const owners = new Set(names.map((n) => client.addressFor(n)));
    expect(owners.size).toBeGreaterThan(1);
    for (const name of names) {
      const owner = direct[replicas.findIndex((r) => r.address === client.addressFor(name))]!;
      expect((await owner.getModule(name)).numBatchesTracked).toBe(1n);
    }
    for (const d of direct) expect((await d.listModules(1000)).modules.map((m) => m.name).filter((n) => n.startsWith('split/')).sort()).toEqual([...names].sort());
    await client.close();
  });

  it("refuse another replica's module with FAILED_PRECONDITION, the owner's address and slot, changing nothing", async () => {
    const client = new NormserveClient(replicas[1]!.address);
    const name = 'refused/bn';
    await client.createModule(name, { kind: 'BATCH_NORM_2D', numFeatures: 2 });
    const ownerAt = replicas.findIndex((r) => r.address === client.addressFor(name));
    const wrong = direct[(ownerAt + 1) % 3]!;
    const err = await rejection(wrong.forward(name, { shape: [2, 2, 1, 1], data: Float32Array.of(1, 2, 3, 4) }));
    expect(err.code).toBe(Status.FAILED_PRECONDITION);
    expect(err.reason).toBe('BN_ERR_NOT_OWNER');
    expect(err.info).toMatchObject({ owner: replicas[ownerAt]!.address, slot: String(slotOf(name)) });
    expect(err.message).toMatch(
      new RegExp(`^module 'refused/bn' is in slot ${slotOf(name)}, which replica \\S+ at ${replicas[ownerAt]!.address} owns, not this one \\(\\S+ at ${replicas[(ownerAt + 1) % 3]!.address}\\); send its calls there`),
    );
    for (const transport of ['unary', 'stream'] as const) {
      expect((await rejection(wrong.forward(name, { shape: [2, 2, 1, 1], data: Float32Array.of(1, 2, 3, 4) }, { transport }))).reason).toBe('BN_ERR_NOT_OWNER');
    }
    expect((await rejection(wrong.createModule(name, { kind: 'BATCH_NORM_2D', numFeatures: 2 }))).reason).toBe('BN_ERR_NOT_OWNER');
    // The Open Inference Protocol passes the same gate: ModelReady on the wrong replica names the owner.
    const inference = new grpcObject.inference.GRPCInferenceService(replicas[(ownerAt + 1) % 3]!.address, credentials.createInsecure());
    const ready = await new Promise<{ code: number; details: string }>((resolve) => inference.ModelReady({ name }, (err) => resolve(err as never)));
    inference.close();
    expect(ready.code).toBe(Status.FAILED_PRECONDITION);
    expect(ready.details).toContain(`which replica`);
    expect(ready.details).toContain(replicas[ownerAt]!.address);
    // Through the owner, the name is taken, and nothing moved.
    expect((await rejection(client.createModule(name, { kind: 'BATCH_NORM_2D', numFeatures: 2 }))).code).toBe(Status.ALREADY_EXISTS);
    expect((await direct[ownerAt]!.getModule(name)).numBatchesTracked).toBe(0n);
    await client.close();
  });

  it('bring all ranks of a SyncBatchNorm group to its owner, whichever replica each rank knows', async () => {
    const name = 'group/bn';
    const ranks = replicas.map((r) => new NormserveClient(r.address));
    await ranks[0]!.createModule(name, { kind: 'SYNC_BATCH_NORM', numFeatures: 2, worldSize: 3 });
    const shards = [0, 1, 2].map((r) => channelData(4, 2, 3, r, 1 + r, 10 + r));
    const outs = await Promise.all(ranks.map((c, rank) => c.syncForward(name, { step: 0n, rank, worldSize: 3 }, { shape: [4, 2, 3], data: shards[rank]! })));
    const all = shards.flatMap((s) => [...s]);
    for (let ch = 0; ch < 2; ch++) {
      const values = all.filter((_, i) => Math.floor(i / 3) % 2 === ch);
      const mean = values.reduce((a, v) => a + v, 0) / values.length;
      for (const o of outs) {
        expect([o.synced, o.count]).toEqual([true, 36]);
        expect(o.mean[ch]).toBeCloseTo(mean, 5);
      }
    }
    expect(new Set(ranks.map((c) => c.addressFor(name))).size).toBe(1);
    for (const c of ranks) await c.close();
  });
});

describe('an owner killed with SIGKILL in the middle of training', () => {
  it('loses no acknowledged forward: the survivors take its modules over from etcd, as PyTorch replays them', async () => {
    const prefix = 'kill';
    const { replicas, client, modules } = await trainingCluster(prefix, 12);
    const steps = 16;
    let victim: Replica | undefined;
    let killedAt = 0;
    let victims: Trained[] = [];
    let firstServed = 0;
    for (let step = 0; step < steps; step++) {
      if (step === 6) {
        // The replica that owns the most modules, mid-run, with forwards on their way.
        const owned = (r: Replica) => modules.filter((m) => client.addressFor(m.name) === r.address);
        victim = replicas.slice(1).reduce((a, b) => (owned(b).length > owned(a).length ? b : a));
        victims = owned(victim);
        const inFlight = Promise.all(modules.map((m, i) => trainStep(client, m, input(m, step, i))));
        await new Promise((r) => setTimeout(r, 2));
        killedAt = Date.now();
        await sigkill(victim);
        await inFlight;
        continue;
      }
      await Promise.all(modules.map((m, i) => trainStep(client, m, input(m, step, i))));
      if (victim && firstServed === 0 && victims.every((m) => m.applied.length > 7 && !m.pending)) firstServed = Date.now();
    }
    expect(victims.length).toBeGreaterThan(0);
    await expectReplayed(client, modules);
    // Every module lives on a survivor now, and the dead replica's slots went to them.
    for (const m of modules) expect(client.addressFor(m.name)).not.toBe(victim!.address);
    const counts = await settled(prefix, replicas.filter((r) => r !== victim));
    expect(counts.has(victim!.address)).toBe(false);
    const takeover = (firstServed || Date.now()) - killedAt;
    process.stdout.write(`[etcd-cluster] takeover after SIGKILL with a ${TTL_SECONDS} s lease: ${takeover} ms\n`);
    expect(takeover).toBeLessThan(TTL_SECONDS * 1000 + 15_000);
    await client.close();
    for (const r of replicas) if (r !== victim) expect(await r.process.stop()).toBe(0);
  }, 120_000);
});

describe('replicas added and removed while training', () => {
  it('move ownership on their own, with nothing lost: a fourth replica joins, then one leaves with SIGTERM', async () => {
    const prefix = 'resize';
    // Enough modules that the fourth replica, with about a quarter of the slots, owns some of them.
    const { replicas, client, modules } = await trainingCluster(prefix, 32);
    let joining: Promise<Replica> | undefined;
    let leaving: Promise<number | null> | undefined;
    for (let step = 0; step < 24; step++) {
      if (step === 4) joining = startReplica(prefix);
      if (step === 12) {
        replicas.push(await joining!);
        await settled(prefix, replicas);
      }
      if (step === 14) {
        // The new replica took slots from the others, and the client was led to it for some modules.
        expect(new Set(modules.map((m) => client.addressFor(m.name)))).toContain(replicas[3]!.address);
        leaving = replicas[1]!.process.stop();
      }
      await Promise.all(modules.map((m, i) => trainStep(client, m, input(m, step, i))));
    }
    expect(await leaving).toBe(0);
    const remaining = replicas.filter((_, i) => i !== 1);
    await settled(prefix, remaining);
    // A graceful move never leaves a forward in doubt.
    expect(modules.filter((m) => m.pending)).toEqual([]);
    expect(modules.reduce((n, m) => n + m.refused, 0)).toBe(0);
    await expectReplayed(client, modules);
    await client.close();
    for (const r of remaining) expect(await r.process.stop()).toBe(0);
  }, 120_000);
});

describe('a SyncBatchNorm group whose coordinating replica dies mid-step', () => {
  it('gets UNAVAILABLE for the step it was in, and the retried step succeeds on the new owner', async () => {
    const prefix = 'syncdeath';
    const replicas = [await startReplica(prefix), await startReplica(prefix)];
    await settled(prefix, replicas);
    const name = 'syncdeath/bn';
    const setup = new NormserveClient(replicas[0]!.address);
    await setup.createModule(name, { kind: 'SYNC_BATCH_NORM', numFeatures: 2, worldSize: 2 });
    const owner = replicas.find((r) => r.address === setup.addressFor(name))!;
    const survivor = replicas.find((r) => r !== owner)!;
    // The ranks know the survivor; they are led to the owner, and retry nothing on their own.
    const ranks = [0, 1].map(() => new NormserveClient(survivor.address, { retry: false }));
    const stats = (rank: number, step: number) => ({ count: 8 + rank, mean: [rank + step, -rank], var: [1 + rank, 2] });
    const gather = (rank: number, step: number) => ranks[rank]!.gatherStats(name, { step, rank, worldSize: 2 }, stats(rank, step));
    const step0 = await Promise.all([gather(0, 0), gather(1, 0)]);
    expect(step0[0]).toEqual(step0[1]);

    // Rank 0 waits in step 1 for rank 1; the owner dies under it.
    const waiting = rejection(gather(0, 1));
    await new Promise((r) => setTimeout(r, 200));
    await sigkill(owner);
    const err = await waiting;
    expect(err.code).toBe(Status.UNAVAILABLE);

    // The job retries the whole step, both ranks, until the survivor has taken the module over.
    let retried: Awaited<ReturnType<typeof gather>>[] | undefined;
    await until(
      async () => {
        retried = await Promise.all([gather(0, 1), gather(1, 1)]).catch(() => undefined);
        return retried !== undefined;
      },
      TTL_SECONDS * 1000 + 20_000,
      'the retried step to succeed',
    );
    expect(retried![0]).toEqual(retried![1]);
    expect(retried![0]!.count).toBe(17);
    expect(ranks[0]!.addressFor(name)).toBe(survivor.address);
    // Step 0 came through the death as recorded: its retry gets the same result and counts once.
    expect(await gather(1, 0)).toEqual(step0[1]);
    expect((await ranks[0]!.getModule(name)).numBatchesTracked).toBe(2n);
    for (const c of [...ranks, setup]) await c.close();
    expect(await survivor.process.stop()).toBe(0);
  }, 90_000);
});

describe('etcd itself unavailable', () => {
  it('answers UNAVAILABLE and turns not ready, corrupts nothing, and serves again when etcd returns', async () => {
    const own = await startEtcd();
    try {
      const prefix = 'outage';
      const replicas = [await startReplica(prefix, own.endpoint), await startReplica(prefix, own.endpoint)];
      const ownKv = new Etcd3({ hosts: own.endpoint });
      const client = new NormserveClient(replicas[0]!.address, { retry: false });
      const modules = Array.from({ length: 6 }, (_, i) => trained(`outage/m${i}`, i));
      await until(async () => (await client.health('normserve.v1.BatchNormService')) === 'SERVING', 20_000, 'readiness');
      await createAll(new NormserveClient(replicas[0]!.address), modules);
      for (let step = 0; step < 3; step++) await Promise.all(modules.map((m, i) => trainStep(client, m, input(m, step, i))));

      await own.kill();
      const during: NormserveClientError[] = [];
      for (let step = 3; step < 6; step++) {
        for (const [i, m] of modules.entries()) {
          try {
            await client.forward(m.name, input(m, step, i));
            m.applied.push(input(m, step, i));
          } catch (err) {
            const e = err as NormserveClientError;
            during.push(e);
            if (unknownOutcome(e)) m.pending = input(m, step, i);
          }
        }
      }
      expect(during.length).toBeGreaterThan(0);
      // A write that etcd never answered is in doubt (UNKNOWN); the rest are refused unchanged,
      // because etcd refused the write or because the lease can no longer be confirmed.
      for (const e of during) expect([[Status.UNKNOWN, 'BN_ERR_STORE_UNKNOWN'], [Status.UNAVAILABLE, 'BN_ERR_STORE'], [Status.UNAVAILABLE, 'BN_ERR_SLOT_MOVING']]).toContainEqual([e.code, e.reason]);
      expect(during.filter((e) => e.code === Status.UNAVAILABLE).length).toBeGreaterThan(0);
      // Once its lease cannot be confirmed, each replica stops serving and says so.
      const direct = replicas.map((r) => new NormserveClient(r.address, { retry: false, followOwner: false }));
      for (const d of direct) await until(async () => (await d.health('normserve.v1.BatchNormService').catch(() => 'ERR')) === 'NOT_SERVING', TTL_SECONDS * 1000 + 5000, 'NOT_SERVING');
      for (const m of modules) {
        const refused = await rejection(client.getState(m.name));
        expect([refused.code, refused.reason]).toEqual([Status.UNAVAILABLE, 'BN_ERR_SLOT_MOVING']);
      }
      for (const d of direct) await d.close();

      await own.restart();
      const back = new NormserveClient(replicas[1]!.address);
      await until(async () => (await back.health('normserve.v1.BatchNormService').catch(() => 'ERR')) === 'SERVING', 30_000, 'SERVING again');
      for (let step = 6; step < 9; step++) await Promise.all(modules.map((m, i) => trainStep(back, m, input(m, step, i))));
      await expectReplayed(back, modules);
      // The modules' keys in etcd hold exactly what the replicas serve.
      expect(Object.keys(await ownKv.namespace(`/${prefix}/`).getAll().prefix('modules/').strings()).length).toBe(modules.length);
      for (const c of [client, back]) await c.close();
      ownKv.close();
      expect(await Promise.all(replicas.map((r) => r.process.stop()))).toEqual([0, 0]);
    } finally {
      await own.stop();
    }
  }, 120_000);
});

describe('the command line with an etcd store', () => {
  it('refuses relaxed and process durability, a malformed store, and a prefix that holds another format', async () => {
    const relaxed = await runNode('dist/src/main.js', ['--store', `etcd://${etcd.endpoint}`, '--durability', 'relaxed']);
    expect(relaxed.code).toBe(2);
    expect(relaxed.stderr).toContain('--durability relaxed is for an sqlite store');
    const process = await runNode('dist/src/main.js', ['--store', `etcd://${etcd.endpoint}`, '--durability', 'process']);
    expect(process.code).toBe(2);
    expect(process.stderr).toContain('--durability process is for an sqlite store');
    const bad = await runNode('dist/src/main.js', ['--store', 'etcd://no-port']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('use sqlite:DIR or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]');
    await kv.put('/alien/meta').value('{"format":99,"slots":16}');
    const alien = await runNode('dist/src/main.js', ['--host', '127.0.0.1', '--port', '0', '--store', `etcd://${etcd.endpoint}/alien`]);
    expect(alien.code).toBe(1);
    expect(alien.stdout + alien.stderr).toContain('etcd holds a normserve cluster of another format under this prefix');
  }, 30_000);

  it('waits for etcd when it is not up yet, not ready meanwhile', async () => {
    const late = await startEtcd();
    const endpoint = late.endpoint;
    await late.kill();
    const [port] = await freePorts(1);
    const process = await startMain(['--host', '127.0.0.1', '--port', String(port), '--backend', 'native', '--store', `etcd://${endpoint}/late`, '--lease-ttl-seconds', '2']);
    started.push(process);
    const health = new NormserveClient(`127.0.0.1:${port}`, { retry: false });
    expect(await health.health('normserve.v1.BatchNormService')).toBe('NOT_SERVING');
    expect(await health.health('liveness')).toBe('SERVING');
    await late.restart();
    await until(async () => (await health.health('normserve.v1.BatchNormService')) === 'SERVING', 20_000, 'SERVING once etcd is up');
    await health.close();
    expect(await process.stop()).toBe(0);
    await late.stop();
  }, 60_000);
});
