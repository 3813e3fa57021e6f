/**
 * The SyncBatchNorm coordinator: for each group module, a forward collective that pools the ranks'
 * statistics and commits the module's step once, and a backward collective that sums the ranks'
 * gradient reductions. It merges numbers and commits through the module layer; it never sees the
 * wire.
 */
import { createHash } from 'node:crypto';
import { bnError, type NormserveError } from '../errors.js';
import { torchSize } from '../nn/batch-norm.js';
import type { ModuleRegistry } from '../registry/module-registry.js';
import type { StepRecord } from '../store/store.js';
import { Collective } from './collective.js';
import { mergeStats, sumVectors, type RankStats } from './merge.js';

/** A rank's forward contribution; `shape` when the server saw the shard (SyncForward). */
export interface StatsPayload extends RankStats {
  readonly channels: number;
  readonly shape?: readonly number[];
}

/** What every rank of a forward step gets: the group's statistics to normalise with. */
export interface GroupStats {
  readonly count: number;
  readonly mean: Float64Array;
  /** Biased variance, M2 / count. */
  readonly var: Float64Array;
  readonly invstd: Float64Array;
}

export interface GradPayload {
  readonly sumDy: Float64Array;
  readonly sumDyXmu: Float64Array;
}

export interface GroupGrads extends GradPayload {
  /** The forward step's group count. */
  readonly count: number;
}

interface Group {
  readonly forward: Collective<StatsPayload, GroupStats>;
  readonly backward: Collective<GradPayload & { count: number }, GroupGrads>;
}

export interface CoordinatorOptions {
  readonly stepTimeoutMs: number;
  /** Completed steps kept per group and phase for retries. */
  readonly keepSteps: number;
}

/** A stable key of a payload's numbers, to tell a retry from a different payload. */
export function payloadKey(...parts: (number | Float64Array)[]): string {
  const hash = createHash('sha1');
  for (const p of parts) hash.update(typeof p === 'number' ? Buffer.from(Float64Array.of(p).buffer) : Buffer.from(p.buffer, p.byteOffset, p.byteLength));
  return hash.digest('base64');
}

export class Coordinator {
  readonly #groups = new Map<string, Group>();

  constructor(
    private readonly registry: ModuleRegistry,
    private readonly opts: CoordinatorOptions,
  ) {}

  /** Open steps and waiting calls over all groups: both return to 0 when nothing waits. */
  pending(): { steps: number; waiters: number } {
    let steps = 0;
    let waiters = 0;
    for (const g of this.#groups.values()) {
      for (const c of [g.forward, g.backward]) {
        const p = c.pending();
        steps += p.steps;
        waiters += p.waiters;
      }
    }
    return { steps, waiters };
  }

  /** Joins the forward step; the last rank to arrive commits the module's step. */
  gather(name: string, step: bigint, rank: number, worldSize: number, payload: StatsPayload, signal?: AbortSignal): Promise<GroupStats> {
    const key = payloadKey(payload.count, payload.mean, payload.m2);
    return this.#group(name).forward.join(step, rank, worldSize, payload, key, signal);
  }

  /** Joins the backward step with this rank's sums. */
  reduce(name: string, step: bigint, rank: number, worldSize: number, payload: GradPayload & { count: number }, signal?: AbortSignal): Promise<GroupGrads> {
    const key = payloadKey(payload.sumDy, payload.sumDyXmu);
    return this.#group(name).backward.join(step, rank, worldSize, payload, key, signal);
  }

  /** The group count of a completed forward step, if it is still kept. */
  async forwardCount(name: string, step: bigint): Promise<number | undefined> {
    const done = this.#groups.get(name)?.forward.completed(step);
    return done === undefined ? undefined : (await done).count;
  }

  /**
   * Ends the open steps of a group: ABORTED saying `why` (a rank sent something the step cannot
   * take), or the error given (the server stops).
   */
  abort(name: string, why: string | NormserveError): void {
    const g = this.#groups.get(name);
    g?.forward.abort(why);
    g?.backward.abort(why);
  }

  /** Aborts `step` of a phase if it is open: a rank of it sent something the step cannot take. */
  abortStep(name: string, phase: 'forward' | 'backward', step: bigint, why: string): void {
    this.#groups.get(name)?.[phase].abortStep(step, why);
  }

  /** Forgets a deleted or converted module's group, aborting its open steps. */
  drop(name: string, why: string): void {
    this.abort(name, why);
    this.#groups.delete(name);
  }

