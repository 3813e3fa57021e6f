/**
 * The native backend: hand-written typed-array loops (loops.ts) on every core. A tensor in shared
 * memory is cut into chunks by its layout alone; the calling thread and worker threads take
 * chunks from a shared counter, each chunk's per-channel float64 sums go into a row of their own,
 * and the rows are added in order, so the bits do not depend on the threads. Statistics take one
 * pass over x (sums shifted by each channel's first value), the forward output one more; the
 * backward likewise. A fused forward or backward hands off once: the threads meet when every
 * reduction chunk is done and go on to the element-wise pass without coming back here.
 *
 * Every pass returns once its chunks are done, the calling thread waiting (blocking, on Atomics)
 * only for chunks that a worker has taken; a worker that has not woken up yet finds nothing left
 * and costs nothing. Outputs go straight into shared memory.
 *
 * Small tensors stay on the calling thread: handing work to a thread costs tens of microseconds,
 * more than the loops need below `inlineBelow` elements.
 */
import { availableParallelism } from 'node:os';
import { MessageChannel, type MessagePort, Worker } from 'node:worker_threads';
import type { BackwardParams, ChannelStats, FusedKernels, GradInputParams, GradSums, Kernels, Layout, NormalizeParams, TrainForwardParams } from '../kernels.js';
import {
  addRows, backwardShare, chunkCount, chunkDone, chunkElements, chunkStart, claimChunks, DONE, DONE_2, failPass, gradInputChunks, gradInputUnits,
  gradSumsChunks, gradSumsUnits, mapChunks, meanAndM2, mostElements, normalizeChunks, normalizeUnits, runShare, simdArrays, simdMemory, simdOut,
  simdPass, simdPut, staggered, statsChunks, statsUnits, sumChunks, sumRows, SYNC_SLOTS, takeChunks, trainForwardShare, waitFor, type Shared, type SimdLoops,
  type Task,
} from './loops.js';
import { instantiateSimd, simdModule } from './simd.js';

export interface NativeOptions {
  /** Threads to use, the calling one included (default: the cores Node may use). */
  readonly threads?: number;
  /**
   * Tensors with fewer elements run on the calling thread alone, and a tensor is shared by at
   * most one thread per this many elements (default 65536).
   */
  readonly inlineBelow?: number;
  /** Most bytes of released tensors kept for reuse (default 128 MiB). */
  readonly poolBytes?: number;
  /** false keeps to the JavaScript loops (the SIMD loops give the same bits, faster). */
  readonly simd?: boolean;
  /**
   * Bytes of a fused forward's x, or a fused backward's x and dy, that each thread keeps in its
   * SIMD memory between the reduction and the element-wise pass, instead of copying them in
   * again (default 4 MiB; the memory stays with the thread). Only passes whose whole input fits
   * in this much per thread keep any.
   */
  readonly keepBytes?: number;
  /**
   * Microseconds a worker that has finished its share looks for the next task before it sleeps,
   * while tasks have been coming at most this far apart (default 0: it sleeps at once). Passes
   * run back to back then skip the wake-up (60 to 90 µs on this VM): 6 to 11 % off each. The
   * looking is CPU taken from whatever shares the cores, and a CPU limit counts it: in the load
   * test on this VM, clients on the same two cores, 200 µs cost 4 to 10 % of the calls per second
   * (docs/benchmarks.md, issue 15's seventh part), so the server leaves it at 0; the kernels
   * benchmark shows both.
   */
  readonly spinMicros?: number;
}

/** Bytes before each shared tensor, for the message head of an answer sent from it. */
export const HEAD_ROOM = 256;

/** The fused passes (those with a second half) and the tensors each reads in both halves. */
const FUSED_INPUTS: Partial<Record<Task['op'], number>> = { trainForward: 1, backward: 2 };

/**
 * A worker's doorbell, a shared Int32Array: the rings, the stop word (1 ends the worker), and
 * its counts of tasks taken, wake-ups from sleep and looks for a task before sleeping. The
 * worker's source below has the slots written in.
 */
const BELL = { rings: 0, stop: 1, tasks: 2, wakes: 3, looks: 4, slots: 5 } as const;

/** The slot that counts a task's last chunks done. */
const lastDone = (op: Task['op']) => (FUSED_INPUTS[op] === undefined ? DONE : DONE_2);

