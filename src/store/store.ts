/**
 * Durable state: what a server must find again after a crash. Modules (config, flags, parameters,
 * buffers, counter) and the coordinator's record of completed group steps. One `write` is one
 * atomic transaction: a module's state and the step that produced it land together or not at all.
 */
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
  load(): Stored;
  /** Applies the changes atomically; returns once they are on disk. */
  write(changes: Changes): void;
  close(): void;
}
