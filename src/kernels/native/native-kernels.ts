/**
 * The native backend: hand-written typed-array loops (loops.ts) on every core. A tensor in shared
 * memory is split into as many ranges as there are cores; the calling thread takes one range and
 * worker threads the others, and their per-channel float64 sums are added here. Statistics take
 * one pass over x (sums shifted by each channel's first value), the forward output one more; the
 * backward likewise. Outputs go straight into shared memory that the wire encodes without a copy.
 *
 * Small tensors stay on the calling thread: handing work to a thread costs tens of microseconds,
 * more than the loops need below `inlineBelow` elements.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { ChannelStats, GradInputParams, GradSums, Kernels, Layout, NormalizeParams } from '../kernels.js';
import { gradInputUnits, gradSumsUnits, normalizeUnits, statsUnits } from './loops.js';

export interface NativeOptions {
  /** Threads to use, the calling one included (default: the cores Node may use). */
  readonly threads?: number;
  /**
   * Tensors with fewer elements run on the calling thread alone, and a tensor is split into at
   * most one range per this many elements (default 65536).
   */
  readonly inlineBelow?: number;
  /** Most bytes of released tensors kept for reuse (default 128 MiB). */
  readonly poolBytes?: number;
}

type Task =
  | { op: 'stats'; x: Float32Array; c: number; s: number; u0: number; u1: number; k: Float64Array }
  | { op: 'normalize'; x: Float32Array; y: Float32Array; c: number; s: number; u0: number; u1: number; p: NormalizeParams }
  | { op: 'gradSums'; x: Float32Array; dy: Float32Array; c: number; s: number; u0: number; u1: number; mean: Float64Array }
  | { op: 'gradInput'; x: Float32Array; dy: Float32Array; gi: Float32Array; c: number; s: number; u0: number; u1: number; p: GradInputParams };

/** Runs one task on this thread; WORKER_SOURCE's `run` is its twin in the workers. */
function runTask(t: Task): Float64Array | null {
  switch (t.op) {
    case 'stats': {
      const acc = new Float64Array(2 * t.c);
      statsUnits(t.x, t.c, t.s, t.u0, t.u1, t.k, acc);
      return acc;
    }
    case 'normalize':
      normalizeUnits(t.x, t.y, t.c, t.s, t.u0, t.u1, t.p.mean, t.p.scale, t.p.shift);
      return null;
    case 'gradSums': {
      const acc = new Float64Array(2 * t.c);
      gradSumsUnits(t.x, t.dy, t.c, t.s, t.u0, t.u1, t.mean, acc);
      return acc;
    }
    case 'gradInput':
      gradInputUnits(t.x, t.dy, t.gi, t.c, t.s, t.u0, t.u1, t.p.mean, t.p.a, t.p.b, t.p.k);
      return null;
  }
}

/**
 * The worker threads' program: the loops, as source, and a dispatcher like runTask that answers
 * tasks by id.
 */
const WORKER_SOURCE = `'use strict';
const { parentPort } = require('node:worker_threads');
${statsUnits.toString()}
${normalizeUnits.toString()}
${gradSumsUnits.toString()}
${gradInputUnits.toString()}
function run(t) {
  switch (t.op) {
    case 'stats': { const acc = new Float64Array(2 * t.c); statsUnits(t.x, t.c, t.s, t.u0, t.u1, t.k, acc); return acc; }
    case 'normalize': normalizeUnits(t.x, t.y, t.c, t.s, t.u0, t.u1, t.p.mean, t.p.scale, t.p.shift); return null;
    case 'gradSums': { const acc = new Float64Array(2 * t.c); gradSumsUnits(t.x, t.dy, t.c, t.s, t.u0, t.u1, t.mean, acc); return acc; }
    case 'gradInput': gradInputUnits(t.x, t.dy, t.gi, t.c, t.s, t.u0, t.u1, t.p.mean, t.p.a, t.p.b, t.p.k); return null;
    default: throw new Error('unknown task ' + t.op);
  }
}
parentPort.on('message', ({ id, task }) => {
  try {
    parentPort.postMessage({ id, acc: run(task) });
  } catch (err) {
    parentPort.postMessage({ id, error: String((err && err.stack) || err) });
  }
});`;

interface Pending {
  resolve(acc: Float64Array | null): void;
  reject(err: Error): void;
}

