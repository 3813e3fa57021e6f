/**
 * The Kernels interface on gpu.js, for each of its Node backends: webgpu, headlessgl, webasm and
 * cpu. The kernels are created once per backend with dynamic output and arguments, so one
 * compiled kernel serves every shape; a call only resizes the output.
 */
import gpujs from 'gpu.js';
import type { IKernelRunShortcut } from 'gpu.js';
import type { ChannelStats, GradInputParams, GradSums, Kernels, Layout, NormalizeParams } from '../kernels.js';
import { acquireWebGPU, releaseWebGPU } from './environment.js';
import { coarse, combineGradSums, flatten, GpuJsFused, split, type FusedOptions, type PipelineCounters } from './fused.js';
import { BLOCK, GRAD_INPUT, GRAD_SUMS, NORMALIZE, PARTIAL_SUMS, PLANE_KERNEL_MIN_S } from './sources.js';

const { GPU } = gpujs;

export { coarse, flatten } from './fused.js';

export type GpuJsMode = 'webgpu' | 'headlessgl' | 'webasm' | 'cpu';

const SETTINGS = {
  dynamicOutput: true,
  dynamicArguments: true,
  precision: 'single',
  tactic: 'precision',
  loopMaxIterations: BLOCK + 1,
} as const;

/** The arguments every block-sum kernel takes (see sources.ts). */
const BLOCK_ARGS = { c: 'Integer', s: 'Integer', count: 'Integer', parts: 'Integer', block: 'Integer', hi: 'Array', lo: 'Array', one: 'Float' } as const;
const STATS_ARGS = { x: 'Array', ...BLOCK_ARGS, order: 'Integer' } as const;
const GRAD_SUMS_ARGS = { x: 'Array', dy: 'Array', ...BLOCK_ARGS } as const;
const NORMALIZE_ARGS = { x: 'Array', c: 'Integer', s: 'Integer', hi: 'Array', lo: 'Array', scale: 'Array', shift: 'Array' } as const;
const GRAD_INPUT_ARGS = { x: 'Array', dy: 'Array', c: 'Integer', s: 'Integer', hi: 'Array', lo: 'Array', a: 'Array', bb: 'Array', k: 'Array' } as const;

/** An elementwise kernel in its two forms (see sources.ts). */
interface Elementwise {
  readonly flat: IKernelRunShortcut;
  readonly planes: IKernelRunShortcut;
}

type Output = Float32Array | Float32Array[];

const MODE_BY_CLASS: Readonly<Record<string, GpuJsMode>> = {
  WebGPUKernel: 'webgpu',
  HeadlessGLKernel: 'headlessgl',
  WebAssemblyKernel: 'webasm',
  CPUKernel: 'cpu',
};

/**
 * Which backend a kernel actually ran on: gpu.js may fall back to its cpu kernels without failing.
 * (The class, not `constructor.mode`: headlessgl reports its mode as 'gpu'.)
 */
export function kernelMode(kernel: IKernelRunShortcut): string | undefined {
  const inner = (kernel as unknown as { kernel?: { constructor?: { name?: string } } }).kernel;
  const name = inner?.constructor?.name;
  return name === undefined ? undefined : (MODE_BY_CLASS[name] ?? name);
}

export class GpuJsKernels implements Kernels {
  readonly backend: GpuJsMode;
  readonly description: string;
  readonly #gpu: InstanceType<typeof GPU>;
  readonly #sums: IKernelRunShortcut;
  readonly #gradSums: IKernelRunShortcut;
  readonly #normalize: Elementwise;
  readonly #gradInput: Elementwise;
  /**
   * Whole training forwards and backwards as gpu.js pipelines, on webasm and webgpu (see
   * fused.ts). headlessgl runs pipelines step by step through its generic executor, which gains
   * nothing over the separate kernels, and cpu has no fused executor: they have none.
   */
  readonly fused?: GpuJsFused;
  /** Resizing and running a kernel must not interleave with another call's (webgpu awaits). */
  #tail: Promise<unknown> = Promise.resolve();