/**
 * The worker threads' program: the loops and runShare, as source. A worker sleeps on its
 * doorbell (`Atomics.wait` on a shared counter) rather than in its event loop: the calling thread
 * posts a task on the worker's port and rings the bell, and the worker takes the task off the
 * port itself (`receiveMessageOnPort`). A futex wake reaches a sleeping thread sooner than a
 * message through libuv does (docs/benchmarks.md, issue 15's sixth part). With `spinMicros` set,
 * while tasks come at most that far apart, a worker that has finished one watches the bell that
 * long before it sleeps, as onnxruntime's pool does (off by default: seventh part). A worker
 * answers nothing on success (the calling thread counts chunks done); on failure it marks the
 * pass failed. A `{ simd }` message hands it the compiled SIMD loops, which it instantiates for
 * itself. The doorbell's slots are BELL's.
 */
const WORKER_SOURCE = `'use strict';
${[statsUnits, normalizeUnits, gradSumsUnits, gradInputUnits, staggered, simdMemory, simdPass, simdArrays, chunkElements, mostElements, simdPut,
  simdOut, chunkStart, waitFor, failPass, chunkDone, addRows, sumRows, takeChunks, claimChunks, sumChunks, statsChunks, gradSumsChunks, mapChunks,
  normalizeChunks, gradInputChunks, meanAndM2, trainForwardShare, backwardShare, runShare, instantiateSimd].map((f) => f.toString()).join('\n')}
const { receiveMessageOnPort, workerData } = require('node:worker_threads');
const { bell, port, spinMicros } = workerData;
let SIMD = null;
const handle = (task) => {
  if (task.simd) {
    SIMD = instantiateSimd(task.simd);
    return;
  }
  try {
    runShare(SIMD, task);
  } catch (err) {
    failPass(task.sync, task.chunks);
    console.error('normserve native worker: ' + String((err && err.stack) || err));
  }
  Atomics.add(bell, ${BELL.tasks}, 1);
};
const spinMs = spinMicros / 1000;
let spin = false;
for (let rung = 0; Atomics.load(bell, ${BELL.stop}) === 0; ) {
  for (let m = receiveMessageOnPort(port); m !== undefined; m = receiveMessageOnPort(port)) handle(m.message);
  const idle = spinMs > 0 ? performance.now() : 0;
  if (spin) {
    Atomics.add(bell, ${BELL.looks}, 1);
    while (Atomics.load(bell, ${BELL.rings}) === rung && performance.now() - idle < spinMs);
  }
  if (Atomics.wait(bell, ${BELL.rings}, rung) === 'ok') Atomics.add(bell, ${BELL.wakes}, 1);
  // Look next time only if this gap (looked or slept through) was short.
  spin = spinMs > 0 && performance.now() - idle < spinMs;
  rung = Atomics.load(bell, ${BELL.rings});
}`;

/** A worker thread, the port its tasks go on and its doorbell (BELL). */
interface NativeWorker {
  readonly thread: Worker;
  readonly port: MessagePort;
  readonly bell: Int32Array;
}

/** Rings a worker's doorbell: it finds out at once if it is looking, and wakes if it sleeps. */
function ring(worker: NativeWorker): void {
  Atomics.add(worker.bell, BELL.rings, 1);
  Atomics.notify(worker.bell, BELL.rings);
}

/** Hands `message` to a worker and rings. */
function post(worker: NativeWorker, message: unknown): void {
  worker.port.postMessage(message);
  ring(worker);
}

export class NativeKernels implements Kernels {
  readonly backend = 'native' as const;
  /**
   * Settles once the SIMD loops are in place on every thread (or known to be missing); until
   * then the JavaScript loops run, with the same results.
   */
  readonly ready: Promise<void>;
  /**
   * Forward and backward with one hand-off each: the threads meet at a barrier between the
   * reduction and the element-wise pass instead of coming back to this thread in between.
   */
  readonly fused: FusedKernels = {
    trainForward: (x, layout, params, out) => this.#trainForward(x, layout, params, out),
    backward: (x, dy, layout, params, out) => this.#backward(x, dy, layout, params, out),
  };
  readonly #threads: number;
  readonly #inlineBelow: number;
  readonly #keepBytes: number;
  readonly #spinMicros: number;
  readonly #workers: NativeWorker[] = [];
  #disposed = false;
  /** This thread's SIMD loops, their module for the workers, or why there are none. */
  #simd: SimdLoops | null = null;
  #module: WebAssembly.Module | null = null;
  #noSimd: string;
  #rows = new Float64Array(new SharedArrayBuffer(0));
  /**
   * Released shared tensors by length, oldest first. Fresh memory costs a page fault per 4 KiB on
   * first touch, which for a 25 MB tensor is more than the kernels themselves.
   */
  readonly #free = new Map<number, Float32Array[]>();
  readonly #pooled = new WeakSet<SharedArrayBuffer>();
  /** Every shared buffer `allocate` made, each with HEAD_ROOM bytes before its tensor. */
  readonly #roomy = new WeakSet<SharedArrayBuffer>();
  readonly #poolBytes: number;
  #freeBytes = 0;

