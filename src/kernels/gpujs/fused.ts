/**
 * Fused passes on gpu.js pipelines (`gpu.createPipeline`): a training forward or a backward in
 * one call, the tensors uploaded once and no intermediate read back before the elementwise pass.
 * On webasm the plan runs over one wasm memory ('fused-threaded' on the worker pool, or
 * 'fused-sync'); on webgpu every step is recorded into one command encoder and submitted once
 * ('fused-encoder').
 *
 * Kernels inside a pipeline have a fixed output size, so a pipeline is compiled per shape class
 * (the layout n, c, s) and kept in a bounded least-recently-used cache; an evicted pipeline is
 * destroyed with its kernels.
 *
 * Accuracy. The per-channel values the elementwise pass needs (mean, scale, and backward's
 * coefficients) are computed inside the pipeline in float32, from the same compensated block sums
 * the separate kernels use. The pipeline also returns those block sums, and the host combines them
 * in float64 exactly as `stats()` and `gradSums()` do, so the statistics and sums that come back
 * are the separate kernels' own. The host then checks each channel's in-pipeline values against
 * the ones it derives in float64 from those statistics; a channel whose values are off by more
 * than a few float32 ulps (a constant channel with eps = 0, non-finite parameters) is recomputed
 * on the host with the float64 values, as the separate elementwise kernel would have computed it.
 */
import gpujs from 'gpu.js';
import type { IKernelRunShortcut, IPipelineRunShortcut } from 'gpu.js';
import type { BackwardParams, ChannelStats, FusedKernels, GradSums, Kernels, Layout, TrainForwardParams } from '../kernels.js';
import {
  BLOCK,
  centerSource,
  forwardCoeffsSource,
  FUSED_GRAD_INPUT,
  FUSED_NORMALIZE,
  GRAD_SUMS,
  gradCoeffsSource,
  PARTIAL_SUMS,
  PLANE_KERNEL_MIN_S,
} from './sources.js';

type Gpu = InstanceType<typeof gpujs.GPU>;
type Output = Float32Array | Float32Array[];

export type FusedMode = 'webasm' | 'webgpu';
export type FusedPass = 'forward' | 'backward';

/** The executors a pipeline may run on in each mode; anything else is a fallback. */
export const FUSED_EXECUTORS: Readonly<Record<FusedMode, readonly string[]>> = {
  webasm: ['fused-threaded', 'fused-sync'],
  webgpu: ['fused-encoder'],
};

/** Pipelines kept per pass (forward, backward): shape classes beyond it evict the oldest. */
export const DEFAULT_PIPELINE_CACHE = 8;

/**
 * Tensors smaller than this (n * c * s) run on the separate kernels instead. On webasm a pipeline
 * only pays for large tensors (it saves copies and runs its steps on the worker pool); below about
 * a million values it measured no faster than the separate kernels, and it would hold a
 * compiled plan and a wasm memory per shape. On webgpu it was faster at every size measured.
 */
export const FUSED_MIN_ELEMENTS: Readonly<Record<FusedMode, number>> = { webasm: 1 << 20, webgpu: 0 };

/**
 * A channel's in-pipeline scale (or backward coefficient) may differ from the float64 one rounded
 * to float32 by this much, relative, before the channel is recomputed on the host (about 4 ulps;
 * the in-pipeline values are typically within one).
 */
const COEFF_RTOL = 2 ** -21;
/** The in-pipeline mean may be off by this much, times the channel's |scale| (in output units). */
const CENTER_ATOL = 2 ** -26;

