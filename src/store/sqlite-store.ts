/**
 * The embedded store: one SQLite database (better-sqlite3) in the data directory, in WAL mode with
 * synchronous=FULL, so that a committed transaction survives a process crash and a power loss; or,
 * with `syncEachCommit: false`, synchronous=NORMAL: a commit is written to the log (so it survives
 * the process's death: the operating system holds it) and reaches the disk when `sync` (or SQLite's
 * own checkpoint) flushes the log, as MySQL's innodb_flush_log_at_trx_commit = 2 does.
 * The schema is versioned with PRAGMA user_version; opening a database applies the migrations it
 * lacks, in one transaction, and refuses a database from a newer normserve.
 *
 * The write-ahead log is grown to its full size with zeros when the store opens (as PostgreSQL's
 * wal_init_zero does for its segments): a commit then overwrites blocks the file already has, and
 * its fsync flushes data only. A commit that made the file longer also had the file system commit
 * the new size to its journal, which doubled the cost of every acknowledged change (0.24 ms
 * against 0.12 ms per fsync of one page on this project's VMs), until the log first wrapped after
 * about a thousand commits. SQLite reads a log up to its first frame without a valid checksum, so
 * zeros past the end are what a log that has wrapped holds anyway.
 */
import { closeSync, fstatSync, fsync, fsyncSync, mkdirSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import type { ModuleSnapshot } from '../nn/batch-norm.js';
import type { ModuleConfig } from '../nn/config.js';
import { floatBytes, floatsOf, type Changes, type Store, type Stored, type StepRecord } from './store.js';

export const DB_FILE = 'normserve.db';
/** SQLite's header of a write-ahead log, and of each frame in it. */
const WAL_HEADER_BYTES = 32;
const WAL_FRAME_HEADER_BYTES = 24;

/** Migration i brings the schema from version i to i + 1. */
export const MIGRATIONS: readonly string[] = [
  `CREATE TABLE modules (
     name TEXT PRIMARY KEY,
     config TEXT NOT NULL,
     training INTEGER NOT NULL,
     track_running_stats INTEGER NOT NULL,
     eps REAL NOT NULL,
     momentum REAL,
     weight BLOB,
     bias BLOB,
     running_mean BLOB,
     running_var BLOB,
     num_batches_tracked INTEGER,
     updated_at INTEGER NOT NULL
   );
   CREATE TABLE steps (
     module TEXT NOT NULL,
     phase TEXT NOT NULL,
     step INTEGER NOT NULL,
     keys TEXT NOT NULL,
     result TEXT NOT NULL,
     PRIMARY KEY (module, phase, step)
   );`,
];
export const SCHEMA_VERSION = MIGRATIONS.length;

export class StoreError extends Error {
  override readonly name = 'StoreError';
}

interface ModuleRow {
  name: string;
  config: string;
  training: bigint;
  track_running_stats: bigint;
  eps: number;
  momentum: number | null;
  weight: Buffer | null;
  bias: Buffer | null;
  running_mean: Buffer | null;
  running_var: Buffer | null;
  num_batches_tracked: bigint | null;
}

interface StepRow {
  module: string;
  phase: 'forward' | 'backward';
  step: bigint;
  keys: string;
  result: string;
}

export class SqliteStore implements Store {
  readonly location: string;
  readonly #db: Database.Database;
  readonly #upsert: Database.Statement;
  readonly #deleteModule: Database.Statement;
  readonly #deleteSteps: Database.Statement;
  readonly #insertStep: Database.Statement;
  readonly #trimSteps: Database.Statement;
  readonly #write: (changes: Changes) => void;
  readonly #walPath: string;
  /** The write-ahead log, opened for `sync` (the first time it is needed). */
  #walFd: number | undefined;

  /**
   * Opens (creating when needed) the database in `dir`, keeping `keepSteps` steps per group and
   * phase; with `syncEachCommit` false, commits are not synced one by one (see `sync`).
   */
  constructor(
    dir: string,
    private readonly keepSteps: number,
    { syncEachCommit = true }: { syncEachCommit?: boolean } = {},
  ) {
    mkdirSync(dir, { recursive: true });
    this.location = join(dir, DB_FILE);
    this.#walPath = `${this.location}-wal`;
    this.#db = new Database(this.location);
    this.#db.pragma('journal_mode = WAL');
    this.#db.pragma(syncEachCommit ? 'synchronous = FULL' : 'synchronous = NORMAL');
    this.#db.pragma('busy_timeout = 5000');
    migrate(this.#db);
    preallocateWal(this.#db, this.#walPath, dir);
    this.#upsert = this.#db.prepare(
      `INSERT INTO modules (name, config, training, track_running_stats, eps, momentum, weight, bias, running_mean, running_var, num_batches_tracked, updated_at)
       VALUES (@name, @config, @training, @track, @eps, @momentum, @weight, @bias, @running_mean, @running_var, @nbt, @updated_at)
       ON CONFLICT (name) DO UPDATE SET config = excluded.config, training = excluded.training, track_running_stats = excluded.track_running_stats,
         eps = excluded.eps, momentum = excluded.momentum, weight = excluded.weight, bias = excluded.bias, running_mean = excluded.running_mean,
         running_var = excluded.running_var, num_batches_tracked = excluded.num_batches_tracked, updated_at = excluded.updated_at`,
    );
    this.#deleteModule = this.#db.prepare('DELETE FROM modules WHERE name = ?');
    this.#deleteSteps = this.#db.prepare('DELETE FROM steps WHERE module = ?');
    this.#insertStep = this.#db.prepare('INSERT OR REPLACE INTO steps (module, phase, step, keys, result) VALUES (?, ?, ?, ?, ?)');
    this.#trimSteps = this.#db.prepare(
      'DELETE FROM steps WHERE module = @module AND phase = @phase AND step NOT IN (SELECT step FROM steps WHERE module = @module AND phase = @phase ORDER BY step DESC LIMIT @keep)',
    );
    this.#write = this.#db.transaction((changes: Changes) => {
      const now = Date.now();
      for (const name of changes.deleted ?? []) {
        this.#deleteModule.run(name);
        this.#deleteSteps.run(name);
      }
      for (const { name, snapshot: s } of changes.modules ?? []) {
        this.#upsert.run({
          name,
          config: JSON.stringify(s.config),
          training: s.training ? 1 : 0,
          track: s.trackRunningStats ? 1 : 0,
          eps: s.eps,
          momentum: s.momentum,
          weight: floatBytes(s.weight),
          bias: floatBytes(s.bias),
          running_mean: floatBytes(s.runningMean),
          running_var: floatBytes(s.runningVar),
          nbt: s.numBatchesTracked,
          updated_at: now,
        });
      }
      for (const r of changes.steps ?? []) {
        this.#insertStep.run(r.module, r.phase, r.step, JSON.stringify(Object.fromEntries(r.keys)), r.result);
        this.#trimSteps.run({ module: r.module, phase: r.phase, keep: this.keepSteps });
      }
    });
  }

  load(): Stored {
    const modules = (this.#db.prepare('SELECT * FROM modules ORDER BY name').safeIntegers(true).all() as ModuleRow[]).map((r) => ({
      name: r.name,
      snapshot: {
        config: JSON.parse(r.config) as ModuleConfig,
        training: r.training === 1n,
        trackRunningStats: r.track_running_stats === 1n,
        eps: Number(r.eps),
        momentum: r.momentum === null ? null : Number(r.momentum),
        weight: floatsOf(r.weight),
        bias: floatsOf(r.bias),
        runningMean: floatsOf(r.running_mean),
        runningVar: floatsOf(r.running_var),
        numBatchesTracked: r.num_batches_tracked,
      } satisfies ModuleSnapshot,
    }));
    const steps = (this.#db.prepare('SELECT * FROM steps ORDER BY module, phase, step').safeIntegers(true).all() as StepRow[]).map(
      (r): StepRecord => ({
        module: r.module,
        phase: r.phase,
        step: r.step,
        keys: new Map(Object.entries(JSON.parse(r.keys) as Record<string, string>).map(([k, v]) => [Number(k), v])),
        result: r.result,
      }),
    );
    return { modules, steps };
  }

  /** One SQLite transaction, committed (and, with syncEachCommit, synced) before the promise settles. */
  async write(changes: Changes): Promise<void> {
    this.#write(changes);
  }

  /**
   * Flushes the write-ahead log to disk: every commit made before the call is durable once the
   * promise settles. The fsync runs on libuv's threads; commits go on meanwhile (SQLite writes the
   * log through its own descriptor, and an fsync flushes the file, whichever descriptor asks).
   */
  sync(): Promise<void> {
    this.#walFd ??= openSync(this.#walPath, 'r');
    const fd = this.#walFd;
    return new Promise((resolve, reject) => fsync(fd, (err) => (err ? reject(err) : resolve())));
  }

  async close(): Promise<void> {
    if (this.#walFd !== undefined) closeSync(this.#walFd);
    this.#walFd = undefined;
    if (this.#db.open) this.#db.close();
  }
}

/**
 * Writes zeros after the end of the write-ahead log, up to the size it reaches before SQLite's
 * automatic checkpoint lets it start over (plus room for the commit that crosses that point), and
 * makes them and the log's name durable. Never touches bytes the log has.
 */
export function preallocateWal(db: Database.Database, walPath: string, dir: string): void {
  const pageSize = db.pragma('page_size', { simple: true }) as number;
  const checkpointPages = db.pragma('wal_autocheckpoint', { simple: true }) as number;
  const bytes = WAL_HEADER_BYTES + (Math.max(checkpointPages, 0) + 64) * (pageSize + WAL_FRAME_HEADER_BYTES);
  const fd = openSync(walPath, 'a');
  try {
    const size = fstatSync(fd).size;
    if (size >= bytes) return;
    const zeros = Buffer.alloc(1 << 20);
    for (let at = size; at < bytes; at += zeros.length) writeSync(fd, zeros, 0, Math.min(zeros.length, bytes - at));
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  const dirFd = openSync(dir, 'r');
  try {
    fsyncSync(dirFd);
  } finally {
    closeSync(dirFd);
  }
}

/** Brings a database to SCHEMA_VERSION. */
export function migrate(db: Database.Database): void {
  const version = db.pragma('user_version', { simple: true }) as number;
  if (version > SCHEMA_VERSION) {
    throw new StoreError(`the database has schema version ${version}, newer than this normserve's ${SCHEMA_VERSION}: run a newer normserve, or restore a backup`);
  }
  if (version === SCHEMA_VERSION) return;
  db.transaction(() => {
    for (let v = version; v < SCHEMA_VERSION; v++) db.exec(MIGRATIONS[v]!);
    db.pragma(`user_version = ${SCHEMA_VERSION}`);
  })();
}
