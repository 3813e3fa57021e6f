/**
 * Modules in slots, slots among replicas. A module's slot is fixed by its name; a slot's owner is
 * the live replica that wins it by rendezvous (highest-random-weight) hashing over the replicas'
 * member ids, so that a replica that joins takes about 1/N of the slots, all from the others, and
 * a replica that leaves hands only its own slots on. Which replica *does* own a slot is what etcd
 * says (etcd-cluster.ts); this rule only says which one should.
 *
 * The rules, for any language (docs/scale-out.md):
 * - slot(name) = the first four bytes of SHA-256(UTF-8(name)), read as a big-endian unsigned
 *   integer, modulo SLOTS;
 * - owner(slot) = the member id m whose SHA-256(ASCII(decimal slot) || 0x00 || UTF-8(m)) is
 *   greatest, compared as unsigned bytes from the first.
 */
import { createHash } from 'node:crypto';

/** Slots in a cluster. Fixed: every replica and every stored key depends on it. */
export const SLOTS = 256;

export function slotOf(name: string): number {
  return createHash('sha256').update(name, 'utf8').digest().readUInt32BE(0) % SLOTS;
}

/** The member that should own `slot` among `members` (undefined when there are none). */
export function preferredOwner(slot: number, members: Iterable<string>): string | undefined {
  const prefix = Buffer.from(`${slot}\0`, 'ascii');
  let best: string | undefined;
  let bestDigest: Buffer | undefined;
  for (const m of members) {
    const digest = createHash('sha256').update(prefix).update(m, 'utf8').digest();
    if (bestDigest === undefined || Buffer.compare(digest, bestDigest) > 0) {
      best = m;
      bestDigest = digest;
    }
  }
  return best;
}
