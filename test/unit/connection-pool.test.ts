/** Which call goes on which connection: tensors above HTTP/2's default window get one to themselves. */
import { describe, expect, it } from 'vitest';
import { ConnectionPool, SHARE_BYTES } from '../../src/client/connection-pool.js';

function pool() {
  let opened = 0;
  const closed: number[] = [];
  const p = new ConnectionPool<number>(
    () => opened++,
    (n) => closed.push(n),
  );
  return { p, opened: () => opened, closed };
}

describe('ConnectionPool', () => {
  it('opens one connection at once, and keeps calls without tensors on it however many overlap', () => {
    const { p, opened } = pool();
    expect(opened()).toBe(1);
    const leases = Array.from({ length: 50 }, () => p.lease(0));
    expect(new Set(leases.map((l) => l.stubs))).toEqual(new Set([0]));
    expect(opened()).toBe(1);
  });

  it('gives each overlapping call with a tensor above the window a connection to itself', () => {
    const { p } = pool();
    const small = p.lease(0);
    const a = p.lease(8 << 20);
    const b = p.lease(SHARE_BYTES + 1);
    expect([small.stubs, a.stubs, b.stubs]).toEqual([0, 1, 2]);
    // Nothing joins a connection a large call holds, not even a call without a tensor.
    const c = p.lease(0);
    expect(c.stubs).toBe(0);
    small.release();
    c.release();
    const d = p.lease(8 << 20);
    expect(d.stubs).toBe(0);
    expect(p.lease(0).stubs).toBe(3);
  });

  it('lets small tensor calls share while their bytes stay within the window', () => {
    const { p } = pool();
    const half = Math.floor(SHARE_BYTES / 2);
    const a = p.lease(half);
    const b = p.lease(half);
    const c = p.lease(half);
    expect([a.stubs, b.stubs, c.stubs]).toEqual([0, 0, 1]);
    a.release();
    expect(p.lease(half).stubs).toBe(0);
  });

  it('reuses released connections instead of opening more, and a second release changes nothing', () => {
    const { p, opened } = pool();
    for (let round = 0; round < 5; round++) {
      const leases = Array.from({ length: 4 }, () => p.lease(1 << 20));
      expect(leases.map((l) => l.stubs)).toEqual([0, 1, 2, 3]);
      for (const l of leases) {
        l.release();
        l.release();
      }
    }
    expect(opened()).toBe(4);
    const held = p.lease(1 << 20);
    expect(held.stubs).toBe(0);
    expect(p.lease(1 << 20).stubs).toBe(1);
  });

  it('closes every connection it opened, and opens none once closed', () => {
    const { p, opened, closed } = pool();
    p.lease(1 << 20);
    p.lease(1 << 20);
    p.close();
    expect(closed).toEqual([0, 1]);
    expect(p.lease(1 << 20).stubs).toBe(0);
    expect(opened()).toBe(2);
  });
});