  /** Forgets the groups of the modules `which` selects (their slot moved), ending their open steps with `error`. */
  dropWhere(which: (name: string) => boolean, error: (name: string) => NormserveError): void {
    for (const name of [...this.#groups.keys()]) {
      if (!which(name)) continue;
      this.abort(name, error(name));
      this.#groups.delete(name);
    }
  }

  abortAll(err: NormserveError): void {
    for (const name of this.#groups.keys()) this.abort(name, err);
  }

  #group(name: string): Group {
    let g = this.#groups.get(name);
    if (g) return g;
    const { stepTimeoutMs: timeoutMs, keepSteps: keep } = this.opts;
    const channelsCheck = <T extends { count: number; channels?: number }>(channelsOf: (p: T) => number) => {
      return (rank: number, payload: T, others: ReadonlyMap<number, T>, step: bigint) => {
        if (payload.count === 0) return;
        for (const [other, p] of others) {
          if (p.count === 0 || channelsOf(p) === channelsOf(payload)) continue;
          throw bnError('BN_ERR_GROUP_CHANNELS', { rank, channels: channelsOf(payload), step, name, other, expected: channelsOf(p) });
        }
      };
    };
    g = {
      forward: new Collective<StatsPayload, GroupStats>({
        name,
        what: 'statistics',
        timeoutMs,
        keep,
        check: channelsCheck((p) => p.channels),
        complete: (payloads, step, keys) => this.#commitForward(name, payloads, step, keys),
      }),
      backward: new Collective<GradPayload & { count: number }, GroupGrads>({
        name,
        what: 'gradient sums',
        timeoutMs,
        keep,
        complete: (payloads, step, keys) => {
          const channels = payloads.find((p) => p.count > 0)?.sumDy.length ?? payloads[0]!.sumDy.length;
          const live = payloads.filter((p) => p.sumDy.length === channels);
          const totals: GroupGrads = {
            sumDy: sumVectors(live.map((p) => p.sumDy), channels),
            sumDyXmu: sumVectors(live.map((p) => p.sumDyXmu), channels),
            count: payloads.reduce((n, p) => Math.max(n, p.count), 0),
          };
          // Recorded so that a retry after a restart gets the same sums.
          return this.registry.exclusive(name, () => totals, (t) => stepRecord(name, 'backward', step, keys, gradsToJson(t)));
        },
      }),
    };
    this.#groups.set(name, g);
    return g;
  }

  /** Puts back the steps completed before a restart. */
  restore(records: readonly StepRecord[]): void {
    for (const r of records) {
      const g = this.#group(r.module);
      if (r.phase === 'forward') g.forward.restore(r.step, r.keys, statsFromJson(r.result));
      else g.backward.restore(r.step, r.keys, gradsFromJson(r.result));
    }
  }

  /** Merges the ranks' statistics and commits the step to the module, once, with its record. */
  async #commitForward(name: string, payloads: readonly StatsPayload[], step: bigint, keys: ReadonlyMap<number, string>): Promise<GroupStats> {
    const live = payloads.filter((p) => p.count > 0);
    const channels = live[0]?.channels ?? payloads[0]!.channels;
    const merged = mergeStats(live, channels);
    // PyTorch's text names the input size; for the group that is the concatenated batch, whose one
    // value came from the single non-empty shard.
    const single = live[0];
    const size = single?.shape ? torchSize(single.shape) : torchSize([1, channels]);
    return this.registry.exclusive(
      name,
      (module): GroupStats => {
        const stats = module.commitGroupStep(merged, module.plan(), size);
        return {
          count: merged.count,
          mean: stats.mean,
          var: merged.count > 0 ? merged.m2.map((m) => m / merged.count) : new Float64Array(0),
          invstd: stats.invstd,
        };
      },
      (stats) => stepRecord(name, 'forward', step, keys, statsToJson(stats)),
    );
  }
}

function stepRecord(module: string, phase: 'forward' | 'backward', step: bigint, keys: ReadonlyMap<number, string>, result: string): StepRecord {
  return { module, phase, step, keys, result };
}

/** Float64 vectors as base64 of their bytes: exact, NaN and infinities included. */
const list = (v: Float64Array) => Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('base64');
const vec = (text: string) => {
  const bytes = Buffer.from(text, 'base64');
  const out = new Float64Array(bytes.byteLength / 8);
  new Uint8Array(out.buffer).set(bytes);
  return out;
};

function statsToJson(s: GroupStats): string {
  return JSON.stringify({ count: s.count, mean: list(s.mean), var: list(s.var), invstd: list(s.invstd) });
}

function statsFromJson(text: string): GroupStats {
  const o = JSON.parse(text) as { count: number; mean: string; var: string; invstd: string };
  return { count: o.count, mean: vec(o.mean), var: vec(o.var), invstd: vec(o.invstd) };
}

function gradsToJson(g: GroupGrads): string {
  return JSON.stringify({ count: g.count, sumDy: list(g.sumDy), sumDyXmu: list(g.sumDyXmu) });
}

function gradsFromJson(text: string): GroupGrads {
  const o = JSON.parse(text) as { count: number; sumDy: string; sumDyXmu: string };
  return { count: o.count, sumDy: vec(o.sumDy), sumDyXmu: vec(o.sumDyXmu) };
}
