/**
 * Durable state: what a replica must find again after a crash, or another replica after this one
 * died. Modules (config, flags, parameters, buffers, counter) and the coordinator's record of
 * completed group steps. One `write` is one atomic transaction: a module's state and the step
 * that produced it land together or not at all, and the promise settles once they are durable.
 *
 * Two stores implement it: SQLite in the data directory of a single server (sqlite-store.ts),
 * and etcd for replicas that share their modules (etcd-store.ts).
 */
import type { NormserveError } from '../errors.js';
import type { ModuleSnapshot } from '../nn/batch-norm.js';

/** A completed group step, kept so that a rank's retry gets the same result after a restart. */
export interface StepRecord {
  readonly module: string;
  readonly phase: 'forward' | 'backward';
  readonly step: bigint;
  /** Each rank's payload key. */
  readonly keys: ReadonlyMap<number, string>;
  /** The step's result, serialised by the coordinator. */
  readonly result: string;
}

export interface Changes {
  readonly modules?: readonly { name: string; snapshot: ModuleSnapshot }[];
  readonly deleted?: readonly string[];
  readonly steps?: readonly StepRecord[];
}

export interface Stored {
  readonly modules: { name: string; snapshot: ModuleSnapshot }[];
  readonly steps: StepRecord[];
}

export interface Store {
  /** Where the data lives, for logs. */
  readonly location: string;
  /**
   * Applies the changes atomically and resolves once they are durable (for a store that does not
   * sync each write, once the operating system holds them: see `sync`). It rejects with a
   * `StoreRefusal` when the changes were certainly not made, with a `StoreUncertain` when the
   * store did not say whether they were, and with any other error as "not made".
   */
  write(changes: Changes): Promise<void>;
  /**
   * For a store whose writes reach the operating system only (SqliteStore without syncEachCommit):
   * resolves once every write made before the call is on disk.
   */
  sync?(): Promise<void>;
  close(): Promise<void>;
}

/** A write the store certainly did not make, and the catalogue error its call fails with. */
export class StoreRefusal extends Error {
  override readonly name = 'StoreRefusal';
  constructor(
    message: string,
    readonly error?: NormserveError,
  ) {
    super(message);
  }
}

/**
 * A write whose outcome the store could not confirm in time (its answer was lost). `outcome`
 * settles once the store has found out: the module's state as stored then, or null when it no
 * longer exists.
 */
export class StoreUncertain extends Error {
  override readonly name = 'StoreUncertain';
  constructor(
    message: string,
    readonly outcome: Promise<ReadonlyMap<string, ModuleSnapshot | null>>,
  ) {
    super(message);
  }
}

/** A tensor's float32 bytes as stored (a view of its memory, not a copy), or null for None. */
export const floatBytes = (a: Float32Array | null): Buffer | null => (a === null ? null : Buffer.from(a.buffer, a.byteOffset, a.byteLength));

/** A tensor back from its stored float32 bytes, in memory of its own (aligned), or null for None. */
export function floatsOf(bytes: Uint8Array | null): Float32Array | null {
  if (bytes === null) return null;
  const out = new Float32Array(bytes.byteLength / 4);
  new Uint8Array(out.buffer).set(bytes);
  return out;
}
