/** The pool of plain-memory copies that answers in shared memory are serialised from. */
import { describe, expect, it } from 'vitest';
import { PlainCopies } from '../../src/server/tensor-call.js';

/** A copy in shared memory (TypedArray.map answers in plain memory). */
function shareOf(t: Float32Array): Float32Array {
  const s = new Float32Array(new SharedArrayBuffer(t.byteLength));
  s.set(t);
  return s;
}

describe('PlainCopies', () => {
  it('copies shared tensors into plain memory, passes plain ones through, and reuses only its own copies', () => {
    const pool = new PlainCopies(1024);
    const shared = shareOf(new Float32Array(64).map((_, i) => i));
    const copy = pool.take(shared);
    expect(copy).not.toBe(shared);
    expect(copy.buffer).toBeInstanceOf(ArrayBuffer);
    expect(Array.from(copy)).toEqual(Array.from(shared));
    const plain = new Float32Array(64);
    expect(pool.take(plain)).toBe(plain);

    pool.give(plain); // not its own: ignored
    pool.give(copy);
    pool.give(copy); // twice: once only
    const again = pool.take(shareOf(shared.map((v) => v * 2)));
    expect(again).toBe(copy);
    expect(again[3]).toBe(6);
    expect(pool.take(shared)).not.toBe(copy);
  });

  it('keeps no more than its limit', () => {
    const pool = new PlainCopies(300);
    const shared = new Float32Array(new SharedArrayBuffer(64 * 4));
    const a = pool.take(shared);
    const b = pool.take(shared);
    pool.give(a);
    pool.give(b); // 512 bytes would pass the 300-byte limit: dropped
    expect(pool.take(shared)).toBe(a);
    expect(pool.take(shared)).not.toBe(b);
  });
});