const INT = 'Integer';
const ARR = 'Array';
const FLT = 'Float';
const SUMS_TYPES = { x: ARR, c: INT, s: INT, count: INT, parts: INT, block: INT, hi: ARR, lo: ARR, order: INT, one: FLT };
const CENTER_TYPES = { p: ARR, c: INT, count: INT, count1: FLT, count2: FLT, count3: FLT, one: FLT };
const COEFFS_TYPES = { p: ARR, hi: ARR, t: ARR, weight: ARR, c: INT, count: INT, eps: FLT, one: FLT };
const NORMALIZE_TYPES = { x: ARR, c: INT, s: INT, k: ARR, bias: ARR };
const GRAD_SUMS_TYPES = { x: ARR, dy: ARR, c: INT, s: INT, count: INT, parts: INT, block: INT, hi: ARR, lo: ARR, one: FLT };
const GRAD_COEFFS_TYPES = { p: ARR, a: ARR, invstd: ARR, c: INT, count: FLT, batch: INT, one: FLT };
const GRAD_INPUT_TYPES = { x: ARR, dy: ARR, c: INT, s: INT, hi: ARR, lo: ARR, a: ARR, kk: ARR };

/** How the block-sum kernels cut a channel's count = n * s values into blocks. */
export function blocking({ n, c, s }: Layout): { count: number; block: number; parts: number; cells: number } {
  const count = n * s;
  const block = Math.min(BLOCK, count);
  const parts = Math.ceil(count / block);
  return { count, block, parts, cells: c * parts };
}

/** What a test or a log line can see of one cached pipeline. */
export interface PipelineInfo {
  readonly pass: FusedPass;
  readonly layout: Layout;
  /** The backend that executed it (gpu.js's `pipeline.backend`); null before its first call. */
  readonly backend: string | null;
  readonly executorKind: string;
  readonly fallbackReason: string | null;
  readonly calls: number;
}

export interface PipelineCounters {
  /** Pipelines compiled since the backend started (each with its kernels). */
  readonly compiled: number;
  /** Pipelines destroyed to make room. */
  readonly evicted: number;
  /** Channels whose elementwise result was recomputed on the host (see the module comment). */
  readonly hostChannels: number;
  readonly capacity: number;
  readonly cached: readonly PipelineInfo[];
  /** Pipelines and kernels alive on the gpu.js instance (all of them, the separate kernels too). */
  readonly live: { readonly pipelines: number; readonly kernels: number };
}

interface Compiled {
  readonly pass: FusedPass;
  readonly layout: Layout;
  readonly run: IPipelineRunShortcut;
  readonly kernels: IKernelRunShortcut[];
  calls: number;
}

export interface FusedOptions {
  /** Pipelines kept per pass. */
  readonly cacheSize?: number;
  /** webasm: false keeps pipelines off the worker pool ('fused-sync'). */
  readonly threads?: boolean;
  /** webasm: false lets gpu.js copy tensor arguments before each call (see #unsampled). */
  readonly shareInputs?: boolean;
  /** Smaller tensors run on the separate kernels (default FUSED_MIN_ELEMENTS). */
  readonly minElements?: number;
}

/** The separate kernels, for tensors too small for a pipeline to pay. */
type Separate = Pick<Kernels, 'stats' | 'normalize' | 'gradSums' | 'gradInput'>;

export class GpuJsFused implements FusedKernels {
  readonly #gpu: Gpu;
  readonly #mode: FusedMode;
  readonly #exclusive: <T>(work: () => Promise<T>) => Promise<T>;
  readonly #threads: boolean;
  readonly #shareInputs: boolean;
  readonly #minElements: number;
  readonly #separate: Separate;
  readonly #capacity: number;
  /** Per pass, least recently used first (Map iteration order). */
  readonly #cache: Record<FusedPass, Map<string, Compiled>> = { forward: new Map(), backward: new Map() };
  #compiled = 0;
  #evicted = 0;
  #hostChannels = 0;

  constructor(gpu: Gpu, mode: FusedMode, exclusive: <T>(work: () => Promise<T>) => Promise<T>, separate: Separate, options: FusedOptions = {}) {
    this.#gpu = gpu;
    this.#mode = mode;
    this.#exclusive = exclusive;
    this.#separate = separate;
    this.#minElements = options.minElements ?? FUSED_MIN_ELEMENTS[mode];
    this.#threads = options.threads ?? true;
    this.#shareInputs = options.shareInputs ?? true;
    this.#capacity = Math.max(1, options.cacheSize ?? DEFAULT_PIPELINE_CACHE);
  }

