/**
 * Moving modules to their owners after the replica count changes (src/cluster/rebalance.ts and
 * its command): every kind of module state arrives bit-equal, the old copies go, a second run
 * finds nothing to do, and copies on both sides are handled as the options say.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient, type ModuleSpec } from '../../src/client/client.js';
import { ownerIndex } from '../../src/cluster/placement.js';
import { rebalance } from '../../src/cluster/rebalance.js';
import { channelData } from '../support/data.js';
import { freePorts, runNode, startMain, type Started } from '../support/main-process.js';
import { rejection } from '../support/rejection.js';
import { startTestServer, type TestServer } from '../support/server.js';

const REBALANCE = 'dist/src/cli/rebalance.js';

/** Everything GetModule and GetState tell, in a form toEqual compares bit for bit. */
async function snapshot(client: NormserveClient, name: string) {
  const info = await client.getModule(name);
  const state = await client.getState(name);
  return {
    info,
    state: Object.fromEntries(Object.entries(state).map(([k, v]) => [k, typeof v === 'bigint' ? v : Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('hex')])),
  };
}

const names = async (client: NormserveClient) => (await client.listModules(1000)).modules.map((m) => m.name).sort();

/** One module of each kind of state a move must carry. */
const VARIETY: { suffix: string; spec: ModuleSpec; after?: (c: NormserveClient, name: string) => Promise<unknown> }[] = [
  { suffix: 'bn2d', spec: { kind: 'BATCH_NORM_2D', numFeatures: 3 } },
  { suffix: 'eval', spec: { kind: 'BATCH_NORM_2D', numFeatures: 3, momentum: 0.3, eps: 1e-3 }, after: (c, n) => c.eval(n) },
  { suffix: 'cumulative', spec: { kind: 'BATCH_NORM_2D', numFeatures: 3, momentum: null } },
  { suffix: 'no-affine', spec: { kind: 'BATCH_NORM_2D', numFeatures: 3, affine: false } },
  { suffix: 'no-stats', spec: { kind: 'BATCH_NORM_2D', numFeatures: 3, trackRunningStats: false } },
  { suffix: 'cleared-var', spec: { kind: 'BATCH_NORM_2D', numFeatures: 3 }, after: (c, n) => c.updateModule(n, { clearBuffers: ['running_var', 'num_batches_tracked'] }) },
  { suffix: 'untracked', spec: { kind: 'BATCH_NORM_2D', numFeatures: 3 }, after: (c, n) => c.updateModule(n, { trackRunningStats: false }) },
  { suffix: 'sync', spec: { kind: 'SYNC_BATCH_NORM', numFeatures: 3, worldSize: 2, syncRule: 'SYNC_WHEN_TRAINING' }, after: (c, n) => c.eval(n) },
  { suffix: 'bn3d', spec: { kind: 'BATCH_NORM_3D', numFeatures: 3 } },
];

/** Creates one module per VARIETY entry under `prefix`; all but the sync one trained one step. */
async function populate(client: NormserveClient, prefix: string): Promise<string[]> {
  const created: string[] = [];
  for (const [i, v] of VARIETY.entries()) {
    const name = `${prefix}${v.suffix}`;
    await client.createModule(name, v.spec);
    const shape = v.spec.kind === 'BATCH_NORM_3D' ? [2, 3, 2, 1, 2] : [2, 3, 2, 2];
    if (v.spec.kind !== 'SYNC_BATCH_NORM') await client.forward(name, { shape, data: channelData(2, 3, 4, i, 1 + i, 7 + i) });
    await v.after?.(client, name);
    created.push(name);
  }
  return created;
}

