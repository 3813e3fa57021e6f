/**
 * The named modules a server holds. Operations that change a module run one at a time per module
 * (a forward awaits its kernels between validation and commit, so two forwards must not overlap);
 * modules do not wait for each other. Reads see the last committed state.
 *
 * Every change reaches the store through here: after an operation that changed a module (also
 * one that then failed, as a forward that moved the counter does), the module's state is saved,
 * together with the group step that produced it, before the call is answered. In strict
 * durability a write that fails undoes the change and fails the call. A write whose outcome the
 * store could not confirm leaves the module in doubt: the call fails with BN_ERR_STORE_UNKNOWN,
 * and the module takes the stored state once the store has found out; until then its calls are
 * refused unchanged.
 *
 * With a shared store the registry holds the modules of the slots this replica owns: a `guard`
 * refuses operations on the others, also operations that were queued before their slot moved.
 */
import { bnError, NormserveError } from '../errors.js';
import { BatchNorm, type ModuleSnapshot } from '../nn/batch-norm.js';
import type { ModuleConfig } from '../nn/config.js';
import type { Persistence } from '../store/persistence.js';
import { StoreRefusal, StoreUncertain, type StepRecord } from '../store/store.js';

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
  /** A write whose outcome the store has not confirmed yet: the stored state once it has (null: none). */
  doubt?: { settled: boolean; outcome: ModuleSnapshot | null | undefined };
}

export interface Page {
  readonly modules: { name: string; module: BatchNorm }[];
  readonly nextPageToken: string;
}

export const DEFAULT_PAGE_SIZE = 100;
export const MAX_PAGE_SIZE = 1000;

/** ListModules' paging: the name the page starts after, and its size. */
export function pageRequest(pageSize: number, pageToken: string): { after: string; size: number } {
  let after = '';
  if (pageToken !== '') {
    after = Buffer.from(pageToken, 'base64url').toString('utf8');
    if (!NAME_PATTERN.test(after) || pageTokenAfter(after) !== pageToken) {
      throw bnError('BN_ERR_INVALID_PAGE_TOKEN', { token: JSON.stringify(pageToken.slice(0, 300)) });
    }
  }
  return { after, size: pageSize <= 0 ? DEFAULT_PAGE_SIZE : Math.min(pageSize, MAX_PAGE_SIZE) };
}

/** The page token of the page after `last`. */
export const pageTokenAfter = (last: string): string => Buffer.from(last, 'utf8').toString('base64url');

/** The call's error for a write that failed; `entry` is put in doubt when the store cannot tell. */
function storeError(err: unknown, entry: Entry | undefined, names: readonly string[]): NormserveError {
  if (err instanceof StoreRefusal && err.error) return err.error;
  if (err instanceof StoreUncertain) {
    if (entry) {
      const doubt: NonNullable<Entry['doubt']> = { settled: false, outcome: undefined };
      entry.doubt = doubt;
      void err.outcome.then((stored) => {
        doubt.outcome = stored.get(names[0]!) ?? null;
        doubt.settled = true;
      });
    }
    return bnError('BN_ERR_STORE_UNKNOWN', { detail: err.message });
  }
  return bnError('BN_ERR_STORE', { detail: (err as Error).message });
}

export interface RegistryOptions {
  /** Calls queued on one module at once. */
  readonly maxQueued?: number;
  /** Throws when this replica may not change `name` now (its slot is elsewhere, or moving). */
  readonly guard?: (name: string) => void;
}

export class ModuleRegistry {
  readonly #entries = new Map<string, Entry>();
  readonly #maxQueued: number;
  readonly #guard: (name: string) => void;

  constructor(
    private readonly maxModules: number,
    private readonly persistence: Persistence,
    opts: RegistryOptions = {},
  ) {
    this.#maxQueued = opts.maxQueued ?? Number.POSITIVE_INFINITY;
    this.#guard = opts.guard ?? (() => {});
  }

  /** Puts back modules found in the store (at start, or when this replica takes over their slot). */
  restore(modules: readonly { name: string; snapshot: ModuleSnapshot }[]): void {
    for (const { name, snapshot } of modules) this.#entries.set(name, { module: BatchNorm.fromSnapshot(snapshot), tail: Promise.resolve(), queued: 0 });
  }