  counters(): PipelineCounters {
    const info = (p: Compiled): PipelineInfo => ({
      pass: p.pass,
      layout: p.layout,
      backend: p.run.backend,
      executorKind: p.run.executorKind,
      fallbackReason: p.run.fallbackReason,
      calls: p.calls,
    });
    return {
      compiled: this.#compiled,
      evicted: this.#evicted,
      hostChannels: this.#hostChannels,
      capacity: this.#capacity,
      cached: [...this.#cache.forward.values(), ...this.#cache.backward.values()].map(info),
      live: { pipelines: gpuList(this.#gpu, 'pipelines').length, kernels: gpuList(this.#gpu, 'kernels').length },
    };
  }

  /** Whether a pipeline runs this layout (otherwise the separate kernels do). */
  fusesLayout({ n, c, s }: Layout): boolean {
    const size = n * c * s;
    return size > 0 && size >= this.#minElements;
  }

  trainForward(x: Float32Array, layout: Layout, params: TrainForwardParams): Promise<{ stats: ChannelStats; output: Float32Array }> {
    if (!this.fusesLayout(layout)) return this.#separateForward(x, layout, params);
    return this.#exclusive(async () => {
      const { n, c, s } = layout;
      const { count, parts, cells } = blocking(layout);
      const hi = new Float32Array(c);
      for (let ch = 0; ch < c; ch++) hi[ch] = coarse(x[ch * s]!);
      const weight = Float32Array.from(params.weight);
      const bias = Float32Array.from(params.bias);
      const [p1, t, p2, k, out] = (await this.#call('forward', layout, [this.#unsampled(x), hi, weight, bias, params.eps, 1])) as Output[];
      const first = flatten(p1!, 2 * cells);
      const second = flatten(p2!, cells);
      const coeffs = flatten(k!, 3 * c);
      const center = flatten(t!, 2 * c);
      const y = flatten(out!, n * c * s);

      // The statistics as stats() computes them: the mean from the compensated block sums of
      // x - hi, in float64; m2 from the sums of squares of v = (x - hi) - t, less count times the
      // square of the centre's distance from that mean (Σ(v - v̄)² = Σv² - count·v̄²).
      const mean = new Float64Array(c);
      const m2 = new Float64Array(c);
      for (let ch = 0; ch < c; ch++) {
        let total = 0;
        let squares = 0;
        for (let p = ch * parts; p < (ch + 1) * parts; p++) {
          total += first[p]! - first[cells + p]!;
          squares += second[p]!;
        }
        const offset = total / count;
        const drift = offset - center[ch]!;
        mean[ch] = hi[ch]! + offset;
        m2[ch] = Math.max(0, squares - count * drift * drift);
      }

      // Each channel's in-pipeline mean and scale against the float64 ones.
      for (let ch = 0; ch < c; ch++) {
        const variance = m2[ch]! / count;
        const invstd = variance === 0 && params.eps === 0 ? 0 : 1 / Math.sqrt(variance + params.eps);
        const scale = invstd * params.weight[ch]!;
        const got = coeffs[2 * c + ch]!;
        const centerError = Math.abs(coeffs[ch]! + coeffs[c + ch]! - mean[ch]!) * Math.abs(scale);
        if (agrees(got, scale) && (!Number.isFinite(scale) || centerError <= CENTER_ATOL * (Math.abs(params.weight[ch]!) + Math.abs(params.bias[ch]!)))) continue;
        this.#hostChannels++;
        normalizeChannel(x, y, layout, ch, mean[ch]!, scale, params.bias[ch]!);
      }
      return { stats: { mean, m2 }, output: y };
    });
  }

  backward(x: Float32Array, dy: Float32Array, layout: Layout, params: BackwardParams): Promise<{ sums: GradSums; gradInput: Float32Array }> {
    if (!this.fusesLayout(layout)) return this.#separateBackward(x, dy, layout, params);
    return this.#exclusive(async () => {
      const { n, c, s } = layout;
      const { parts, cells } = blocking(layout);
      const [hi, lo] = split(params.mean);
      const a64 = Float64Array.from(params.invstd, (v, ch) => params.weight[ch]! * v);
      const a = Float32Array.from(a64);
      const invstd = Float32Array.from(params.invstd);
      const [g, kk, out] = (await this.#call('backward', layout, [this.#unsampled(x), this.#unsampled(dy), hi, lo, a, invstd, params.count, params.batchStats ? 1 : 0, 1])) as Output[];
      const sums = flatten(g!, 2 * cells);
      const coeffs = flatten(kk!, 2 * c);
      const gradInput = flatten(out!, n * c * s);

      const { sumDy, sumDyXmu } = combineGradSums(sums, c, parts);
      // The coefficients as backward() in batch-norm.ts derives them, against the in-pipeline ones.
      for (let ch = 0; ch < c; ch++) {
        const iv = params.invstd[ch]!;
        const b = params.batchStats ? (-a64[ch]! * iv * iv * sumDyXmu[ch]!) / params.count : 0;
        const k = params.batchStats ? (-a64[ch]! * sumDy[ch]!) / params.count : 0;
        if (agrees(coeffs[ch]!, b) && agrees(coeffs[c + ch]!, k)) continue;
        this.#hostChannels++;
        gradInputChannel(x, dy, gradInput, layout, ch, hi[ch]!, lo[ch]!, a[ch]!, b, k);
      }
      return { sums: { sumDy, sumDyXmu }, gradInput };
    });
  }

  /** trainForward on the separate kernels, as batch-norm.ts runs it without `fused`. */
  async #separateForward(x: Float32Array, layout: Layout, params: TrainForwardParams): Promise<{ stats: ChannelStats; output: Float32Array }> {
    const stats = await this.#separate.stats(x, layout);
    const count = layout.n * layout.s;
    const scale = stats.m2.map((m2, ch) => {
      const variance = m2 / count;
      return (variance === 0 && params.eps === 0 ? 0 : 1 / Math.sqrt(variance + params.eps)) * params.weight[ch]!;
    });
    const output = await this.#separate.normalize(x, layout, { mean: stats.mean, scale, shift: params.bias });
    return { stats, output };
  }

