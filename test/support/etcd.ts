/**
 * Replicas of the real program on a real etcd (bench/etcd-process.ts starts etcd): started,
 * awaited until they have joined, and the slots' owners as etcd records them.
 */
import type { Etcd3 } from 'etcd3';
import { SLOTS } from '../../src/cluster/slots.js';
import { freePorts, startMain, type Started } from './main-process.js';
import { until } from './until.js';

export { startEtcd, type EtcdServer } from '../../bench/etcd-process.js';

/** A replica of the real program (`node dist/src/main.js`) on an etcd store, at a loopback port of its own. */
export interface Replica {
  /** Its advertised address, host:port. */
  readonly address: string;
  readonly process: Started;
}

/** Starts a replica on etcd `endpoint` under `prefix` with a `ttlSeconds` lease; resolves once it has joined. */
export async function startReplica(endpoint: string, prefix: string, ttlSeconds: number, extra: string[] = []): Promise<Replica> {
  const [port] = await freePorts(1);
  const address = `127.0.0.1:${port}`;
  const process = await startMain([
    '--host', '127.0.0.1', '--port', String(port), '--backend', 'native',
    '--store', `etcd://${endpoint}/${prefix}`, '--advertise-address', address,
    '--lease-ttl-seconds', String(ttlSeconds), ...extra,
  ]);
  try {
    await until(() => process.lines.some((l) => l.msg === 'serving from etcd'), 20_000, `${address} to join`);
  } catch (err) {
    process.child.kill('SIGKILL');
    throw err;
  }
  return { address, process };
}

/** Slots owned per member address, as etcd says. */
export async function slotsByAddress(kv: Etcd3, prefix: string): Promise<Map<string, number>> {
  const ns = kv.namespace(`/${prefix}/`);
  const members = await ns.getAll().prefix('members/').strings();
  const address = new Map(Object.entries(members).map(([k, v]) => [k.slice('members/'.length), (JSON.parse(v) as { address: string }).address]));
  const owners = await ns.getAll().prefix('slots/').strings();
  const counts = new Map<string, number>();
  for (const member of Object.values(owners)) {
    const at = address.get(member) ?? `? ${member}`;
    counts.set(at, (counts.get(at) ?? 0) + 1);
  }
  return counts;
}

/** Waits until every slot is owned, each of `replicas` owns some, and nobody else does. */
export async function settled(kv: Etcd3, prefix: string, replicas: readonly Replica[]): Promise<Map<string, number>> {
  let counts = new Map<string, number>();
  await until(
    async () => {
      counts = await slotsByAddress(kv, prefix);
      const total = [...counts.values()].reduce((a, b) => a + b, 0);
      return total === SLOTS && counts.size === replicas.length && replicas.every((r) => (counts.get(r.address) ?? 0) > 0);
    },
    20_000,
    `the slots to settle on ${replicas.map((r) => r.address).join(', ')}`,
  );
  return counts;
}
