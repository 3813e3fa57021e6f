/**
 * What forwards saved for backward, under a byte budget and a time-to-live. When the budget is
 * exceeded the oldest contexts are evicted; each eviction is reported through `onEvict`. A
 * context that is gone is remembered (bounded) so that Backward can say why: evicted, expired,
 * already used, or never issued.
 */
import { randomUUID } from 'node:crypto';
import { bnError } from '../errors.js';
import type { SavedForward } from '../nn/batch-norm.js';

export type GoneReason = 'evicted' | 'expired' | 'used' | 'module deleted';

export interface Eviction {
  readonly id: string;
  readonly module: string;
  readonly bytes: number;
  readonly reason: GoneReason;
}

/** Where a SyncForward's context belongs in its group. */
export interface GroupTag {
  readonly step: bigint;
  readonly rank: number;
  /** Whether the forward pooled the group's statistics (then backward pools its sums). */
  readonly synced: boolean;
}

export interface StoredContext {
  readonly saved: SavedForward;
  /** Set for contexts saved by SyncForward. */
  readonly group: GroupTag | undefined;
}

interface Entry extends StoredContext {
  readonly module: string;
  readonly bytes: number;
  readonly expiresAt: number;
}

const TOMBSTONES = 10_000;

export function savedBytes(saved: SavedForward): number {
  return saved.x.byteLength + saved.mean.byteLength + saved.invstd.byteLength + (saved.weight?.byteLength ?? 0);
}

/** What a forward of `elements` over `channels` will save (an upper bound of savedBytes). */
export function savedBytesFor(elements: number, channels: number): number {
  return elements * 4 + channels * (8 + 8 + 4);
}

export class ContextStore {
  /** In insertion order: the first entry is the oldest. */
  readonly #entries = new Map<string, Entry>();
  readonly #gone = new Map<string, { module: string; reason: GoneReason }>();
  #bytes = 0;
  readonly #sweeper: NodeJS.Timeout;

  constructor(
    private readonly budgetBytes: number,
    private readonly ttlMs: number,
    private readonly onEvict: (e: Eviction) => void = () => {},
    private readonly now: () => number = Date.now,
  ) {
    this.#sweeper = setInterval(() => this.sweep(), Math.max(100, Math.min(ttlMs, 60_000) / 4));
    this.#sweeper.unref();
  }

  get bytes(): number {
    return this.#bytes;
  }

  get size(): number {
    return this.#entries.size;
  }

  /** Refuses, before any work, a context that could never fit. */
  checkFits(bytes: number): void {
    if (bytes > this.budgetBytes) throw bnError('BN_ERR_CONTEXT_TOO_LARGE', { bytes, limit: this.budgetBytes });
  }

  /** Keeps `saved` for a later backward of `module`; returns its id. */
  put(module: string, saved: SavedForward, group?: GroupTag): string {
    const bytes = savedBytes(saved);
    this.checkFits(bytes);
    this.sweep();
    for (const [id, entry] of this.#entries) {
      if (this.#bytes + bytes <= this.budgetBytes) break;
      this.#drop(id, entry, 'evicted');
    }
    const id = randomUUID();
    this.#entries.set(id, { module, saved, group, bytes, expiresAt: this.now() + this.ttlMs });
    this.#bytes += bytes;
    return id;
  }

  /** The saved forward for a backward of `module`. */
  get(id: string, module: string): StoredContext {
    const entry = this.#entries.get(id);
    if (entry && entry.expiresAt <= this.now()) {
      this.#drop(id, entry, 'expired');
    } else if (entry) {
      if (entry.module !== module) throw bnError('BN_ERR_CONTEXT_NOT_FOUND', { id, why: `it belongs to module '${entry.module}', not '${module}'` });
      return entry;
    }
    const gone = this.#gone.get(id);
    const why =
      gone === undefined
        ? 'no forward saved this context (was save_for_backward set?)'
        : gone.reason === 'evicted'
          ? `it was evicted to keep saved contexts within context_budget_bytes=${this.budgetBytes}`
          : gone.reason === 'expired'
            ? `it expired: contexts live context_ttl_ms=${this.ttlMs} ms`
            : gone.reason === 'used'
              ? 'a Backward already used it (set retain_context to keep a context for another Backward)'
              : `module '${gone.module}' was deleted`;
    throw bnError('BN_ERR_CONTEXT_NOT_FOUND', { id, why });
  }

  /** Releases a context after the backward that used it. */
  release(id: string): void {
    const entry = this.#entries.get(id);
    if (entry) this.#drop(id, entry, 'used');
  }

  /** Drops every context of a module (it was deleted). */
  dropModule(module: string): void {
    for (const [id, entry] of this.#entries) if (entry.module === module) this.#drop(id, entry, 'module deleted');
  }

  sweep(): void {
    // Every context lives equally long, so the expired ones are the oldest.
    const now = this.now();
    for (const [id, entry] of this.#entries) {
      if (entry.expiresAt > now) break;
      this.#drop(id, entry, 'expired');
    }
  }

  close(): void {
    clearInterval(this.#sweeper);
  }

  #drop(id: string, entry: Entry, reason: GoneReason): void {
    this.#entries.delete(id);
    this.#bytes -= entry.bytes;
    this.#gone.set(id, { module: entry.module, reason });
    if (this.#gone.size > TOMBSTONES) this.#gone.delete(this.#gone.keys().next().value!);
    if (reason === 'evicted' || reason === 'expired') this.onEvict({ id, module: entry.module, bytes: entry.bytes, reason });
  }
}