export class NativeKernels implements Kernels {
  readonly backend = 'native' as const;
  readonly description: string;
  readonly #threads: number;
  readonly #inlineBelow: number;
  readonly #workers: Worker[] = [];
  readonly #pending = new Map<number, Pending>();
  #nextId = 0;
  #disposed = false;
  /**
   * Released shared tensors by length, oldest first. Fresh memory costs a page fault per 4 KiB on
   * first touch, which for a 25 MB tensor is more than the kernels themselves.
   */
  readonly #free = new Map<number, Float32Array[]>();
  readonly #pooled = new WeakSet<SharedArrayBuffer>();
  readonly #poolBytes: number;
  #freeBytes = 0;

  constructor(options: NativeOptions = {}) {
    this.#threads = Math.max(1, Math.floor(options.threads ?? availableParallelism()));
    this.#inlineBelow = Math.max(0, options.inlineBelow ?? 65_536);
    this.#poolBytes = Math.max(0, options.poolBytes ?? 128 * 1024 * 1024);
    for (let i = 1; i < this.#threads; i++) this.#workers.push(this.#spawn());
    this.description = `typed-array loops on ${this.#threads} thread${this.#threads === 1 ? '' : 's'} (float64 sums; tensors under ${this.#inlineBelow} elements on one)`;
  }

  /** Shared memory for tensors the workers will read, plain memory for the ones they will not. */
  allocate(length: number): Float32Array {
    if (!this.#parallel(length)) return new Float32Array(length);
    const reused = this.#free.get(length)?.pop();
    if (reused) {
      this.#freeBytes -= reused.byteLength;
      this.#pooled.delete(reused.buffer as SharedArrayBuffer);
      return reused;
    }
    return new Float32Array(new SharedArrayBuffer(length * 4));
  }

  /**
   * Takes back a tensor this backend allocated, once nothing reads it any more, for a later
   * `allocate` of the same length. Anything else is left to the garbage collector.
   */
  release(tensor: Float32Array): void {
    const buffer = tensor.buffer;
    if (!(buffer instanceof SharedArrayBuffer) || this.#pooled.has(buffer) || tensor.byteOffset !== 0 || tensor.byteLength !== buffer.byteLength) return;
    if (tensor.byteLength > this.#poolBytes || this.#disposed) return;
    let list = this.#free.get(tensor.length);
    if (!list) this.#free.set(tensor.length, (list = []));
    list.push(tensor);
    this.#pooled.add(buffer);
    this.#freeBytes += tensor.byteLength;
    // Over the budget: drop the oldest lengths' buffers first.
    for (const [length, buffers] of this.#free) {
      if (this.#freeBytes <= this.#poolBytes) break;
      while (buffers.length > 0 && this.#freeBytes > this.#poolBytes) {
        const dropped = buffers.shift()!;
        this.#pooled.delete(dropped.buffer as SharedArrayBuffer);
        this.#freeBytes -= dropped.byteLength;
      }
      if (buffers.length === 0) this.#free.delete(length);
    }
  }

  /** Bytes held for reuse now. */
  get pooledBytes(): number {
    return this.#freeBytes;
  }

  async stats(x: Float32Array, layout: Layout): Promise<ChannelStats> {
    const { n, c, s } = layout;
    const count = n * s;
    // Shift each channel by its first value; a non-finite one would turn every difference into NaN.
    const k = new Float64Array(c);
    for (let ch = 0; ch < c; ch++) {
      const v = x[ch * s]!;
      k[ch] = Number.isFinite(v) ? v : 0;
    }
    const xs = this.#shared(x);
    const acc = await this.#reduce(layout, x.length, (u0, u1) => ({ op: 'stats', x: xs, c, s, u0, u1, k }));
    const mean = new Float64Array(c);
    const m2 = new Float64Array(c);
    for (let ch = 0; ch < c; ch++) {
      const sum = acc[ch]!;
      mean[ch] = k[ch]! + sum / count;
      const dev = acc[c + ch]! - (sum * sum) / count;
      m2[ch] = dev > 0 ? dev : Number.isNaN(dev) ? dev : 0;
    }
    return { mean, m2 };
  }

  async normalize(x: Float32Array, layout: Layout, p: NormalizeParams): Promise<Float32Array> {
    const y = this.allocate(x.length);
    const xs = this.#shared(x);
    await this.#each(layout, x.length, (u0, u1) => ({ op: 'normalize', x: xs, y, c: layout.c, s: layout.s, u0, u1, p }));
    return y;
  }

  async gradSums(x: Float32Array, dy: Float32Array, layout: Layout, mean: Float64Array): Promise<GradSums> {
    const c = layout.c;
    const xs = this.#shared(x);
    const dys = this.#shared(dy);
    const acc = await this.#reduce(layout, x.length, (u0, u1) => ({ op: 'gradSums', x: xs, dy: dys, c, s: layout.s, u0, u1, mean }));
    return { sumDy: acc.slice(0, c), sumDyXmu: acc.slice(c) };
  }

  async gradInput(x: Float32Array, dy: Float32Array, layout: Layout, p: GradInputParams): Promise<Float32Array> {
    const gi = this.allocate(x.length);
    const xs = this.#shared(x);
    const dys = this.#shared(dy);
    await this.#each(layout, x.length, (u0, u1) => ({ op: 'gradInput', x: xs, dy: dys, gi, c: layout.c, s: layout.s, u0, u1, p }));
    return gi;
  }

  async dispose(): Promise<void> {
    this.#disposed = true;
    this.#free.clear();
    this.#freeBytes = 0;
    this.#failAll(new Error('the native backend was disposed'));
    await Promise.all(this.#workers.splice(0).map((w) => w.terminate()));
  }

  #parallel(length: number): boolean {
    return this.#workers.length > 0 && length >= this.#inlineBelow;
  }

  /** x itself when workers can read it (or none will), else a copy in shared memory. */
  #shared(x: Float32Array): Float32Array {
    if (!this.#parallel(x.length) || x.buffer instanceof SharedArrayBuffer) return x;
    const copy = new Float32Array(new SharedArrayBuffer(x.byteLength));
    copy.set(x);
    return copy;
  }

  /** The task over every unit, split between threads; the per-channel sums added up. */
  async #reduce(layout: Layout, length: number, task: (u0: number, u1: number) => Task): Promise<Float64Array> {
    const parts = await this.#split(layout, length, task);
    const total = parts[0]!;
    for (let p = 1; p < parts.length; p++) {
      const acc = parts[p]!;
      for (let i = 0; i < total.length; i++) total[i] = total[i]! + acc[i]!;
    }
    return total;
  }

  async #each(layout: Layout, length: number, task: (u0: number, u1: number) => Task): Promise<void> {
    await this.#split(layout, length, task);
  }

  async #split(layout: Layout, length: number, task: (u0: number, u1: number) => Task): Promise<Float64Array[]> {
    if (this.#disposed) throw new Error('the native backend was disposed');
    const units = layout.s === 1 ? layout.n : layout.n * layout.c;
    // At least `inlineBelow` elements per thread: on many cores a mid-sized tensor split into
    // slivers costs more in hand-offs than it saves (16 threads made (8,256,14,14) slower than 2).
    const worth = Math.floor(length / Math.max(1, this.#inlineBelow));
    const parts = this.#parallel(length) ? Math.max(1, Math.min(this.#threads, units, worth)) : 1;
    const bound = (p: number) => Math.round((units * p) / parts);
    // Workers first, so that they run while this thread does its own range.
    const others = [];
    for (let p = 1; p < parts; p++) others.push(this.#post(this.#workers[p - 1]!, task(bound(p), bound(p + 1))));
    const own = runTask(task(0, bound(1)));
    const results = await Promise.all(others);
    return [own, ...results].filter((r): r is Float64Array => r !== null);
  }

  #post(worker: Worker, task: Task): Promise<Float64Array | null> {
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      if (this.#pending.size === 0) for (const w of this.#workers) w.ref();
      this.#pending.set(id, { resolve, reject });
      worker.postMessage({ id, task });
    });
  }

  #settle(id: number): Pending | undefined {
    const pending = this.#pending.get(id);
    this.#pending.delete(id);
    // Idle workers must not keep the process alive.
    if (this.#pending.size === 0) for (const w of this.#workers) w.unref();
    return pending;
  }

  #spawn(): Worker {
    const worker = new Worker(WORKER_SOURCE, { eval: true, name: 'normserve-native' });
    worker.unref();
    worker.on('message', (m: { id: number; acc?: Float64Array | null; error?: string }) => {
      const pending = this.#settle(m.id);
      if (m.error !== undefined) pending?.reject(new Error(`native worker failed: ${m.error}`));
      else pending?.resolve(m.acc ?? null);
    });
    worker.on('error', (err) => {
      // A dead worker fails the calls in flight; a new one takes its place for later calls.
      this.#failAll(new Error(`native worker died: ${err.message}`));
      const at = this.#workers.indexOf(worker);
      if (at >= 0 && !this.#disposed) this.#workers[at] = this.#spawn();
    });
    return worker;
  }

  #failAll(err: Error): void {
    for (const id of [...this.#pending.keys()]) this.#settle(id)?.reject(err);
  }
}
