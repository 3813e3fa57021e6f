/**
 * The Kernels interface on gpu.js, for each of its Node backends: webgpu, headlessgl, webasm and
 * cpu. The kernels are created once per backend with dynamic output and arguments, so one
 * compiled kernel serves every shape; a call only resizes the output.
 */
import gpujs from 'gpu.js';
import type { IKernelRunShortcut } from 'gpu.js';
import type { ChannelStats, Kernels, Layout, NormalizeParams } from '../kernels.js';
import { acquireWebGPU, releaseWebGPU } from './environment.js';
import { BLOCK, NORMALIZE_FLAT, NORMALIZE_PLANES, PARTIAL_SQUARES, PARTIAL_SUM, PLANE_KERNEL_MIN_S } from './sources.js';

const { GPU } = gpujs;

export type GpuJsMode = 'webgpu' | 'headlessgl' | 'webasm' | 'cpu';

const SETTINGS = {
  dynamicOutput: true,
  dynamicArguments: true,
  precision: 'single',
  tactic: 'precision',
  loopMaxIterations: BLOCK + 1,
} as const;

const STATS_ARGS = {
  x: 'Array',
  c: 'Integer',
  s: 'Integer',
  count: 'Integer',
  parts: 'Integer',
  block: 'Integer',
  hi: 'Array',
  lo: 'Array',
  one: 'Float',
} as const;
const NORMALIZE_ARGS = { x: 'Array', c: 'Integer', s: 'Integer', hi: 'Array', lo: 'Array', scale: 'Array', shift: 'Array' } as const;

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
  readonly #partialSum: IKernelRunShortcut;
  readonly #partialSquares: IKernelRunShortcut;
  readonly #normalizeFlat: IKernelRunShortcut;
  readonly #normalizePlanes: IKernelRunShortcut;
  /** Resizing and running a kernel must not interleave with another call's (webgpu awaits). */
  #tail: Promise<unknown> = Promise.resolve();

  constructor(mode: GpuJsMode, description: string) {
    this.backend = mode;
    this.description = description;
    this.#gpu = new GPU({ mode });
    if (mode === 'webgpu') acquireWebGPU();
    const make = (source: string, argumentTypes: object) =>
      this.#gpu.createKernel(source, { ...SETTINGS, argumentTypes } as never) as IKernelRunShortcut;
    this.#partialSum = make(PARTIAL_SUM, STATS_ARGS);
    this.#partialSquares = make(PARTIAL_SQUARES, STATS_ARGS);
    this.#normalizeFlat = make(NORMALIZE_FLAT, NORMALIZE_ARGS);
    this.#normalizePlanes = make(NORMALIZE_PLANES, NORMALIZE_ARGS);
  }

  /** The gpu.js modes the kernels ran in (after at least one call each). */
  modes(): (string | undefined)[] {
    return [this.#partialSum, this.#partialSquares, this.#normalizeFlat, this.#normalizePlanes].map(kernelMode);
  }

  async stats(x: Float32Array, { n, c, s }: Layout): Promise<ChannelStats> {
    const count = n * s;
    const block = Math.min(BLOCK, count);
    const parts = Math.ceil(count / block);
    const shift = new Float32Array(c);
    for (let ch = 0; ch < c; ch++) shift[ch] = x[ch * s]!;
    const zeros = new Float32Array(c);
    const sums = flatten(await this.#run(this.#partialSum, [c * parts], [x, c, s, count, parts, block, shift, zeros, 1]), c * parts);

    const mean = new Float64Array(c);
    const hi = new Float32Array(c);
    const lo = new Float32Array(c);
    for (let ch = 0; ch < c; ch++) {
      let total = 0;
      for (let p = 0; p < parts; p++) total += sums[ch * parts + p]!;
      const mu = shift[ch]! + total / count;
      mean[ch] = mu;
      hi[ch] = mu;
      lo[ch] = mu - hi[ch]!;
    }
    const squares = flatten(await this.#run(this.#partialSquares, [c * parts], [x, c, s, count, parts, block, hi, lo, 1]), c * parts);
    const m2 = new Float64Array(c);
    for (let ch = 0; ch < c; ch++) {
      let total = 0;
      for (let p = 0; p < parts; p++) total += squares[ch * parts + p]!;
      m2[ch] = total;
    }
    return { mean, m2 };
  }

  async normalize(x: Float32Array, { n, c, s }: Layout, p: NormalizeParams): Promise<Float32Array> {
    const hi = Float32Array.from(p.mean);
    const lo = new Float32Array(c);
    for (let ch = 0; ch < c; ch++) lo[ch] = p.mean[ch]! - hi[ch]!;
    const args = [x, c, s, hi, lo, Float32Array.from(p.scale), Float32Array.from(p.shift)];
    const out =
      s >= PLANE_KERNEL_MIN_S
        ? await this.#run(this.#normalizePlanes, [s, n * c], args)
        : await this.#run(this.#normalizeFlat, [x.length], args);
    return flatten(out, x.length);
  }

  async dispose(): Promise<void> {
    await this.#tail;
    await this.#gpu.destroy();
    if (this.backend === 'webgpu') await releaseWebGPU();
  }

  #run(kernel: IKernelRunShortcut, output: number[], args: unknown[]): Promise<Output> {
    const run = this.#tail.then(async () => {
      kernel.setOutput(output);
      return (await (kernel as unknown as (...a: unknown[]) => Output | Promise<Output>)(...args)) as Output;
    });
    this.#tail = run.catch(() => undefined);
    return run;
  }
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
