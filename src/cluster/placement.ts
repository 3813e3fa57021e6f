/**
 * Which replica owns a module: rendezvous (highest-random-weight) hashing of the module's name
 * over the replicas' ordinals. Every replica and every client computes the same owner from the
 * name and the number of replicas alone, so all ranks of a sync group reach one replica, and a
 * change from N to N+1 replicas moves only the modules the new replica wins (about 1/(N+1) of
 * them); going down from N to N-1 moves only the modules of the replica that goes.
 *
 * The rule, for any language (docs/scale-out.md): for each ordinal i in 0..N-1 take
 * SHA-256(UTF-8(name) || 0x00 || ASCII(decimal i)); the owner is the i whose digest is greatest,
 * compared as unsigned bytes from the first; equal digests go to the lower ordinal.
 */
import { createHash } from 'node:crypto';
import { bnError } from '../errors.js';

/** The ordinal, in 0..replicas-1, of the replica that owns `name`. */
export function ownerIndex(name: string, replicas: number): number {
  if (!Number.isInteger(replicas) || replicas < 1) throw new RangeError(`replicas must be a positive integer, not ${replicas}`);
  const prefix = Buffer.concat([Buffer.from(name, 'utf8'), Buffer.from([0])]);
  let best = 0;
  let bestDigest: Buffer | undefined;
  for (let i = 0; i < replicas; i++) {
    const digest = createHash('sha256').update(prefix).update(String(i)).digest();
    if (bestDigest === undefined || Buffer.compare(digest, bestDigest) > 0) {
      best = i;
      bestDigest = digest;
    }
  }
  return best;
}

/**
 * Who may serve a call on a module: only its `owner`, or also a replica that still `holds` a copy
 * (reads and deletes, so that the command that moves modules can read and remove the copies a
 * change of replica count left behind).
 */
export type Locality = 'owner' | 'held';

/** Owner lookups are cached per name; past this many names the cache starts again. */
const CACHE_LIMIT = 65_536;

/** This replica's place among its peers, and the check each call on a module passes. */
export class Placement {
  readonly #peers: readonly string[];
  readonly #self: number;
  readonly #holds: (name: string) => boolean;
  readonly #owners = new Map<string, number>();

  /**
   * `peers` are the replicas' addresses in ordinal order and `self` this replica's address; no
   * peers means a single server that owns every module. A replica that is not among its peers
   * owns nothing: it is being scaled away and serves only reads and deletes of the copies it
   * holds until they have moved (docs/scale-out.md). `holds` says whether this replica has a
   * module of that name.
   */
  constructor(peers: readonly string[], self: string, holds: (name: string) => boolean) {
    this.#peers = [...peers];
    this.#self = peers.length === 0 ? 0 : peers.indexOf(self);
    this.#holds = holds;
  }

  /** False for a replica outside its own peers list, which owns no module. */
  get owns(): boolean {
    return this.#self >= 0;
  }

  get replicas(): number {
    return Math.max(1, this.#peers.length);
  }

  get peers(): readonly string[] {
    return this.#peers;
  }

  ownerOf(name: string): number {
    if (this.#peers.length <= 1) return 0;
    let owner = this.#owners.get(name);
    if (owner === undefined) {
      if (this.#owners.size >= CACHE_LIMIT) this.#owners.clear();
      owner = ownerIndex(name, this.#peers.length);
      this.#owners.set(name, owner);
    }
    return owner;
  }

  /** Throws BN_ERR_NOT_OWNER, naming the owner's address, when this replica may not serve `name`. */
  check(name: string, locality: Locality): void {
    if (this.#peers.length <= 1 && this.#self === 0) return;
    const owner = this.ownerOf(name);
    if (owner === this.#self || (locality === 'held' && this.#holds(name))) return;
    const address = this.#peers[owner]!;
    const self = this.#peers[this.#self] ?? 'a replica outside the peers list';
    throw bnError('BN_ERR_NOT_OWNER', { name, owner: address, index: owner, self, replicas: this.#peers.length }).with({
      owner: address,
      owner_index: String(owner),
      replicas: String(this.#peers.length),
    });
  }
}

/** Parses a --peers list: comma-separated host:port addresses, in ordinal order, no repeats. */
export function parsePeers(list: string): string[] {
  if (list.trim() === '') return [];
  const peers = list.split(',').map((p) => p.trim());
  for (const p of peers) {
    if (!/^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$/.test(p)) throw new Error(`peer address '${p}' is not host:port`);
  }
  const seen = new Set<string>();
  for (const p of peers) {
    if (seen.has(p)) throw new Error(`peer address ${p} appears twice`);
    seen.add(p);
  }
  return peers;
}

/**
 * The peer addresses of a StatefulSet's pods, as the Helm chart passes them to --peers:
 * `<statefulSet>-<i>.<service>.<namespace>.svc.<clusterDomain>:<port>`.
 */
export function statefulSetPeers(p: { statefulSet: string; service: string; namespace: string; replicas: number; port: number; clusterDomain?: string }): string[] {
  const domain = p.clusterDomain ?? 'cluster.local';
  return Array.from({ length: p.replicas }, (_, i) => `${p.statefulSet}-${i}.${p.service}.${p.namespace}.svc.${domain}:${p.port}`);
}