  constructor(mode: GpuJsMode, description: string, options: { fused?: boolean } & FusedOptions = {}) {
    this.backend = mode;
    this.description = description;
    this.#gpu = new GPU({ mode });
    if (mode === 'webgpu') acquireWebGPU();
    if ((mode === 'webasm' || mode === 'webgpu') && options.fused !== false) {
      this.fused = new GpuJsFused(this.#gpu, mode, (work) => this.#exclusive(work), this, options);
    }
    const make = (source: string, argumentTypes: object) =>
      this.#gpu.createKernel(source, { ...SETTINGS, argumentTypes } as never) as IKernelRunShortcut;
    this.#sums = make(PARTIAL_SUMS, STATS_ARGS);
    this.#gradSums = make(GRAD_SUMS, GRAD_SUMS_ARGS);
    this.#normalize = { flat: make(NORMALIZE.flat, NORMALIZE_ARGS), planes: make(NORMALIZE.planes, NORMALIZE_ARGS) };
    this.#gradInput = { flat: make(GRAD_INPUT.flat, GRAD_INPUT_ARGS), planes: make(GRAD_INPUT.planes, GRAD_INPUT_ARGS) };
  }

  /** The gpu.js modes the kernels ran in (after at least one call each). */
  modes(): (string | undefined)[] {
    const all = [this.#sums, this.#gradSums, this.#normalize.flat, this.#normalize.planes, this.#gradInput.flat, this.#gradInput.planes];
    return all.map(kernelMode);
  }

  async stats(x: Float32Array, { n, c, s }: Layout): Promise<ChannelStats> {
    const count = n * s;
    const block = Math.min(BLOCK, count);
    const parts = Math.ceil(count / block);
    const cells = c * parts;
    const total = (out: Float32Array, ch: number, compensated: boolean) => {
      let sum = 0;
      for (let p = ch * parts; p < (ch + 1) * parts; p++) sum += compensated ? out[p]! - out[cells + p]! : out[p]!;
      return sum;
    };

    // First pass: block sums of x shifted by the channel's first element (so that a large common
    // offset cancels exactly), with their compensations, give the mean.
    const hi = new Float32Array(c);
    const lo = new Float32Array(c);
    for (let ch = 0; ch < c; ch++) hi[ch] = coarse(x[ch * s]!);
    const sums = flatten(await this.#run(this.#sums, [2 * cells], [x, c, s, count, parts, block, hi, lo, 1, 1]), 2 * cells);
    const mean = Float64Array.from(hi, (shift, ch) => shift + total(sums, ch, true) / count);
    // Second pass: squared deviations from it.
    const [meanHi, meanLo] = split(mean);
    const squares = flatten(await this.#run(this.#sums, [cells], [x, c, s, count, parts, block, meanHi, meanLo, 2, 1]), cells);
    const m2 = new Float64Array(c);
    for (let ch = 0; ch < c; ch++) m2[ch] = total(squares, ch, false);
    if (this.backend === 'cpu') {
      // gpu.js's cpu kernels add in float64 and round only their results to float32, which the
      // compensation cannot see. Their deviations from the mean are exact, though: one more pass
      // sums them and corrects mean and m2 (the corrected two-pass algorithm).
      const deviations = flatten(await this.#run(this.#sums, [cells], [x, c, s, count, parts, block, meanHi, meanLo, 1, 1]), cells);
      for (let ch = 0; ch < c; ch++) {
        const d = total(deviations, ch, false);
        mean[ch] = mean[ch]! + d / count;
        m2[ch] = Math.max(0, m2[ch]! - (d * d) / count);
      }
    }
    return { mean, m2 };
  }

  async normalize(x: Float32Array, layout: Layout, p: NormalizeParams): Promise<Float32Array> {
    const [hi, lo] = split(p.mean);
    return this.#elementwise(this.#normalize, x.length, layout, [x, layout.c, layout.s, hi, lo, Float32Array.from(p.scale), Float32Array.from(p.shift)]);
  }

  async gradSums(x: Float32Array, dy: Float32Array, { n, c, s }: Layout, mean: Float64Array): Promise<GradSums> {
    const count = n * s;
    const block = Math.min(BLOCK, count);
    const parts = Math.ceil(count / block);
    const cells = c * parts;
    const [hi, lo] = split(mean);
    const out = flatten(await this.#run(this.#gradSums, [2 * cells], [x, dy, c, s, count, parts, block, hi, lo, 1]), 2 * cells);
    return combineGradSums(out, c, parts);
  }

  async gradInput(x: Float32Array, dy: Float32Array, layout: Layout, p: GradInputParams): Promise<Float32Array> {
    const [hi, lo] = split(p.mean);
    const f32 = (v: Float64Array) => Float32Array.from(v);
    return this.#elementwise(this.#gradInput, x.length, layout, [x, dy, layout.c, layout.s, hi, lo, f32(p.a), f32(p.b), f32(p.k)]);
  }

  async #elementwise(kernel: Elementwise, length: number, { n, c, s }: Layout, args: unknown[]): Promise<Float32Array> {
    const out = s >= PLANE_KERNEL_MIN_S ? await this.#run(kernel.planes, [s, n * c], args) : await this.#run(kernel.flat, [length], args);
    return flatten(out, length);
  }

  /** Pipelines compiled, evicted and cached by the fused passes (undefined without them). */
  pipelineCounters(): PipelineCounters | undefined {
    return this.fused?.counters();
  }

  async dispose(): Promise<void> {
    await this.#tail;
    await this.fused?.dispose();
    await this.#gpu.destroy();
    if (this.backend === 'webgpu') await releaseWebGPU();
  }

  #run(kernel: IKernelRunShortcut, output: number[], args: unknown[]): Promise<Output> {
    return this.#exclusive(async () => {
      kernel.setOutput(output);
      return (await (kernel as unknown as (...a: unknown[]) => Output | Promise<Output>)(...args)) as Output;
    });
  }

  /** Runs `work` after every call before it has finished. */
  #exclusive<T>(work: () => Promise<T>): Promise<T> {
    const run = this.#tail.then(work);
    this.#tail = run.catch(() => undefined);
    return run;
  }
}
