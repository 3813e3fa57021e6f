/**
 * When changes reach the store. `strict` (the default): before the call that made them is
 * answered; a write that fails fails the call. `relaxed`: changed modules are written together
 * every `checkpointMs`, and at shutdown; a crash loses at most the changes of the last interval.
 */
import type { Logger } from 'pino';
import type { ModuleSnapshot } from '../nn/batch-norm.js';
import type { Changes, StepRecord, Store } from './store.js';

export type Durability = 'strict' | 'relaxed';

export interface PersistenceOptions {
  readonly durability: Durability;
  readonly checkpointMs: number;
  readonly logger: Logger;
  /** Called with each write's duration in seconds (for metrics). */
  readonly onWrite?: (seconds: number) => void;
}

export class Persistence {
  readonly #pendingModules = new Map<string, () => ModuleSnapshot>();
  readonly #pendingDeletes = new Set<string>();
  #pendingSteps: StepRecord[] = [];
  readonly #timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly store: Store,
    private readonly opts: PersistenceOptions,
  ) {
    if (opts.durability === 'relaxed') {
      this.#timer = setInterval(() => this.#checkpoint(), opts.checkpointMs);
      this.#timer.unref();
    }
  }

  get strict(): boolean {
    return this.opts.durability === 'strict';
  }

  /**
   * Records a module's state (read from `snapshot` now in strict mode, at the next checkpoint in
   * relaxed mode) and the group step that produced it, if any. Throws when a strict write fails.
   */
  saveModule(name: string, snapshot: () => ModuleSnapshot, step?: StepRecord): void {
    if (this.strict) {
      this.#write({ modules: [{ name, snapshot: snapshot() }], steps: step ? [step] : [] });
      return;
    }
    this.#pendingDeletes.delete(name);
    this.#pendingModules.set(name, snapshot);
    if (step) this.#pendingSteps.push(step);
  }

  /** Records a group step that changed no module (a backward step). */
  saveStep(step: StepRecord): void {
    if (this.strict) this.#write({ steps: [step] });
    else this.#pendingSteps.push(step);
  }

  deleteModule(name: string): void {
    if (this.strict) {
      this.#write({ deleted: [name] });
      return;
    }
    this.#pendingModules.delete(name);
    this.#pendingSteps = this.#pendingSteps.filter((s) => s.module !== name);
    this.#pendingDeletes.add(name);
  }

  /** Writes what is pending (relaxed mode) and closes the store. */
  close(): void {
    clearInterval(this.#timer);
    this.#checkpoint();
    this.store.close();
  }

  #checkpoint(): void {
    if (this.#pendingModules.size === 0 && this.#pendingDeletes.size === 0 && this.#pendingSteps.length === 0) return;
    const changes: Changes = {
      deleted: [...this.#pendingDeletes],
      modules: [...this.#pendingModules].map(([name, snapshot]) => ({ name, snapshot: snapshot() })),
      steps: this.#pendingSteps,
    };
    try {
      this.#write(changes);
      this.#pendingDeletes.clear();
      this.#pendingModules.clear();
      this.#pendingSteps = [];
    } catch (err) {
      this.opts.logger.error({ err }, 'checkpoint failed; retrying at the next one');
    }
  }

  #write(changes: Changes): void {
    const started = process.hrtime.bigint();
    this.store.write(changes);
    this.opts.onWrite?.(Number(process.hrtime.bigint() - started) / 1e9);
  }
}
