/**
 * normserve-backup: a copy taken while the server serves (and trains) restores every module,
 * bit-equal to the state at the time of the copy or later, in a fresh server.
 */
import { copyFileSync, mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import { DB_FILE } from '../../src/store/sqlite-store.js';
import { channelData } from '../support/data.js';
import { runNode, startMain } from '../support/main-process.js';

const BACKUP = 'dist/src/cli/backup.js';

describe('normserve-backup', () => {
  it('copies a serving replica\'s database, and a server restores every module from the copy', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'normserve-backup-'));
    const server = await startMain(['--host', '127.0.0.1', '--port', '0', '--backend', 'native'], { NORMSERVE_STORE: `sqlite:${dataDir}` });
    const client = new NormserveClient(`127.0.0.1:${server.port}`);
    const names = Array.from({ length: 20 }, (_, i) => `backup/m${i}`);
    for (const [i, name] of names.entries()) {
      await client.createModule(name, { kind: 'BATCH_NORM_2D', numFeatures: 4 });
      await client.forward(name, { shape: [2, 4, 3, 3], data: channelData(2, 4, 9, i, 1, i + 1) });
    }
    const before = await Promise.all(names.map((n) => client.getState(n)));
    // Training goes on during the copy; the copy holds each module as it was at some moment.
    let training = true;
    const busy = (async () => {
      while (training) await client.forward(names[0]!, { shape: [2, 4, 3, 3], data: channelData(2, 4, 9, 0, 1, 99) });
    })();
    const out = join(mkdtempSync(join(tmpdir(), 'normserve-backup-out-')), 'copy.db');
    const r = await runNode(BACKUP, ['--out', out, '--store', `sqlite:${dataDir}`]);
    training = false;
    await busy;
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`^${out}: 20 module\\(s\\), \\d+ bytes, integrity ok\\n$`));
    client.close();
    expect(await server.stop()).toBe(0);

    const restored = mkdtempSync(join(tmpdir(), 'normserve-restored-'));
    copyFileSync(out, join(restored, DB_FILE));
    const again = await startMain(['--host', '127.0.0.1', '--port', '0', '--backend', 'native'], { NORMSERVE_STORE: `sqlite:${restored}` });
    const c2 = new NormserveClient(`127.0.0.1:${again.port}`);
    expect((await c2.listModules(100)).modules.map((m) => m.name).sort()).toEqual([...names].sort());
    for (const [i, name] of names.entries()) {
      const state = await c2.getState(name);
      if (i === 0) expect(state.num_batches_tracked! >= before[0]!.num_batches_tracked!).toBe(true);
      else expect(state).toEqual(before[i]);
    }
    c2.close();
    expect(await again.stop()).toBe(0);
  });

  it('refuses to overwrite a file, to copy nothing, and a missing --out, with exit code 2', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'normserve-backup-bad-'));
    mkdirSync(join(dir, 'empty'));
    const existing = join(dir, 'exists.db');
    writeFileSync(existing, '');
    writeFileSync(join(dir, DB_FILE), '');
    const cases: [string[], RegExp][] = [
      [['--store', `sqlite:${dir}`], /--out is required/],
      [['--out', existing, '--store', `sqlite:${dir}`], /exists already; choose a new file/],
      [['--out', join(dir, 'x.db'), '--store', `sqlite:${join(dir, 'empty')}`], /no database at .*empty\/normserve\.db/],
      [['--out', join(dir, 'x.db'), '--store', 'etcd://127.0.0.1:2379'], /is etcd, which normserve-backup does not copy: use etcdctl snapshot save/],
      [['--out', join(dir, 'x.db'), '--store', 'mysql://x'], /is neither sqlite:DIR nor etcd:\/\/HOST:PORT/],
      [['--out', join(dir, 'x.db'), '--bogus'], /Unknown option '--bogus'/],
    ];
    for (const [args, message] of cases) {
      const r = await runNode(BACKUP, args);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(message);
    }
  });
});
