import { describe, expect, it } from 'vitest';
import { resolveConfig } from '../../src/nn/config.js';
import { ModuleRegistry } from '../../src/registry/module-registry.js';
import { pino } from 'pino';
import { Persistence } from '../../src/store/persistence.js';
import type { Changes } from '../../src/store/store.js';
import { memoryPersistence, MemoryStore } from '../support/memory-store.js';

const config = resolveConfig({ kind: 'BATCH_NORM_1D', numFeatures: 2n, cumulativeAverage: false });

describe('ModuleRegistry', () => {
  it('runs operations on one module one at a time, in call order', async () => {
    const r = new ModuleRegistry(10, memoryPersistence());
    await r.create('a', config);
    const order: string[] = [];
    const slow = r.exclusive('a', async () => {
      order.push('slow start');
      await new Promise((res) => setTimeout(res, 20));
      order.push('slow end');
    });
    const fast = r.exclusive('a', () => order.push('fast'));
    await Promise.all([slow, fast]);
    expect(order).toEqual(['slow start', 'slow end', 'fast']);
  });

  it('keeps the queue going after an operation fails', async () => {
    const r = new ModuleRegistry(10, memoryPersistence());
    await r.create('a', config);
    await expect(r.exclusive('a', () => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    expect(await r.exclusive('a', () => 42)).toBe(42);
  });

  it('answers NOT_FOUND to an operation queued behind the delete of its module', async () => {
    const r = new ModuleRegistry(10, memoryPersistence());
    await r.create('a', config);
    const deleted = r.delete('a');
    // Queued before the delete ran, on the same entry.
    const late = r.exclusive('a', () => 'ran');
    await deleted;
    await expect(late).rejects.toMatchObject({ code: 'BN_ERR_MODULE_NOT_FOUND' });
    await r.create('a', config);
    expect(await r.exclusive('a', () => 'fresh')).toBe('fresh');
  });

  it('pages in name order with tokens it issued and rejects others', async () => {
    const r = new ModuleRegistry(100, memoryPersistence());
    for (const n of ['c', 'a', 'b', 'e', 'd']) await r.create(n, config);
    const p1 = r.list(2, '');
    expect(p1.modules.map((m) => m.name)).toEqual(['a', 'b']);
    const p2 = r.list(2, p1.nextPageToken);
    expect(p2.modules.map((m) => m.name)).toEqual(['c', 'd']);
    const p3 = r.list(2, p2.nextPageToken);
    expect(p3.modules.map((m) => m.name)).toEqual(['e']);
    expect(p3.nextPageToken).toBe('');
    expect(r.list(0, '').modules).toHaveLength(5);
    expect(() => r.list(2, '!!')).toThrow(/was not issued by ListModules/);
  });

  it('refuses a module past the limit', async () => {
    const r = new ModuleRegistry(1, memoryPersistence());
    await r.create('a', config);
    await expect(r.create('b', config)).rejects.toThrow(/max_modules=1/);
  });

  it('answers no operation on a module before its create is in the store', async () => {
    let finish!: () => void;
    const store = new MemoryStore();
    const slow = { ...store, location: 'slow', write: (c: Changes) => new Promise<void>((r) => (finish = () => r(store.write(c)))), close: async () => {} };
    const r = new ModuleRegistry(10, new Persistence(slow, { durability: 'strict', checkpointMs: 1000, logger: pino({ level: 'silent' }) }));
    const created = r.create('a', config);
    const order: string[] = [];
    const op = r.exclusive('a', () => order.push('op'));
    await new Promise((res) => setTimeout(res, 10));
    expect(order).toEqual([]);
    finish();
    await created;
    await op;
    expect(order).toEqual(['op']);
  });

  it('lets go of evicted modules once their running operations end, and the guard refuses what was queued', async () => {
    let refuse = false;
    const r = new ModuleRegistry(10, memoryPersistence(), { guard: (name) => { if (refuse && name.startsWith('x/')) throw new Error(`${name} moved`); } });
    await r.create('x/a', config);
    await r.create('y/b', config);
    let release!: () => void;
    const running = r.exclusive('x/a', () => new Promise<string>((res) => (release = () => res('done'))));
    await new Promise((res) => setTimeout(res, 5));
    refuse = true;
    const queued = r.exclusive('x/a', () => 'ran');
    const evicted = r.evict((n) => n.startsWith('x/'));
    release();
    expect(await running).toBe('done');
    await expect(queued).rejects.toThrow('x/a moved');
    expect(await evicted).toEqual(['x/a']);
    expect(r.has('x/a')).toBe(false);
    expect(r.has('y/b')).toBe(true);
  });
});