  /** backward on the separate kernels, as batch-norm.ts runs it without `fused`. */
  async #separateBackward(x: Float32Array, dy: Float32Array, layout: Layout, params: BackwardParams): Promise<{ sums: GradSums; gradInput: Float32Array }> {
    const sums = await this.#separate.gradSums(x, dy, layout, params.mean);
    const a = params.invstd.map((v, ch) => params.weight[ch]! * v);
    const b = new Float64Array(layout.c);
    const k = new Float64Array(layout.c);
    if (params.batchStats) {
      for (let ch = 0; ch < layout.c; ch++) {
        const iv = params.invstd[ch]!;
        b[ch] = (-a[ch]! * iv * iv * sums.sumDyXmu[ch]!) / params.count;
        k[ch] = (-a[ch]! * sums.sumDy[ch]!) / params.count;
      }
    }
    const gradInput = await this.#separate.gradInput(x, dy, layout, { mean: params.mean, a, b, k });
    return { sums, gradInput };
  }

  /** Destroys every cached pipeline (the GPU's own destroy would too; this is for eviction). */
  async dispose(): Promise<void> {
    for (const pass of ['forward', 'backward'] as const) {
      for (const p of this.#cache[pass].values()) await destroy(p, this.#gpu);
      this.#cache[pass].clear();
    }
  }

  /**
   * A tensor argument as gpu.js should take it. A pipeline call copies every typed-array argument
   * (`slice`) before it runs, so that the caller may change it meanwhile, and the webasm executor
   * then copies it again into its memory. The Kernels contract already has callers leave their
   * tensors alone until the call resolves (the separate kernels read them when their turn comes),
   * so on webasm the tensor goes in as a view that gpu.js samples without the first copy: its
   * snapshot passes over values with a `delete` method (device handles, which webgpu's executor
   * rejects; the webasm executor reads them as the arrays they are).
   */
  #unsampled(x: Float32Array): Float32Array {
    if (this.#mode !== 'webasm' || !this.#shareInputs) return x;
    const view = new Float32Array(x.buffer, x.byteOffset, x.length);
    Object.defineProperty(view, 'delete', { value: () => undefined, enumerable: false });
    return view;
  }

  async #call(pass: FusedPass, layout: Layout, args: unknown[]): Promise<unknown> {
    const cache = this.#cache[pass];
    const key = `${layout.n},${layout.c},${layout.s}`;
    let entry = cache.get(key);
    if (entry) {
      cache.delete(key);
    } else {
      while (cache.size >= this.#capacity) {
        const [oldest, victim] = cache.entries().next().value as [string, Compiled];
        cache.delete(oldest);
        this.#evicted++;
        await destroy(victim, this.#gpu);
      }
      entry = pass === 'forward' ? this.#compileForward(layout) : this.#compileBackward(layout);
      this.#compiled++;
    }
    cache.set(key, entry);
    const drop = async () => {
      if (cache.get(key) === entry) cache.delete(key);
      await destroy(entry, this.#gpu);
    };
    let result: unknown;
    try {
      result = await (entry.run as unknown as (...a: unknown[]) => Promise<unknown>)(...args);
    } catch (err) {
      await drop().catch(() => undefined);
      throw err;
    }
    entry.calls++;
    const kind = entry.run.executorKind;
    // gpu.js runs a plan its fused executor declines step by step instead, without failing: that
    // would be the separate kernels' cost and more, so it is an error here.
    if (!FUSED_EXECUTORS[this.#mode].includes(kind) || entry.run.backend !== this.#mode) {
      await drop();
      throw new Error(
        `gpu.js ran the ${pass} pipeline for (${key}) on ${entry.run.backend ?? 'no backend'} with the ${kind} executor instead of a fused ${this.#mode} one` +
          (entry.run.fallbackReason ? `: ${entry.run.fallbackReason}` : ''),
      );
    }
    return result;
  }

  #kernel(kernels: IKernelRunShortcut[], source: string, argumentTypes: object, output: number[], loop = BLOCK): IKernelRunShortcut {
    const kernel = this.#gpu.createKernel(source, {
      output,
      argumentTypes,
      precision: 'single',
      tactic: 'precision',
      loopMaxIterations: Math.max(BLOCK, loop) + 1,
    } as never) as unknown as IKernelRunShortcut;
    kernels.push(kernel);
    return kernel;
  }

  #pipeline(fn: (...args: never[]) => unknown): IPipelineRunShortcut {
    const settings = this.#mode === 'webasm' && !this.#threads ? { threads: false } : {};
    return this.#gpu.createPipeline(fn as never, settings);
  }

  /**
   * Whether the elementwise pass runs over (n * c, s) planes rather than a flat output: on webasm
   * for long planes, as the separate kernels do; never on webgpu, where lavapipe runs 2-D
   * dispatches markedly slower than 1-D ones (a flat normalize of (32,64,56,56) took 87 ms against
   * 96 ms in planes).
   */
  #planes(s: number): boolean {
    return this.#mode === 'webasm' && s >= PLANE_KERNEL_MIN_S;
  }

  #compileForward(layout: Layout): Compiled {
    const { n, c, s } = layout;
    const { count, block, parts, cells } = blocking(layout);
    const kernels: IKernelRunShortcut[] = [];
    const planes = this.#planes(s);
    const sums = this.#kernel(kernels, PARTIAL_SUMS, SUMS_TYPES, [2 * cells]);
    const center = this.#kernel(kernels, centerSource(parts), CENTER_TYPES, [2 * c], parts);
    const [count1, count2, count3] = pieces(count);
    const squares = this.#kernel(kernels, PARTIAL_SUMS, SUMS_TYPES, [cells]);
    const coeffs = this.#kernel(kernels, forwardCoeffsSource(parts), COEFFS_TYPES, [3 * c], parts);
    const normalize = this.#kernel(kernels, planes ? FUSED_NORMALIZE.planes : FUSED_NORMALIZE.flat, NORMALIZE_TYPES, planes ? [s, n * c] : [n * c * s]);
    const zeros = new Float32Array(c);
    type K = (...a: unknown[]) => unknown;
    const run = this.#pipeline(function (x: unknown, hi: unknown, weight: unknown, bias: unknown, eps: unknown, one: unknown) {
      const p1 = (sums as unknown as K)(x, c, s, count, parts, block, hi, zeros, 1, one);
      const t = (center as unknown as K)(p1, c, count, count1, count2, count3, one);
      const p2 = (squares as unknown as K)(x, c, s, count, parts, block, hi, t, 2, one);
      const k = (coeffs as unknown as K)(p2, hi, t, weight, c, count, eps, one);
      const y = (normalize as unknown as K)(x, c, s, k, bias);
      return [p1, t, p2, k, y];
    });
    return { pass: 'forward', layout: { n, c, s }, run, kernels, calls: 0 };
  }

  #compileBackward(layout: Layout): Compiled {
    const { n, c, s } = layout;
    const { count, block, parts, cells } = blocking(layout);
    const kernels: IKernelRunShortcut[] = [];
    const planes = this.#planes(s);
    const sums = this.#kernel(kernels, GRAD_SUMS, GRAD_SUMS_TYPES, [2 * cells]);
    const coeffs = this.#kernel(kernels, gradCoeffsSource(parts), GRAD_COEFFS_TYPES, [2 * c], parts);
    const gradInput = this.#kernel(kernels, planes ? FUSED_GRAD_INPUT.planes : FUSED_GRAD_INPUT.flat, GRAD_INPUT_TYPES, planes ? [s, n * c] : [n * c * s]);
    type K = (...a: unknown[]) => unknown;
    const run = this.#pipeline(function (x: unknown, dy: unknown, hi: unknown, lo: unknown, a: unknown, invstd: unknown, total: unknown, batch: unknown, one: unknown) {
      const g = (sums as unknown as K)(x, dy, c, s, count, parts, block, hi, lo, one);
      const kk = (coeffs as unknown as K)(g, a, invstd, c, total, batch, one);
      const gi = (gradInput as unknown as K)(x, dy, c, s, hi, lo, a, kk);
      return [g, kk, gi];
    });
    return { pass: 'backward', layout: { n, c, s }, run, kernels, calls: 0 };
  }
}

