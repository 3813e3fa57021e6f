/**
 * The named modules a server holds. Operations that change a module run one at a time per module
 * (a forward awaits its kernels between validation and commit, so two forwards must not overlap);
 * modules do not wait for each other. Reads see the last committed state.
 *
 * Every change reaches the store through here: after an operation that changed a module (also
 * one that then failed, as a forward that moved the counter does), the module's state is saved,
 * together with the group step that produced it. In strict durability a write that fails undoes
 * the change and fails the call.
 */
import { bnError, NormserveError } from '../errors.js';
import { BatchNorm, type ModuleSnapshot } from '../nn/batch-norm.js';
import type { ModuleConfig } from '../nn/config.js';
import type { Persistence } from '../store/persistence.js';
import type { StepRecord } from '../store/store.js';

const NAME_PATTERN = /^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,255}$/;

export function checkModuleName(name: string): string {
  if (!NAME_PATTERN.test(name)) throw bnError('BN_ERR_INVALID_NAME', { name: JSON.stringify(name.slice(0, 300)) });
  return name;
}

interface Entry {
  readonly module: BatchNorm;
  /** The tail of this module's chain of serialised operations. */
  tail: Promise<unknown>;
  /** Operations queued or running on this module. */
  queued: number;
}

export interface Page {
  readonly modules: { name: string; module: BatchNorm }[];
  readonly nextPageToken: string;
}

export const DEFAULT_PAGE_SIZE = 100;
export const MAX_PAGE_SIZE = 1000;

function storeError(err: unknown): NormserveError {
  return bnError('BN_ERR_STORE', { detail: (err as Error).message });
}

export class ModuleRegistry {
  readonly #entries = new Map<string, Entry>();

  constructor(
    private readonly maxModules: number,
    private readonly persistence: Persistence,
    private readonly maxQueued = Number.POSITIVE_INFINITY,
  ) {}

  /** Puts back modules found in the store at start. */
  restore(modules: readonly { name: string; snapshot: ModuleSnapshot }[]): void {
    for (const { name, snapshot } of modules) this.#entries.set(name, { module: BatchNorm.fromSnapshot(snapshot), tail: Promise.resolve(), queued: 0 });
  }

  get size(): number {
    return this.#entries.size;
  }

  create(name: string, config: ModuleConfig): BatchNorm {
    checkModuleName(name);
    if (this.#entries.has(name)) throw bnError('BN_ERR_MODULE_EXISTS', { name });
    if (this.#entries.size >= this.maxModules) {
      throw bnError('BN_ERR_TOO_MANY_MODULES', { name, count: this.#entries.size, limit: this.maxModules });
    }
    const module = new BatchNorm(config);
    try {
      this.persistence.saveModule(name, () => module.snapshot());
    } catch (err) {
      throw storeError(err);
    }
    this.#entries.set(name, { module, tail: Promise.resolve(), queued: 0 });
    return module;
  }

  has(name: string): boolean {
    return this.#entries.has(name);
  }

  get(name: string): BatchNorm {
    return this.#entry(name).module;
  }

  /**
   * Runs `op` on the module once every earlier operation on it has finished, then saves what it
   * changed, with the group step `record` derives from its result. An operation whose call is
   * cancelled while it waits does not run.
   */
  async exclusive<T>(
    name: string,
    op: (module: BatchNorm) => T | Promise<T>,
    record?: (result: T) => StepRecord,
    signal?: AbortSignal,
  ): Promise<T> {
    const entry = this.#entry(name);
    if (entry.queued >= this.maxQueued) {
      throw bnError('BN_ERR_TOO_MANY_CALLS', { count: entry.queued, where: `queued on module '${name}'`, limit: `max_calls_per_module=${this.maxQueued}` });
    }
    entry.queued++;
    const run = entry.tail.then(async () => {
      // A delete queued ahead of this operation has removed the module meanwhile.
      if (this.#entries.get(name) !== entry) throw bnError('BN_ERR_MODULE_NOT_FOUND', { name });
      if (signal?.aborted) throw bnError('BN_ERR_CANCELLED', {});
      const module = entry.module;
      const generation = module.generation;
      const before = this.persistence.strict ? module.snapshot() : undefined;
      const save = (step?: StepRecord) => {
        if (module.generation === generation && !step) return;
        try {
          if (module.generation === generation) this.persistence.saveStep(step!);
          else this.persistence.saveModule(name, () => module.snapshot(), step);
        } catch (err) {
          if (before) module.restore(before);
          throw storeError(err);
        }
      };
      let result: T;
      try {
        result = await op(module);
      } catch (err) {
        save();
        throw err;
      }
      save(record?.(result));
      return result;
    });
    entry.tail = run.catch(() => undefined).finally(() => entry.queued--);
    return run;
  }

  /** Deletes after the module's pending operations have finished. */
  async delete(name: string): Promise<void> {
    await this.exclusive(name, () => {
      try {
        this.persistence.deleteModule(name);
      } catch (err) {
        throw storeError(err);
      }
      this.#entries.delete(name);
    });
  }

  /** A page of the modules `visible` allows, in name order. */
  list(pageSize: number, pageToken: string, visible: (name: string) => boolean = () => true): Page {
    let after = '';
    if (pageToken !== '') {
      after = Buffer.from(pageToken, 'base64url').toString('utf8');
      if (!NAME_PATTERN.test(after) || Buffer.from(after, 'utf8').toString('base64url') !== pageToken) {
        throw bnError('BN_ERR_INVALID_PAGE_TOKEN', { token: JSON.stringify(pageToken.slice(0, 300)) });
      }
    }
    const size = pageSize <= 0 ? DEFAULT_PAGE_SIZE : Math.min(pageSize, MAX_PAGE_SIZE);
    const names = [...this.#entries.keys()].filter((n) => n > after && visible(n)).sort();
    const page = names.slice(0, size);
    const last = page[page.length - 1];
    return {
      modules: page.map((name) => ({ name, module: this.#entries.get(name)!.module })),
      nextPageToken: names.length > size && last !== undefined ? Buffer.from(last, 'utf8').toString('base64url') : '',
    };
  }

  #entry(name: string): Entry {
    const entry = this.#entries.get(checkModuleName(name));
    if (!entry) throw bnError('BN_ERR_MODULE_NOT_FOUND', { name });
    return entry;
  }
}
