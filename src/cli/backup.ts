#!/usr/bin/env node
/**
 * normserve-backup: a consistent copy of a replica's database while it serves, through SQLite's
 * online backup API (the database is in WAL mode, so the server's writes go on meanwhile). The
 * copy is a complete database: put it as normserve.db into an empty data directory and the
 * server restores every module from it (docs/operations.md).
 *
 *   node dist/src/cli/backup.js --out /data/backup-2026-11-27.db [--store sqlite:/data]
 *
 * --store defaults to the server's own setting (NORMSERVE_STORE); it must be an sqlite store (etcd
 * keeps its own backups: `etcdctl snapshot save`). Prints the modules and bytes copied; exits 1
 * when the copy fails, 2 on a usage error.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import Database from 'better-sqlite3';
import { parseStore, SETTINGS } from '../config.js';
import { DB_FILE } from '../store/sqlite-store.js';

function usage(message: string): never {
  process.stderr.write(`normserve-backup: ${message}\nUsage: normserve-backup --out FILE [--store sqlite:DIR]\n`);
  process.exit(2);
}

let values;
try {
  ({ values } = parseArgs({ options: { out: { type: 'string' }, store: { type: 'string' } }, strict: true }));
} catch (err) {
  usage((err as Error).message);
}
const out = values.out ?? usage('--out is required');
const store = values.store ?? process.env[SETTINGS.store.env] ?? SETTINGS.store.default;
if (!SETTINGS.store.schema.safeParse(store).success) usage(`--store ${store} is neither sqlite:DIR nor etcd://HOST:PORT`);
const spec = parseStore(store);
if (spec.kind !== 'sqlite') usage(`--store ${store} is etcd, which normserve-backup does not copy: use etcdctl snapshot save (docs/operations.md)`);
const source = join(spec.dir, DB_FILE);
if (!existsSync(source)) usage(`no database at ${source}`);
if (existsSync(out)) usage(`${out} exists already; choose a new file`);

try {
  const db = new Database(source, { fileMustExist: true });
  db.pragma('busy_timeout = 5000');
  const { totalPages } = await db.backup(out);
  db.close();
  const copy = new Database(out, { readonly: true });
  const integrity = copy.pragma('integrity_check', { simple: true });
  const modules = (copy.prepare('SELECT count(*) AS n FROM modules').get() as { n: number }).n;
  const pageSize = copy.pragma('page_size', { simple: true }) as number;
  copy.close();
  if (integrity !== 'ok') throw new Error(`the copy fails SQLite's integrity check: ${String(integrity)}`);
  process.stdout.write(`${out}: ${modules} module(s), ${totalPages * pageSize} bytes, integrity ok\n`);
} catch (err) {
  process.stderr.write(`normserve-backup: ${(err as Error).message}\n`);
  process.exit(1);
}
