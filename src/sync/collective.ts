/**
 * One collective of a group, per phase (forward statistics, backward sums): each step, every rank
 * of the group contributes once; when all have, `complete` runs once and every rank gets its
 * result. PyTorch's all_gather / all_reduce, with defined outcomes instead of hangs:
 *
 * - a step waits at most `timeoutMs` from its first contribution; then every waiting rank gets
 *   ABORTED naming the missing ranks, and the step can be run again;
 * - a rank that sends the same payload again (a retry) gets the same result, while the step is
 *   open and for the last `keep` completed steps; a different payload gets ALREADY_EXISTS;
 * - a call that is cancelled (or whose deadline passes) takes its contribution back;
 * - steps run in order: a step older than the last completed one is refused, and a rank that sends
 *   another step while one is open is refused and aborts the open step for the others;
 * - `abort` ends the open step for everyone with a reason.
 */
import { bnError, type NormserveError } from '../errors.js';

interface Waiter<R> {
  resolve(result: R): void;
  reject(err: unknown): void;
}

interface Slot<P, R> {
  readonly payload: P;
  readonly key: string;
  readonly waiters: Set<Waiter<R>>;
}

interface Round<P, R> {
  readonly step: bigint;
  readonly worldSize: number;
  readonly slots: Map<number, Slot<P, R>>;
  readonly timer: NodeJS.Timeout;
}

interface Completed<R> {
  readonly keys: Map<number, string>;
  readonly result: Promise<R>;
}

export interface CollectiveOptions<P, R> {
  /** The module's name, for messages. */
  readonly name: string;
  /** What a payload is, for messages ("statistics", "gradient sums"). */
  readonly what: string;
  readonly timeoutMs: number;
  /** Completed steps whose results are kept for retries. */
  readonly keep: number;
  /** Checks a contribution against those already in the round (e.g. channel counts). */
  readonly check?: (rank: number, payload: P, others: ReadonlyMap<number, P>, step: bigint) => void;
  /** Runs once per step with every rank's payload, in rank order, and each rank's payload key. */
  readonly complete: (payloads: readonly P[], step: bigint, keys: ReadonlyMap<number, string>) => Promise<R>;
}

export class Collective<P, R> {
  #round: Round<P, R> | undefined;
  readonly #completed = new Map<bigint, Completed<R>>();
  #last: bigint | undefined;

  constructor(private readonly opts: CollectiveOptions<P, R>) {}

  /** The open step and its waiting calls (for the pending-steps gauge). */
  pending(): { steps: number; waiters: number } {
    const round = this.#round;
    if (!round) return { steps: 0, waiters: 0 };
    let waiters = 0;
    for (const slot of round.slots.values()) waiters += slot.waiters.size;
    return { steps: 1, waiters };
  }