/** gpu.js's registry of a GPU's pipelines or kernels. */
function gpuList(gpu: Gpu, which: 'pipelines' | 'kernels'): unknown[] {
  return (gpu as unknown as Record<string, unknown[] | undefined>)[which] ?? [];
}

/** Destroys a pipeline (its plan and its clones of the kernels) and the kernels it was traced with. */
async function destroy(p: Compiled, gpu: Gpu): Promise<void> {
  await p.run.destroy();
  const registered = gpuList(gpu, 'kernels');
  for (const kernel of p.kernels) {
    // gpu.js kernels unregister themselves on destroy, and destroying one twice is not safe
    if (registered.includes((kernel as unknown as { kernel?: unknown }).kernel)) kernel.destroy();
  }
}

/** A positive integer below 2^30 as a sum of three numbers of at most 10 significant bits. */
function pieces(count: number): [number, number, number] {
  const out: number[] = [];
  let rest = count;
  for (let i = 0; i < 3; i++) {
    const step = rest > 0 ? 2 ** Math.max(0, Math.floor(Math.log2(rest)) - 9) : 1;
    const piece = Math.floor(rest / step) * step;
    out.push(piece);
    rest -= piece;
  }
  if (rest !== 0) throw new RangeError(`${count} values per channel are more than the fused kernels take`);
  return out as [number, number, number];
}

