/**
 * When changes reach the store. `strict` (the default, and the only mode of a shared store): before
 * the call that made them is answered, on disk; a write that fails fails the call. `process`
 * (SQLite only): written before the call is answered as in strict, but synced to disk every
 * `checkpointMs` rather than commit by commit: the death of the server's process loses nothing,
 * a crash of its machine (or a power loss) at most the changes of the last interval. `relaxed`
 * (SQLite only): changed modules are written together every `checkpointMs`, and at shutdown; a
 * crash of the process loses at most the changes of the last interval.
 */
import type { Logger } from 'pino';
import type { ModuleSnapshot } from '../nn/batch-norm.js';
import type { Changes, StepRecord, Store } from './store.js';

export type Durability = 'strict' | 'process' | 'relaxed';

export interface PersistenceOptions {
  readonly durability: Durability;
  readonly checkpointMs: number;
  readonly logger: Logger;
  /** Called with each write's duration in seconds (for metrics). */
  readonly onWrite?: (seconds: number) => void;
  /** process mode: called with each sync's duration in seconds (for metrics). */
  readonly onSync?: (seconds: number) => void;
}

const done = Promise.resolve();

export class Persistence {
  readonly #pendingModules = new Map<string, () => ModuleSnapshot>();
  readonly #pendingDeletes = new Set<string>();
  #pendingSteps: StepRecord[] = [];
  readonly #timer: NodeJS.Timeout | undefined;
  /** The checkpoint being written, so that close() waits for it. */
  #checkpointing: Promise<void> = done;
  /** process mode: writes made since the last sync began, and the sync under way. */
  #unsynced = false;
  #syncing: Promise<void> = done;

  /** Whether every change is written before the call that made it is answered (strict and process). */
  readonly writesThrough: boolean;

  constructor(
    private readonly store: Store,
    private readonly opts: PersistenceOptions,
  ) {
    if (opts.durability === 'process' && !store.sync) throw new Error(`durability 'process' needs a store that syncs on demand, and ${store.location} does not`);
    this.writesThrough = opts.durability !== 'relaxed';
    // Every interval: relaxed writes what is pending, process syncs what was written.
    const tick = { strict: undefined, process: () => void this.#sync(), relaxed: () => void this.#checkpoint() }[opts.durability];
    if (tick) {
      this.#timer = setInterval(tick, opts.checkpointMs);
      this.#timer.unref();
    }
  }

  /**
   * Records a module's state (read from `snapshot` now in strict mode, at the next checkpoint in
   * relaxed mode) and the group step that produced it, if any. In strict mode the promise settles
   * with the write: it rejects as Store.write does.
   */
  saveModule(name: string, snapshot: () => ModuleSnapshot, step?: StepRecord): Promise<void> {
    if (this.writesThrough) return this.#write({ modules: [{ name, snapshot: snapshot() }], steps: step ? [step] : [] });
    this.#pendingDeletes.delete(name);
    this.#pendingModules.set(name, snapshot);
    if (step) this.#pendingSteps.push(step);
    return done;
  }

  /** Records a group step that changed no module (a backward step). */
  saveStep(step: StepRecord): Promise<void> {
    if (this.writesThrough) return this.#write({ steps: [step] });
    this.#pendingSteps.push(step);
    return done;
  }

  deleteModule(name: string): Promise<void> {
    if (this.writesThrough) return this.#write({ deleted: [name] });
    this.#pendingModules.delete(name);
    this.#pendingSteps = this.#pendingSteps.filter((s) => s.module !== name);
    this.#pendingDeletes.add(name);
    return done;
  }

  /** Writes what is pending (relaxed mode) and closes the store (which syncs what it has). */
  async close(): Promise<void> {
    clearInterval(this.#timer);
    await this.#checkpointing;
    await this.#checkpoint();
    await this.#syncing;
    await this.store.close();
  }

  /** process mode: the writes made so far onto the disk, unless a sync is still under way (the next tick takes them). */
  #sync(): Promise<void> {
    if (!this.#unsynced || this.#syncing !== done) return this.#syncing;
    this.#unsynced = false;
    const started = process.hrtime.bigint();
    this.#syncing = this.store
      .sync!()
      .then(
        () => this.opts.onSync?.(Number(process.hrtime.bigint() - started) / 1e9),
        (err: unknown) => {
          this.#unsynced = true;
          this.opts.logger.error({ err }, 'syncing the store to disk failed; retrying at the next interval');
        },
      )
      .finally(() => {
        this.#syncing = done;
      });
    return this.#syncing;
  }

  #checkpoint(): Promise<void> {
    if (this.#pendingModules.size === 0 && this.#pendingDeletes.size === 0 && this.#pendingSteps.length === 0) return this.#checkpointing;
    const changes: Changes = {
      deleted: [...this.#pendingDeletes],
      modules: [...this.#pendingModules].map(([name, snapshot]) => ({ name, snapshot: snapshot() })),
      steps: this.#pendingSteps,
    };
    this.#pendingDeletes.clear();
    this.#pendingModules.clear();
    this.#pendingSteps = [];
    this.#checkpointing = this.#write(changes).catch((err: unknown) => {
      // Put back what did not reach the store, under anything recorded since.
      for (const name of changes.deleted ?? []) if (!this.#pendingModules.has(name)) this.#pendingDeletes.add(name);
      for (const { name, snapshot } of changes.modules ?? []) if (!this.#pendingModules.has(name) && !this.#pendingDeletes.has(name)) this.#pendingModules.set(name, () => snapshot);
      this.#pendingSteps = [...(changes.steps ?? []), ...this.#pendingSteps];
      this.opts.logger.error({ err }, 'checkpoint failed; retrying at the next one');
    });
    return this.#checkpointing;
  }

  async #write(changes: Changes): Promise<void> {
    const started = process.hrtime.bigint();
    this.#unsynced = true;
    await this.store.write(changes);
    this.opts.onWrite?.(Number(process.hrtime.bigint() - started) / 1e9);
  }
}