  constructor(options: NativeOptions = {}) {
    this.#threads = Math.max(1, Math.floor(options.threads ?? availableParallelism()));
    this.#inlineBelow = Math.max(0, options.inlineBelow ?? 65_536);
    this.#keepBytes = Math.max(0, options.keepBytes ?? 4 * 1024 * 1024);
    this.#spinMicros = Math.max(0, options.spinMicros ?? 0);
    this.#poolBytes = Math.max(0, options.poolBytes ?? 128 * 1024 * 1024);
    for (let i = 1; i < this.#threads; i++) this.#workers.push(this.#spawn());
    if (options.simd === false) {
      this.#noSimd = 'the JavaScript loops by choice';
      this.ready = Promise.resolve();
    } else {
      this.#noSimd = 'the JavaScript loops until the SIMD loops are assembled';
      this.ready = simdModule().then(
        (module) => {
          if (module === null) this.#noSimd = 'the JavaScript loops (this engine has no WebAssembly SIMD)';
          else this.#useSimd(module);
        },
        (err: Error) => {
          this.#noSimd = `the JavaScript loops (the SIMD loops failed to assemble: ${err.message})`;
        },
      );
    }
  }

  /** A line for logs: the loops, threads and the inline threshold. */
  get description(): string {
    const loops = this.#simd ? 'WebAssembly SIMD (f64x2) loops' : this.#noSimd;
    return `${loops} on ${this.#threads} thread${this.#threads === 1 ? '' : 's'} (float64 sums; tensors under ${this.#inlineBelow} elements on one)`;
  }

  /**
   * Tasks the worker threads have taken off their ports so far. A diagnostic: a worker that never
   * woke would leave every chunk to the calling thread, and no result would show it.
   */
  get workerTasks(): number {
    return this.#count(BELL.tasks);
  }

  /**
   * Times the worker threads were woken from sleep so far (a diagnostic): a task that finds its
   * worker still looking for work (`spinMicros`) costs no wake-up.
   */
  get workerWakes(): number {
    return this.#count(BELL.wakes);
  }

  /** Times the worker threads looked for a next task before sleeping (a diagnostic, see `spinMicros`). */
  get workerLooks(): number {
    return this.#count(BELL.looks);
  }

  #count(slot: (typeof BELL)['tasks' | 'wakes' | 'looks']): number {
    let n = 0;
    for (const w of this.#workers) n += Atomics.load(w.bell, slot);
    return n;
  }

  /** Whether the SIMD loops run on this thread now. */
  get simd(): boolean {
    return this.#simd !== null;
  }

  #useSimd(module: WebAssembly.Module): void {
    if (this.#disposed) return;
    this.#module = module;
    for (const worker of this.#workers) post(worker, { simd: module });
    this.#simd = instantiateSimd(module);
  }

  /**
   * Shared memory for tensors the workers will read, plain memory for the ones they will not. A
   * shared tensor starts HEAD_ROOM bytes into its buffer: an answer's message head goes there
   * (wire/tensor-answer.ts), so that the answer is sent from the tensor's own memory.
   */
  allocate(length: number): Float32Array {
    if (!this.#parallel(length)) return new Float32Array(length);
    const reused = this.#free.get(length)?.pop();
    if (reused) {
      this.#freeBytes -= reused.byteLength;
      this.#pooled.delete(reused.buffer as SharedArrayBuffer);
      return reused;
    }
    const buffer = new SharedArrayBuffer(HEAD_ROOM + length * 4);
    this.#roomy.add(buffer);
    return new Float32Array(buffer, HEAD_ROOM, length);
  }

  /** HEAD_ROOM for a tensor `allocate` made (at the start of its own buffer), else 0. */
  headRoom(tensor: Float32Array): number {
    return this.#allocated(tensor) ? HEAD_ROOM : 0;
  }

  /** Whether `tensor` is the whole of a shared buffer `allocate` made. */
  #allocated(tensor: Float32Array): boolean {
    const buffer = tensor.buffer;
    return buffer instanceof SharedArrayBuffer && this.#roomy.has(buffer) && tensor.byteOffset === HEAD_ROOM && HEAD_ROOM + tensor.byteLength === buffer.byteLength;
  }

  /**
   * Takes back a tensor this backend allocated, once nothing reads it any more, for a later
   * `allocate` of the same length. Anything else is left to the garbage collector.
   */
  release(tensor: Float32Array): void {
    if (!this.#allocated(tensor) || this.#pooled.has(tensor.buffer as SharedArrayBuffer)) return;
    if (tensor.byteLength > this.#poolBytes || this.#disposed) return;
    let list = this.#free.get(tensor.length);
    if (!list) this.#free.set(tensor.length, (list = []));
    list.push(tensor);
    this.#pooled.add(tensor.buffer as SharedArrayBuffer);
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
    const k = shifts(x, layout);
    const xs = this.#shared(x);
    const sums = this.#run(layout, x.length, (shared) => ({ op: 'stats', x: xs, c, s, k, ...shared })).sums();
    const [mean, m2] = meanAndM2(sums, k, c, n * s) as [Float64Array, Float64Array];
    return { mean, m2 };
  }

  async normalize(x: Float32Array, layout: Layout, p: NormalizeParams, out?: Float32Array): Promise<Float32Array> {
    const y = this.#output(x.length, out);
    const xs = this.#shared(x);
    this.#run(layout, x.length, (shared) => ({ op: 'normalize', x: xs, y, c: layout.c, s: layout.s, p, ...shared }));
    return y;
  }

  async gradSums(x: Float32Array, dy: Float32Array, layout: Layout, mean: Float64Array): Promise<GradSums> {
    const c = layout.c;
    const xs = this.#shared(x);
    const dys = this.#shared(dy);
    return gradSumsOf(this.#run(layout, x.length, (shared) => ({ op: 'gradSums', x: xs, dy: dys, c, s: layout.s, mean, ...shared })).sums(), c);
  }

  async gradInput(x: Float32Array, dy: Float32Array, layout: Layout, p: GradInputParams, out?: Float32Array): Promise<Float32Array> {
    const gi = this.#output(x.length, out);
    const xs = this.#shared(x);
    const dys = this.#shared(dy);
    this.#run(layout, x.length, (shared) => ({ op: 'gradInput', x: xs, dy: dys, gi, c: layout.c, s: layout.s, p, ...shared }));
    return gi;
  }

  async #trainForward(x: Float32Array, layout: Layout, p: TrainForwardParams, out?: Float32Array): Promise<{ stats: ChannelStats; output: Float32Array }> {
    const { n, c, s } = layout;
    const k = shifts(x, layout);
    const y = this.#output(x.length, out);
    const xs = this.#shared(x);
    const [mean, m2] = this.#run(layout, x.length, (shared) => ({ op: 'trainForward', x: xs, y, c, s, k, p, count: n * s, ...shared })).own as Float64Array[];
    return { stats: { mean: mean!, m2: m2! }, output: y };
  }

  async #backward(x: Float32Array, dy: Float32Array, layout: Layout, p: BackwardParams, out?: Float32Array): Promise<{ sums: GradSums; gradInput: Float32Array }> {
    const c = layout.c;
    const gi = this.#output(x.length, out);
    const xs = this.#shared(x);
    const dys = this.#shared(dy);
    const total = this.#run(layout, x.length, (shared) => ({ op: 'backward', x: xs, dy: dys, gi, c, s: layout.s, p, ...shared })).own as Float64Array;
    return { sums: gradSumsOf(total, c), gradInput: gi };
  }

  async dispose(): Promise<void> {
    this.#disposed = true;
    this.#free.clear();
    this.#freeBytes = 0;
    await Promise.all(
      this.#workers.splice(0).map((w) => {
        Atomics.store(w.bell, BELL.stop, 1);
        ring(w);
        w.port.close();
        return w.thread.terminate();
      }),
    );
  }

  /** `out` where the threads can write it (OUTPUT_INTO in kernels.ts), else a new tensor. */
  #output(length: number, out: Float32Array | undefined): Float32Array {
    if (out && out.length === length && (out.buffer instanceof SharedArrayBuffer || !this.#parallel(length))) return out;
    return this.allocate(length);
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

  /**
   * One pass over every chunk: the task goes to as many workers as the tensor is worth, this
   * thread runs it too, then waits until every chunk is done. Returns this thread's own result,
   * and for the reductions the chunks' sums added in order.
   */
  #run(layout: Layout, length: number, task: (shared: Shared) => Task): { own: Float64Array[] | Float64Array | null; sums: () => Float64Array } {
    if (this.#disposed) throw new Error('the native backend was disposed');
    const units = layout.s === 1 ? layout.n : layout.n * layout.c;
    const chunks = chunkCount(units, length);
    // At least `inlineBelow` elements per thread: on many cores a mid-sized tensor split into
    // slivers costs more in hand-offs than it saves (16 threads made (8,256,14,14) slower than 2).
    const worth = Math.floor(length / Math.max(1, this.#inlineBelow));
    const parts = this.#parallel(length) ? Math.max(1, Math.min(this.#threads, chunks, worth)) : 1;
    const width = 2 * layout.c;
    // The counters, then a claim per chunk for a fused pass's second half.
    const syncBytes = (SYNC_SLOTS + chunks) * 4;
    const sync = new Int32Array(parts > 1 ? new SharedArrayBuffer(syncBytes) : new ArrayBuffer(syncBytes));
    const shared: Shared = { units, chunks, partials: this.#partials(chunks * width), sync, keep: 0 };
    const t = task(shared);
    // A fused pass (the one with a second half) keeps chunks only where all of its input fits
    // what its threads may keep: the memory a thread keeps stays with it, and a larger tensor is
    // past the caches anyway.
    const inputs = FUSED_INPUTS[t.op];
    if (inputs !== undefined && length * 4 * inputs <= this.#keepBytes * parts) t.keep = this.#keepBytes;
    for (let p = 1; p < parts; p++) post(this.#workers[p - 1]!, t);
    let own: Float64Array[] | Float64Array | null;
    try {
      own = runShare(this.#simd, t);
      waitFor(shared.sync, lastDone(t.op), chunks);
    } catch (err) {
      failPass(shared.sync, chunks);
      throw err;
    }
    return { own, sums: () => sumRows(this.#simd, shared.partials, width, chunks, 0) };
  }

  /**
   * Room for a pass's rows of sums, reused by every pass. A pass returns only once all its chunks
   * are done, and a worker still on an earlier pass finds its chunks taken, so no two passes ever
   * write rows at once. (Each pass's counters are its own.)
   */
  #partials(length: number): Float64Array {
    if (this.#rows.length < length) this.#rows = new Float64Array(new SharedArrayBuffer(Math.max(length, 2 * this.#rows.length) * 8));
    return this.#rows;
  }

  #spawn(): NativeWorker {
    const bell = new Int32Array(new SharedArrayBuffer(BELL.slots * 4));
    const { port1, port2 } = new MessageChannel();
    const thread = new Worker(WORKER_SOURCE, { eval: true, name: 'normserve-native', workerData: { bell, port: port2, spinMicros: this.#spinMicros }, transferList: [port2] });
    thread.unref();
    port1.unref();
    const worker = { thread, port: port1, bell };
    if (this.#module) post(worker, { simd: this.#module });
    thread.on('error', () => {
      // A pass waiting on a chunk the dead worker held fails by its timeout; a new worker takes
      // its place for later passes.
      port1.close();
      const at = this.#workers.indexOf(worker);
      if (at >= 0 && !this.#disposed) this.#workers[at] = this.#spawn();
    });
    return worker;
  }
}

/** Backward's sums as the passes leave them: Σ dy for each channel, then Σ dy·(x − mean). */
const gradSumsOf = (total: Float64Array, c: number): GradSums => ({ sumDy: total.slice(0, c), sumDyXmu: total.slice(c) });

/** Each channel's first value, the shift of its sums (a non-finite one would make every difference NaN). */
function shifts(x: Float32Array, { c, s }: Layout): Float64Array {
  const k = new Float64Array(c);
  for (let ch = 0; ch < c; ch++) {
    const v = x[ch * s]!;
    k[ch] = Number.isFinite(v) ? v : 0;
  }
  return k;
}