/**
 * Whether an in-pipeline float32 value agrees with the float64 one: equal after rounding, or both
 * finite and within COEFF_RTOL. A non-finite value must match exactly.
 */
function agrees(got: number, want: number): boolean {
  const rounded = Math.fround(want);
  if (Object.is(got, rounded)) return true;
  if (!Number.isFinite(got) || !Number.isFinite(rounded)) return false;
  return Math.abs(got - want) <= COEFF_RTOL * Math.abs(want) + 2 ** -126;
}

/** One channel of the separate normalize kernel, in float32 as it computes it. */
function normalizeChannel(x: Float32Array, y: Float32Array, { n, c, s }: Layout, ch: number, mean: number, scale: number, shift: number): void {
  const f = Math.fround;
  const hi = f(mean);
  const lo = f(mean - hi);
  const sc = f(scale);
  const sh = f(shift);
  for (let b = 0; b < n; b++) {
    const base = (b * c + ch) * s;
    for (let i = base; i < base + s; i++) y[i] = f(f(f(f(x[i]! - hi) - lo) * sc) + sh);
  }
}

/** One channel of the separate grad-input kernel, in float32 as it computes it. */
function gradInputChannel(
  x: Float32Array,
  dy: Float32Array,
  out: Float32Array,
  { n, c, s }: Layout,
  ch: number,
  hi: number,
  lo: number,
  a: number,
  b: number,
  k: number,
): void {
  const f = Math.fround;
  const bb = f(b);
  const kk = f(k);
  for (let n0 = 0; n0 < n; n0++) {
    const base = (n0 * c + ch) * s;
    for (let i = base; i < base + s; i++) out[i] = f(f(f(dy[i]! * a) + f(f(f(x[i]! - hi) - lo) * bb)) + kk);
  }
}

