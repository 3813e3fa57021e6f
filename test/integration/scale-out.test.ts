/**
 * Scale-out through real server processes: three replicas on loopback stand in for a
 * StatefulSet's pods, each started with the same --peers list and its own --self-address.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import { ownerIndex } from '../../src/cluster/placement.js';
import { Status } from '../../src/errors.js';
import { channelData } from '../support/data.js';
import { freePorts, runNode, startMain, type Started } from '../support/main-process.js';
import { rejection } from '../support/rejection.js';

const HEALTHCHECK = 'dist/src/cli/healthcheck.js';
let peers: string[];
let healthPort: number;
let replicas: Started[];
let direct: NormserveClient[];

beforeAll(async () => {
  const ports = await freePorts(4);
  healthPort = ports[3]!;
  peers = ports.slice(0, 3).map((p) => `127.0.0.1:${p}`);
  replicas = await Promise.all(
    peers.map((self, i) =>
      startMain(['--host', '127.0.0.1', '--port', String(ports[i]), '--backend', 'native', '--peers', peers.join(','), '--self-address', self], {
        ...(i === 0 && { NORMSERVE_HEALTH_PORT: String(healthPort) }),
      }),
    ),
  );
  direct = peers.map((address) => new NormserveClient(address, { followOwner: false }));
});

afterAll(async () => {
  for (const c of direct ?? []) c.close();
  expect(await Promise.all((replicas ?? []).map((r) => r.stop()))).toEqual((replicas ?? []).map(() => 0));
});

async function heldBy(client: NormserveClient): Promise<string[]> {
  return (await client.listModules(1000)).modules.map((m) => m.name).sort();
}

describe('three replicas', () => {
  it('put every module on its owner, for a client that knows the peers', async () => {
    const client = new NormserveClient(peers[1]!, { peers });
    const names = Array.from({ length: 12 }, (_, i) => `owned/m${i}`);
    for (const name of names) {
      await client.createModule(name, { kind: 'BATCH_NORM_1D', numFeatures: 3 });
      const y = await client.forward(name, { shape: [4, 3], data: channelData(4, 3, 1, 1, 2) });
      expect(y.shape).toEqual([4, 3]);
    }
    for (let i = 0; i < 3; i++) {
      expect((await heldBy(direct[i]!)).filter((n) => n.startsWith('owned/'))).toEqual(names.filter((n) => ownerIndex(n, 3) === i).sort());
    }
    for (const name of names) expect((await client.getModule(name)).numBatchesTracked).toBe(1n);
    client.close();
  });

  it('refuse another replica\'s module with FAILED_PRECONDITION and the owner\'s address, changing nothing', async () => {
    const name = Array.from({ length: 50 }, (_, i) => `refused/m${i}`).find((n) => ownerIndex(n, 3) === 2)!;
    const wrong = direct[0]!;
    const err = await rejection(wrong.createModule(name, { kind: 'BATCH_NORM_2D', numFeatures: 2 }));
    expect(err.code).toBe(Status.FAILED_PRECONDITION);
    expect(err.reason).toBe('BN_ERR_NOT_OWNER');
    expect(err.info).toMatchObject({ owner: peers[2], owner_index: '2', replicas: '3' });
    expect(err.message).toBe(
      `module '${name}' belongs to replica 2 of 3 at ${peers[2]}, not to this one (${peers[0]}); send its calls there (google.rpc.ErrorInfo metadata 'owner' has the address)`,
    );
    expect(await heldBy(wrong)).not.toContain(name);
    // Reads and tensor calls, unary and streamed, are refused alike.
    await direct[2]!.createModule(name, { kind: 'BATCH_NORM_2D', numFeatures: 2 });
    expect((await rejection(wrong.getModule(name))).reason).toBe('BN_ERR_NOT_OWNER');
    const x = { shape: [2, 2, 1, 1], data: Float32Array.of(1, 2, 3, 4) };
    for (const transport of ['unary', 'stream'] as const) {
      expect((await rejection(wrong.forward(name, x, { transport }))).reason).toBe('BN_ERR_NOT_OWNER');
    }
    expect((await direct[2]!.getModule(name)).numBatchesTracked).toBe(0n);
  });

  it('lead a client that knows one address to the owner, once per module', async () => {
    const client = new NormserveClient(peers[0]!);
    const name = Array.from({ length: 50 }, (_, i) => `led/m${i}`).find((n) => ownerIndex(n, 3) === 1)!;
    expect(client.addressFor(name)).toBe(peers[0]);
    await client.createModule(name, { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    expect(client.addressFor(name)).toBe(peers[1]);
    await client.forward(name, { shape: [3, 2], data: Float32Array.of(1, 2, 3, 4, 5, 7) }, { transport: 'stream' });
    expect(await heldBy(direct[1]!)).toContain(name);
    expect((await direct[1]!.getModule(name)).numBatchesTracked).toBe(1n);
    client.close();
  });

  it('bring all ranks of a SyncBatchNorm group to one replica', async () => {
    const name = 'group/bn';
    const owner = ownerIndex(name, 3);
    const ranks = [0, 1, 2].map((r) => new NormserveClient(peers[r]!, { peers }));
    await ranks[0]!.createModule(name, { kind: 'SYNC_BATCH_NORM', numFeatures: 2, worldSize: 3 });
    const shards = [0, 1, 2].map((r) => channelData(4, 2, 3, r, 1 + r, 10 + r));
    const outs = await Promise.all(ranks.map((c, rank) => c.syncForward(name, { step: 0n, rank, worldSize: 3 }, { shape: [4, 2, 3], data: shards[rank]! })));
    // The group's mean over the whole batch, channel by channel.
    const all = shards.flatMap((s) => [...s]);
    for (let ch = 0; ch < 2; ch++) {
      const values = all.filter((_, i) => Math.floor(i / 3) % 2 === ch);
      const mean = values.reduce((a, v) => a + v, 0) / values.length;
      for (const o of outs) {
        expect(o.synced).toBe(true);
        expect(o.count).toBe(36);
        expect(o.mean[ch]).toBeCloseTo(mean, 5);
      }
    }
    expect(await heldBy(direct[owner]!)).toContain(name);
    for (const c of ranks) c.close();
  });

  it('answer health in plaintext on --health-port, liveness included, and the image\'s health check reads it', async () => {
    const health = new NormserveClient(`127.0.0.1:${healthPort}`);
    expect(await health.health('liveness')).toBe('SERVING');
    expect(await health.health('normserve.v1.BatchNormService')).toBe('SERVING');
    health.close();
    const ok = await runNode(HEALTHCHECK, [], { NORMSERVE_HEALTH_PORT: String(healthPort), NORMSERVE_HOST: '127.0.0.1' });
    expect(ok).toMatchObject({ code: 0, stderr: '' });
    const grpcPort = peers[1]!.split(':')[1]!;
    expect((await runNode(HEALTHCHECK, [], { NORMSERVE_PORT: grpcPort, NORMSERVE_HOST: '127.0.0.1' })).code).toBe(0);
    const down = await runNode(HEALTHCHECK, [], { NORMSERVE_PORT: '1', NORMSERVE_HOST: '127.0.0.1' });
    expect(down.code).toBe(1);
    expect(down.stderr).toMatch(/^normserve-healthcheck: 127\.0\.0\.1:1: /);
    const tls = await runNode(HEALTHCHECK, [], { NORMSERVE_TLS_CERT: '/nonexistent.pem', NORMSERVE_TLS_KEY: '/nonexistent.key' });
    expect(tls.code).toBe(1);
    expect(tls.stderr).toContain('set NORMSERVE_HEALTH_PORT');
  });
});
