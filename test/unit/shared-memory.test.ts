/** The region registry on its own: a region unregistered while it is being read closes after the read. */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { RegionRegistry } from '../../src/server/shared-memory.js';

describe('RegionRegistry', () => {
  it('lets reads in flight finish when their region is unregistered, and refuses new ones', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'normserve-regions-'));
    const size = 16 * 1024 * 1024;
    const content = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4096) content[i] = (i / 4096) & 255;
    writeFileSync(join(dir, 'r'), content);
    const regions = new RegionRegistry(dir);
    await regions.register('alice', 'r', join(dir, 'r'), 0, size);
    const targets = [new Uint8Array(size), new Uint8Array(size)];
    const reads = targets.map((t) => regions.read('alice', { region: 'r', offset: 0 }, t, 'input_region'));
    await regions.unregister('alice', 'r');
    await Promise.all(reads);
    for (const t of targets) expect(Buffer.from(t.buffer).equals(content)).toBe(true);
    await expect(regions.read('alice', { region: 'r', offset: 0 }, new Uint8Array(4), 'input_region')).rejects.toThrow(/no region named 'r'/);
    await regions.close();
  });

  it('keeps one principal from using or seeing another one\'s region', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'normserve-regions-'));
    writeFileSync(join(dir, 'r'), Buffer.alloc(64));
    const regions = new RegionRegistry(dir);
    await regions.register('alice', 'r', join(dir, 'r'), 0, 64);
    expect(regions.list('bob')).toEqual([]);
    expect(() => regions.check('bob', { region: 'r', offset: 0 }, 4, 'input_region')).toThrow(/no region named 'r'/);
    await expect(regions.unregister('bob', 'r')).rejects.toThrow(/no region named 'r'/);
    expect(regions.list('alice').map((r) => r.name)).toEqual(['r']);
    await regions.close();
  });
});