  /** Puts back a step completed before a restart, so that retries get its result. */
  restore(step: bigint, keys: ReadonlyMap<number, string>, result: R): void {
    this.#completed.set(step, { keys: new Map(keys), result: Promise.resolve(result) });
    if (this.#last === undefined || step > this.#last) this.#last = step;
    while (this.#completed.size > this.opts.keep) this.#completed.delete(this.#smallestStep());
  }

  /** The result of a completed step, if it is still kept. */
  completed(step: bigint): Promise<R> | undefined {
    return this.#completed.get(step)?.result;
  }

  /** Contributes `payload` as `rank` to `step`; resolves with the step's result. */
  join(step: bigint, rank: number, worldSize: number, payload: P, key: string, signal?: AbortSignal): Promise<R> {
    const { name, what } = this.opts;
    const done = this.#completed.get(step);
    if (done) {
      const sent = done.keys.get(rank);
      if (sent !== key) throw bnError('BN_ERR_DUPLICATE_RANK', { rank, what, step, name });
      return done.result;
    }
    if (this.#last !== undefined && step <= this.#last) {
      throw bnError('BN_ERR_STEP_ORDER', { name, detail: `step ${step} is not newer than step ${this.#last}, the last completed, and its result is no longer kept; steps run in order` });
    }
    let round = this.#round;
    if (round && round.step !== step) {
      const missing = this.#missing(round);
      const why = `rank ${rank} sent step ${step} while step ${round.step} waits for ranks ${missing.join(', ')}: every rank must run every step, in order`;
      this.abort(why);
      throw bnError('BN_ERR_STEP_ORDER', { name, detail: why });
    }
    if (!round) {
      const created: Round<P, R> = {
        step,
        worldSize,
        slots: new Map(),
        timer: setTimeout(() => this.#timeout(created), this.opts.timeoutMs),
      };
      round = this.#round = created;
    }
    const existing = round.slots.get(rank);
    if (existing && existing.key !== key) throw bnError('BN_ERR_DUPLICATE_RANK', { rank, what, step, name });
    if (!existing) {
      const others = new Map([...round.slots].map(([r, s]) => [r, s.payload]));
      try {
        this.opts.check?.(rank, payload, others, step);
      } catch (err) {
        this.abort((err as Error).message);
        throw err;
      }
    }
    const slot = existing ?? { payload, key, waiters: new Set<Waiter<R>>() };
    round.slots.set(rank, slot);
    const current = round;
    const result = new Promise<R>((resolve, reject) => {
      const waiter: Waiter<R> = { resolve, reject };
      slot.waiters.add(waiter);
      signal?.addEventListener(
        'abort',
        () => {
          if (!slot.waiters.delete(waiter)) return;
          reject(bnError('BN_ERR_STEP_ABORTED', { step, name, why: `rank ${rank}'s call was cancelled` }));
          // The rank's slot is free again unless another call of it still waits.
          if (slot.waiters.size === 0 && this.#round === current && current.slots.get(rank) === slot) {
            current.slots.delete(rank);
            if (current.slots.size === 0) this.#close(current);
          }
        },
        { once: true },
      );
    });
    if (round.slots.size === round.worldSize) this.#complete(round);
    return result;
  }

  /** Aborts the open step if it is `step` (a rank of it sent something the step cannot take). */
  abortStep(step: bigint, why: string): void {
    if (this.#round?.step === step) this.abort(why);
  }

  /** Ends the open step for every waiting rank: ABORTED saying `why`, or the error given. */
  abort(why: string | NormserveError): void {
    const round = this.#round;
    if (!round) return;
    this.#close(round);
    const err = typeof why === 'string' ? bnError('BN_ERR_STEP_ABORTED', { step: round.step, name: this.opts.name, why }) : why;
    for (const slot of round.slots.values()) for (const w of slot.waiters) w.reject(err);
  }

  #complete(round: Round<P, R>): void {
    this.#close(round);
    const ranks = [...round.slots.keys()].sort((a, b) => a - b);
    const keys = new Map(ranks.map((r) => [r, round.slots.get(r)!.key]));
    const result = this.opts.complete(
      ranks.map((r) => round.slots.get(r)!.payload),
      round.step,
      keys,
    );
    this.#completed.set(round.step, { keys, result });
    result.then(
      (value) => {
        this.#last = this.#last === undefined || round.step > this.#last ? round.step : this.#last;
        while (this.#completed.size > this.opts.keep) this.#completed.delete(this.#smallestStep());
        for (const slot of round.slots.values()) for (const w of slot.waiters) w.resolve(value);
      },
      (err: unknown) => {
        // A step that failed as a whole (e.g. one value per channel in the group) can run again.
        this.#completed.delete(round.step);
        for (const slot of round.slots.values()) for (const w of slot.waiters) w.reject(err);
      },
    );
  }

  #timeout(round: Round<P, R>): void {
    if (this.#round !== round) return;
    const joined = [...round.slots.keys()].sort((a, b) => a - b);
    this.abort(
      bnError('BN_ERR_STEP_TIMEOUT', {
        step: round.step,
        name: this.opts.name,
        ms: this.opts.timeoutMs,
        missing: this.#missing(round).join(', '),
        joined: joined.length > 0 ? joined.join(', ') : 'none',
      }),
    );
  }

  #smallestStep(): bigint {
    let smallest: bigint | undefined;
    for (const step of this.#completed.keys()) if (smallest === undefined || step < smallest) smallest = step;
    return smallest!;
  }

  #missing(round: Round<P, R>): number[] {
    const missing: number[] = [];
    for (let r = 0; r < round.worldSize; r++) if (!round.slots.has(r)) missing.push(r);
    return missing;
  }

  #close(round: Round<P, R>): void {
    clearTimeout(round.timer);
    if (this.#round === round) this.#round = undefined;
  }
}