describe('rebalance() between two servers', () => {
  let s: TestServer[];
  let c: NormserveClient[];
  const peers = () => s.map((x) => x.address);
  /** A name under `prefix` that the second of two replicas owns. */
  const ownedBySecond = (prefix: string) => Array.from({ length: 64 }, (_, i) => `${prefix}${i}`).find((n) => ownerIndex(n, 2) === 1)!;

  beforeAll(async () => {
    // Servers without --peers accept any module, so a test can put copies where it likes.
    s = await Promise.all([startTestServer(), startTestServer()]);
    c = s.map((x) => new NormserveClient(x.address));
  });
  afterAll(async () => {
    for (const x of c) x.close();
    await Promise.all(s.map((x) => x.stop()));
  });

  it('moves every kind of module state bit-equal and deletes the old copy', async () => {
    const all = await populate(c[0]!, 'var/');
    const before = await Promise.all(all.map((n) => snapshot(c[0]!, n)));
    const moving = all.filter((n) => ownerIndex(n, 2) === 1);
    expect(moving.length).toBeGreaterThan(2);
    const reports = await rebalance({ peers: peers() });
    expect(reports.filter((r) => r.name.startsWith('var/')).sort((a, b) => a.name.localeCompare(b.name))).toEqual(
      moving.sort().map((name) => ({ name, from: s[0]!.address, to: s[1]!.address, outcome: 'moved' })),
    );
    for (const [i, name] of all.entries()) {
      const holder = ownerIndex(name, 2);
      expect(await snapshot(c[holder]!, name)).toEqual(before[i]);
      expect((await rejection(c[1 - holder]!.getModule(name))).reason).toBe('BN_ERR_MODULE_NOT_FOUND');
    }
    expect(await rebalance({ peers: peers() })).toEqual([]);
  });

  it('plans without changing anything on --dry-run', async () => {
    const name = ownedBySecond('dry/');
    await c[0]!.createModule(name, { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    expect(await rebalance({ peers: peers(), dryRun: true })).toEqual([{ name, from: s[0]!.address, to: s[1]!.address, outcome: 'planned' }]);
    expect(await names(c[0]!)).toContain(name);
    expect(await names(c[1]!)).not.toContain(name);
    await c[0]!.deleteModule(name);
  });

  it('only deletes the old copy when the owner has an equal one (a move cut short before its delete)', async () => {
    const name = ownedBySecond('equal/');
    for (const x of c) await x.createModule(name, { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    expect(await rebalance({ peers: peers() })).toEqual([{ name, from: s[0]!.address, to: s[1]!.address, outcome: 'already-there' }]);
    expect(await names(c[0]!)).not.toContain(name);
    expect(await names(c[1]!)).toContain(name);
  });

  it('leaves two different copies alone and reports them, unless told which wins', async () => {
    const x = { shape: [2, 2], data: Float32Array.of(1, 2, 3, 5) };
    for (const prefer of [undefined, 'owner', 'source'] as const) {
      const name = ownedBySecond(`differ-${prefer}/`);
      for (const x of c) await x.createModule(name, { kind: 'BATCH_NORM_1D', numFeatures: 2 });
      await c[0]!.forward(name, x);
      const source = await snapshot(c[0]!, name);
      const owner = await snapshot(c[1]!, name);
      const [report] = await rebalance({ peers: peers(), ...(prefer && { prefer }) });
      if (prefer === undefined) {
        expect(report).toMatchObject({ name, outcome: 'conflict', error: `${s[1]!.address} has a different copy; rerun with --prefer owner or --prefer source` });
        expect(await snapshot(c[0]!, name)).toEqual(source);
        expect(await snapshot(c[1]!, name)).toEqual(owner);
        await c[0]!.deleteModule(name);
      } else {
        expect(report).toMatchObject({ name, outcome: 'replaced' });
        expect(await names(c[0]!)).not.toContain(name);
        expect(await snapshot(c[1]!, name)).toEqual(prefer === 'owner' ? owner : source);
      }
    }
  });
});

describe('normserve-rebalance across a resize of replica processes', () => {
  const dirs = [0, 1, 2].map(() => mkdtempSync(join(tmpdir(), 'normserve-replica-')));
  let addresses: string[];
  let running: Started[] = [];

  const start = (count: number, list: string[]) =>
    Promise.all(
      Array.from({ length: count }, (_, i) =>
        startMain(['--host', '127.0.0.1', '--port', addresses[i]!.split(':')[1]!, '--backend', 'native', '--peers', list.join(','), '--self-address', addresses[i]!], {
          NORMSERVE_DATA_DIR: dirs[i]!,
        }),
      ),
    );

  beforeAll(async () => {
    addresses = (await freePorts(3)).map((p) => `127.0.0.1:${p}`);
  });
  afterAll(async () => {
    await Promise.all(running.map((r) => r.stop()));
  });

  it('scales 2 → 3 → 2 without losing a module or a bit of its state', async () => {
    const two = addresses.slice(0, 2);
    running = await start(2, two);
    const client = new NormserveClient(two[0]!, { peers: two });
    const all = [...(await populate(client, 'job/a.')), ...(await populate(client, 'job/b.'))];
    const before = new Map(await Promise.all(all.map(async (n) => [n, await snapshot(client, n)] as const)));
    client.close();
    await Promise.all(running.map((r) => r.stop()));

    // Scale up: every replica restarts with the three addresses; the third starts empty.
    running = await start(3, addresses);
    const direct = addresses.map((a) => new NormserveClient(a, { followOwner: false }));
    const moving = all.filter((n) => ownerIndex(n, 3) === 2);
    expect(moving.length).toBeGreaterThan(0);
    // Until the command runs, the old holder still answers reads but refuses changes.
    const stale = moving[0]!;
    const holder = direct[ownerIndex(stale, 2)]!;
    expect((await holder.getModule(stale)).name).toBe(stale);
    expect((await rejection(holder.train(stale))).reason).toBe('BN_ERR_NOT_OWNER');

    const dry = await runNode(REBALANCE, ['--peers', addresses.join(','), '--dry-run']);
    expect(dry.code).toBe(0);
    expect(dry.stdout.split('\n').filter((l) => l.startsWith('planned')).length).toBe(moving.length);
    const up = await runNode(REBALANCE, ['--peers', addresses.join(',')]);
    expect(up.stderr).toBe('');
    expect(up.code).toBe(0);
    expect(up.stdout).toContain(`${moving.length} module(s) not on their owner; ${moving.length} handled, 0 conflicted or failed`);
    for (const name of all) {
      const owner = ownerIndex(name, 3);
      expect(await snapshot(direct[owner]!, name)).toEqual(before.get(name));
      for (const [i, d] of direct.entries()) if (i !== owner) expect(await names(d)).not.toContain(name);
    }
    const again = await runNode(REBALANCE, ['--peers', addresses.join(',')]);
    expect(again).toMatchObject({ code: 0, stdout: '0 module(s) not on their owner; 0 handled, 0 conflicted or failed\n' });

    // Training goes on where the modules now live.
    const trained = moving.find((n) => /(bn2d|cumulative|no-affine)$/.test(n))!;
    expect(trained, 'a moved module that counts its batches').toBeDefined();
    const three = new NormserveClient(addresses[0]!, { peers: addresses });
    await three.forward(trained, { shape: [2, 3, 1, 1], data: Float32Array.of(1, 2, 3, 4, 5, 6) });
    expect((await three.getModule(trained)).numBatchesTracked).toBe(before.get(trained)!.info.numBatchesTracked! + 1n);
    const afterTraining = await snapshot(three, trained);
    three.close();

    // Scale down as the chart does it: all three restart with the two addresses that stay; the
    // third, outside the list, owns nothing and only gives up what it holds (--from).
    await Promise.all(running.map((r) => r.stop()));
    running = await start(3, two);
    expect(running[2]!.lines.find((l) => l.msg === 'placement')).toMatchObject({ owns: false });
    expect((await rejection(direct[2]!.createModule('new/one', { kind: 'BATCH_NORM_1D', numFeatures: 1 }))).reason).toBe('BN_ERR_NOT_OWNER');
    const down = await runNode(REBALANCE, ['--peers', two.join(','), '--from', addresses[2]!]);
    expect(down.code).toBe(0);
    expect(await names(direct[2]!)).toEqual([]);
    for (const name of all) {
      const expected = name === trained ? afterTraining : before.get(name);
      expect(await snapshot(direct[ownerIndex(name, 2)]!, name)).toEqual(expected);
    }
    for (const d of direct) d.close();
  });

  it('refuses a usage error with exit code 2', async () => {
    for (const args of [[], ['--peers', 'nohost'], ['--peers', 'a:1', '--prefer', 'mine'], ['--peers', 'a:1', '--bogus']]) {
      const r = await runNode(REBALANCE, args);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/^normserve-rebalance: .+\n\nUsage: normserve-rebalance/);
    }
  });
});