  /**
   * Lets go of the modules `which` selects (their slot has moved): once the operations that are
   * running on them have finished, they are gone from this replica. Operations still queued then
   * find the guard's refusal.
   */
  async evict(which: (name: string) => boolean): Promise<string[]> {
    const names = [...this.#entries.keys()].filter(which);
    await Promise.all(names.map((name) => this.#entries.get(name)!.tail));
    for (const name of names) this.#entries.delete(name);
    return names;
  }

  get size(): number {
    return this.#entries.size;
  }

  async create(name: string, config: ModuleConfig): Promise<BatchNorm> {
    checkModuleName(name);
    this.#guard(name);
    if (this.#entries.has(name)) throw bnError('BN_ERR_MODULE_EXISTS', { name });
    if (this.#entries.size >= this.maxModules) {
      throw bnError('BN_ERR_TOO_MANY_MODULES', { name, count: this.#entries.size, limit: this.maxModules });
    }
    const module = new BatchNorm(config);
    // The name is taken now, and operations on the module wait for its write: none is answered
    // before the module is durable.
    const entry: Entry = { module, tail: Promise.resolve(), queued: 0 };
    this.#entries.set(name, entry);
    const created = this.persistence.saveModule(name, () => module.snapshot()).catch((err: unknown) => {
      const error = storeError(err, entry, [name]);
      if (!entry.doubt) this.#entries.delete(name);
      throw error;
    });
    entry.tail = created.catch(() => undefined);
    await created;
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
    if (entry.queued >= this.#maxQueued) {
      throw bnError('BN_ERR_TOO_MANY_CALLS', { count: entry.queued, where: `queued on module '${name}'`, limit: `max_calls_per_module=${this.#maxQueued}` });
    }
    entry.queued++;
    const run = entry.tail.then(async () => {
      // The module's slot may have moved while this operation waited.
      this.#guard(name);
      // A delete queued ahead of this operation has removed the module meanwhile.
      if (this.#entries.get(name) !== entry) throw bnError('BN_ERR_MODULE_NOT_FOUND', { name });
      if (signal?.aborted) throw bnError('BN_ERR_CANCELLED', {});
      this.#settleDoubt(name, entry);
      const module = entry.module;
      const generation = module.generation;
      const before = this.persistence.writesThrough ? module.snapshot() : undefined;
      const save = async (step?: StepRecord) => {
        if (module.generation === generation && !step) return;
        try {
          if (module.generation === generation) await this.persistence.saveStep(step!);
          else await this.persistence.saveModule(name, () => module.snapshot(), step);
        } catch (err) {
          if (before) module.restore(before);
          throw storeError(err, entry, [name]);
        }
      };
      let result: T;
      try {
        result = await op(module);
      } catch (err) {
        await save();
        throw err;
      }
      await save(record?.(result));
      return result;
    });
    entry.tail = run.catch(() => undefined).finally(() => entry.queued--);
    return run;
  }

  /** Deletes after the module's pending operations have finished. */
  async delete(name: string): Promise<void> {
    await this.exclusive(name, async () => {
      try {
        await this.persistence.deleteModule(name);
      } catch (err) {
        throw storeError(err, this.#entries.get(name), [name]);
      }
      this.#entries.delete(name);
    });
  }

  /**
   * A module in doubt takes the stored state once the store knows it (or is gone, when none is
   * stored); until then its operations are refused unchanged.
   */
  #settleDoubt(name: string, entry: Entry): void {
    const doubt = entry.doubt;
    if (!doubt) return;
    if (!doubt.settled) throw bnError('BN_ERR_STORE', { detail: 'the outcome of an earlier change to this module is not confirmed yet' });
    entry.doubt = undefined;
    if (doubt.outcome === null) {
      this.#entries.delete(name);
      throw bnError('BN_ERR_MODULE_NOT_FOUND', { name });
    }
    if (doubt.outcome !== undefined) entry.module.restore(doubt.outcome);
  }

  /** A page of the modules `visible` allows, in name order. */
  list(pageSize: number, pageToken: string, visible: (name: string) => boolean = () => true): Page {
    const { after, size } = pageRequest(pageSize, pageToken);
    const names = [...this.#entries.keys()].filter((n) => n > after && visible(n)).sort();
    const page = names.slice(0, size);
    return {
      modules: page.map((name) => ({ name, module: this.#entries.get(name)!.module })),
      nextPageToken: names.length > size ? pageTokenAfter(page[page.length - 1]!) : '',
    };
  }

  #entry(name: string): Entry {
    const entry = this.#entries.get(checkModuleName(name));
    if (!entry) throw bnError('BN_ERR_MODULE_NOT_FOUND', { name });
    return entry;
  }
}