/** A float64 vector as float32 head and tail: head + tail is v to about 48 bits. */
export function split(v: Float64Array): [Float32Array, Float32Array] {
  const hi = Float32Array.from(v);
  const lo = new Float32Array(v.length);
  for (let i = 0; i < v.length; i++) lo[i] = v[i]! - hi[i]!;
  return [hi, lo];
}

/**
 * v rounded to 8 significant bits. Subtracting a float32 constant from float32 values drops the
 * constant's low bits the same way for every value of one binade, a bias that does not average
 * out; with a coarse constant, x - shift is exact for every x within 2^16 times of it.
 */
export function coarse(v: number): number {
  if (v === 0 || !Number.isFinite(v)) return 0;
  const step = 2 ** (Math.floor(Math.log2(Math.abs(v))) - 7);
  return Math.round(v / step) * step;
}

/**
 * A kernel's result as one Float32Array. 2-D results come as rows; on webasm they are views of
 * one buffer and are returned as one view without copying.
 */
export function flatten(out: Output, length: number): Float32Array {
  if (out instanceof Float32Array) return out.length === length ? out : out.subarray(0, length);
  const first = out[0];
  if (!first) return new Float32Array(0);
  const rowBytes = first.byteLength;
  const contiguous = out.every((row, k) => row.buffer === first.buffer && row.byteOffset === first.byteOffset + k * rowBytes);
  if (contiguous) return new Float32Array(first.buffer, first.byteOffset, length);
  const flat = new Float32Array(length);
  let offset = 0;
  for (const row of out) {
    flat.set(row, offset);
    offset += row.length;
  }
  return flat;
}

/** Backward's per-block sums ([Σdy blocks, Σdy·(x−μ) blocks], `parts` per channel) added up in float64. */
export function combineGradSums(blocks: Float32Array, c: number, parts: number): GradSums {
  const cells = c * parts;
  const sumDy = new Float64Array(c);
  const sumDyXmu = new Float64Array(c);
  for (let ch = 0; ch < c; ch++) {
    let s1 = 0;
    let s2 = 0;
    for (let p = ch * parts; p < (ch + 1) * parts; p++) {
      s1 += blocks[p]!;
      s2 += blocks[cells + p]!;
    }
    sumDy[ch] = s1;
    sumDyXmu[ch] = s2;
  }
  return { sumDy, sumDyXmu };
}
