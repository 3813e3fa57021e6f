/** The SQLite store: exact round trips, atomic writes, step retention, and schema versions. */
import { copyFileSync, mkdtempSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { describe, expect, it } from 'vitest';
import { BatchNorm } from '../../src/nn/batch-norm.js';
import { resolveConfig } from '../../src/nn/config.js';
import { DB_FILE, SCHEMA_VERSION, SqliteStore, StoreError } from '../../src/store/sqlite-store.js';
import type { StepRecord } from '../../src/store/store.js';
import { memoryPersistence, MemoryStore } from '../support/memory-store.js';
import { pino } from 'pino';
import { Persistence } from '../../src/store/persistence.js';
import { ModuleRegistry } from '../../src/registry/module-registry.js';

const dir = () => mkdtempSync(join(tmpdir(), 'normserve-store-'));

function oddModule() {
  const m = new BatchNorm(resolveConfig({ kind: 'SYNC_BATCH_NORM', numFeatures: 4n, cumulativeAverage: true, eps: 0, worldSize: 3, syncRule: 'SYNC_WHEN_TRAINING' }));
  m.loadStateDict(
    {
      weight: { shape: [4], data: Float32Array.of(Number.NaN, -0, 1e-45, Number.POSITIVE_INFINITY) },
      running_mean: { shape: [4], data: Float32Array.of(1.1, -2.2, 3.3e-38, 3.4e38) },
      num_batches_tracked: 2n ** 62n + 5n,
    },
    2,
    false,
  );
  m.update({ training: false, trackRunningStats: false, clearBuffers: ['running_var'] });
  return m;
}

const step = (n: bigint): StepRecord => ({ module: 'g', phase: 'forward', step: n, keys: new Map([[0, 'a'], [1, 'b']]), result: `{"n":${n}}` });

describe('SqliteStore', () => {
  it('gives back every module bit for bit, NaN, -0, subnormals, None buffers and 64-bit counters included', async () => {
    const d = dir();
    const m = oddModule();
    const store = new SqliteStore(d, 4);
    await store.write({ modules: [{ name: 'odd', snapshot: m.snapshot() }] });
    await store.close();
    const again = new SqliteStore(d, 4);
    const [row] = again.load().modules;
    await again.close();
    expect(row!.name).toBe('odd');
    const restored = BatchNorm.fromSnapshot(row!.snapshot);
    expect(restored.snapshot()).toEqual(m.snapshot());
    const bytes = (a: Float32Array | null) => Buffer.from(a!.buffer).toString('hex');
    expect(bytes(restored.snapshot().weight)).toBe(bytes(m.snapshot().weight));
    expect(restored.repr).toBe(m.repr);
  });

  it('keeps the newest steps per module and phase, and deletes a module with its steps', async () => {
    const d = dir();
    const store = new SqliteStore(d, 3);
    for (let n = 0n; n < 6n; n++) await store.write({ steps: [step(n)] });
    expect(store.load().steps.map((s) => s.step)).toEqual([3n, 4n, 5n]);
    expect(store.load().steps[0]!.keys).toEqual(new Map([[0, 'a'], [1, 'b']]));
    await store.write({ deleted: ['g'] });
    expect(store.load().steps).toEqual([]);
    await store.close();
  });

  it('writes a module and its step in one transaction: both or neither', async () => {
    const d = dir();
    const store = new SqliteStore(d, 3);
    const m = oddModule();
    // A step whose keys cannot be serialised fails the transaction after the module row was written.
    const bad = { ...step(1n), keys: { entries: () => { throw new Error('boom'); } } as unknown as Map<number, string> };
    await expect(store.write({ modules: [{ name: 'odd', snapshot: m.snapshot() }], steps: [bad] })).rejects.toThrow();
    expect(store.load()).toEqual({ modules: [], steps: [] });
    await store.close();
  });

  it('commits into a write-ahead log grown to its full size at open, which never grows through the commits that wrap it', async () => {
    const d = dir();
    const store = new SqliteStore(d, 3);
    const wal = join(d, `${DB_FILE}-wal`);
    const full = statSync(wal).size;
    // 32-byte header, then (1000 + 64) frames of a 4096-byte page and a 24-byte frame header.
    expect(full).toBe(32 + 1064 * (4096 + 24));
    const m = oddModule();
    // Each commit writes one page; the automatic checkpoint at 1000 frames starts the log over.
    for (let n = 0n; n < 1500n; n++) {
      m.update({ training: n % 2n === 0n });
      await store.write({ modules: [{ name: 'odd', snapshot: m.snapshot() }], steps: [step(n)] });
      if (n % 250n === 0n) expect(statSync(wal).size).toBe(full);
    }
    expect(statSync(wal).size).toBe(full);
    await store.close();
    const again = new SqliteStore(d, 3);
    expect(again.load().modules[0]!.snapshot).toEqual(m.snapshot());
    expect(again.load().steps.map((s) => s.step)).toEqual([1497n, 1498n, 1499n]);
    await again.close();
  });

  it('pads a log left by a crash only past its end: every commit in it is recovered', async () => {
    // A database written without padding, copied while open: the image a crash leaves behind.
    const live = dir();
    const db = new Database(join(live, DB_FILE));
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    db.exec('CREATE TABLE marker (n INTEGER)');
    const insert = db.prepare('INSERT INTO marker VALUES (?)');
    for (let n = 0; n < 40; n++) insert.run(n);
    const crashed = dir();
    copyFileSync(join(live, DB_FILE), join(crashed, DB_FILE));
    copyFileSync(join(live, `${DB_FILE}-wal`), join(crashed, `${DB_FILE}-wal`));
    const logged = statSync(join(crashed, `${DB_FILE}-wal`)).size;
    db.close();
    const store = new SqliteStore(crashed, 3);
    expect(statSync(join(crashed, `${DB_FILE}-wal`)).size).toBeGreaterThan(logged);
    await store.close();
    const check = new Database(join(crashed, DB_FILE), { readonly: true });
    expect(check.prepare('SELECT count(*) AS c, max(n) AS m FROM marker').get()).toEqual({ c: 40, m: 39 });
    check.close();
  });

  it('without syncEachCommit, commits to the log unsynced (a second connection reads them at once) and syncs on demand', async () => {
    const d = dir();
    const store = new SqliteStore(d, 3, { syncEachCommit: false });
    const m = oddModule();
    await store.write({ modules: [{ name: 'm', snapshot: m.snapshot() }] });
    // Written through to the operating system before the promise settled: another process (here,
    // another connection) sees it with no sync at all.
    const other = new Database(join(d, DB_FILE), { readonly: true });
    expect(other.prepare('SELECT num_batches_tracked AS n FROM modules WHERE name = ?').safeIntegers(true).get('m')).toEqual({ n: 2n ** 62n + 5n });
    other.close();
    await store.sync();
    await store.write({ deleted: ['m'] });
    await Promise.all([store.sync(), store.sync()]);
    await store.close();
    const again = new SqliteStore(d, 3);
    expect(again.load().modules).toEqual([]);
    await again.close();
  });

  it('creates the schema in a new database and refuses one from a newer normserve', async () => {
    const d = dir();
    await new SqliteStore(d, 1).close();
    const db = new Database(join(d, DB_FILE));
    expect(db.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION);
    expect(db.pragma('journal_mode', { simple: true })).toBe('wal');
    db.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
    db.close();
    expect(() => new SqliteStore(d, 1)).toThrow(StoreError);
    expect(() => new SqliteStore(d, 1)).toThrow(/schema version 2, newer than this normserve's 1/);
  });
});

describe('ModuleRegistry with a store', () => {
  const config = resolveConfig({ kind: 'BATCH_NORM_1D', numFeatures: 2n, cumulativeAverage: false });

  it('saves what an operation changed, and nothing for one that changed nothing', async () => {
    const store = new MemoryStore();
    const r = new ModuleRegistry(10, memoryPersistence(store));
    await r.create('a', config);
    expect(store.writes).toHaveLength(1);
    await r.exclusive('a', (m) => m.update({ training: false }));
    expect(store.writes).toHaveLength(2);
    await r.exclusive('a', (m) => m.snapshot());
    expect(store.writes).toHaveLength(2);
  });

  it('undoes a change whose write fails, and fails the call with UNAVAILABLE', async () => {
    const store = new MemoryStore();
    const r = new ModuleRegistry(10, memoryPersistence(store));
    await r.create('a', config);
    store.failNext = true;
    await expect(r.exclusive('a', (m) => m.update({ training: false, eps: 0.5 }))).rejects.toMatchObject({
      code: 'BN_ERR_STORE',
      message: 'the data store could not be written (disk full); the change was not made, retry later',
    });
    expect(r.get('a').snapshot()).toMatchObject({ training: true, eps: 1e-5 });
    store.failNext = true;
    await expect(r.create('b', config)).rejects.toThrow(/disk full/);
    expect(() => r.get('b')).toThrow(/not found/);
  });
});

describe('Persistence with process durability', () => {
  /** A store that counts syncs, each held until `release` is called. */
  class SyncingStore extends MemoryStore {
    syncs = 0;
    failSync = false;
    #pending: (() => void)[] = [];
    sync(): Promise<void> {
      this.syncs++;
      if (this.failSync) {
        this.failSync = false;
        return Promise.reject(new Error('EIO'));
      }
      return new Promise((resolve) => this.#pending.push(resolve));
    }
    release(): void {
      for (const done of this.#pending.splice(0)) done();
    }
  }
  const config = resolveConfig({ kind: 'BATCH_NORM_1D', numFeatures: 2n, cumulativeAverage: false });
  const tick = (ms: number) => new Promise((r) => setTimeout(r, ms));

  it('writes every change before answering, and syncs every interval only after writes, one sync at a time', async () => {
    const store = new SyncingStore();
    const persistence = new Persistence(store, { durability: 'process', checkpointMs: 20, logger: pino({ level: 'silent' }) });
    const r = new ModuleRegistry(10, persistence);
    await r.create('a', config);
    await r.exclusive('a', (m) => m.update({ training: false }));
    // Written at once, as in strict mode.
    expect(store.writes).toHaveLength(2);
    await tick(70);
    // Several intervals passed while the first sync was under way: no second one started.
    expect(store.syncs).toBe(1);
    store.release();
    await tick(70);
    // Nothing written since that sync began: nothing to sync.
    expect(store.syncs).toBe(1);
    await r.exclusive('a', (m) => m.update({ training: true }));
    await tick(70);
    expect(store.syncs).toBe(2);
    store.release();
    await persistence.close();
  });

  it('retries a sync that failed at the next interval', async () => {
    const store = new SyncingStore();
    const persistence = new Persistence(store, { durability: 'process', checkpointMs: 20, logger: pino({ level: 'silent' }) });
    store.failSync = true;
    await new ModuleRegistry(10, persistence).create('a', config);
    await tick(90);
    expect(store.syncs).toBe(2);
    store.release();
    await persistence.close();
  });

  it('is refused for a store that cannot sync on demand', () => {
    expect(() => new Persistence(new MemoryStore(), { durability: 'process', checkpointMs: 20, logger: pino({ level: 'silent' }) })).toThrow(/process' needs a store that syncs on demand/);
  });
});
