/**
 * The kernel interface: the arithmetic that touches every element of a tensor. Each backend
 * implements it over typed arrays; none of them knows about modules, buffers or the wire.
 *
 * Tensors are float32, row-major, viewed as (N, C, S) where S is the product of the spatial
 * dimensions (1 for an (N, C) input): element (n, c, s) is at index (n * C + c) * S + s.
 * Per-channel quantities are float64.
 *
 * A caller must not change an input tensor until the call's promise settles: backends may read
 * it in place from other threads (native) or hand it to gpu.js without a copy (webasm pipelines).
 */

export const BACKEND_NAMES = ['webgpu', 'headlessgl', 'native', 'webasm', 'cpu', 'reference'] as const;
export type BackendName = (typeof BACKEND_NAMES)[number];

export interface Layout {
  readonly n: number;
  readonly c: number;
  readonly s: number;
}

/** Per channel: the mean, and the sum of squared deviations from it (count = n * s). */
export interface ChannelStats {
  readonly mean: Float64Array;
  readonly m2: Float64Array;
}

/** Per channel: y = (x - mean) * scale + shift. */
export interface NormalizeParams {
  readonly mean: Float64Array;
  readonly scale: Float64Array;
  readonly shift: Float64Array;
}

/** Per channel: the sums backward reduces, about the mean the forward used. */
export interface GradSums {
  /** Σ dy */
  readonly sumDy: Float64Array;
  /** Σ dy · (x − mean) */
  readonly sumDyXmu: Float64Array;
}

/** Per channel: grad_input = dy · a + (x − mean) · b + k. */
export interface GradInputParams {
  readonly mean: Float64Array;
  readonly a: Float64Array;
  readonly b: Float64Array;
  readonly k: Float64Array;
}

/** What a fused training forward needs besides x: the affine parameters and eps. */
export interface TrainForwardParams {
  /** Per channel: the weight, or 1 without affine parameters. */
  readonly weight: Float64Array;
  /** Per channel: the bias, or 0 without affine parameters. */
  readonly bias: Float64Array;
  readonly eps: number;
}

/** What a fused backward needs besides x and dy: the saved forward's per-channel values. */
export interface BackwardParams {
  readonly mean: Float64Array;
  readonly invstd: Float64Array;
  /** Per channel: the weight, or 1 without affine parameters. */
  readonly weight: Float64Array;
  /** Whether the forward normalised with batch statistics (the gradient then flows through them). */
  readonly batchStats: boolean;
  /** Values per channel in the forward's batch (n * s). */
  readonly count: number;
}

/**
 * Optional: whole passes in one submission, for backends where each kernel call costs an upload
 * and a readback (gpu.js pipelines). The results must equal what the separate kernels give.
 */
export interface FusedKernels {
  /**
   * A training forward: the batch statistics, then y = (x − mean) · invstd · weight + bias with
   * invstd = 1 / sqrt(m2 / count + eps), or 0 where m2 and eps are both 0. Requires n * s > 1.
   */
  trainForward(x: Float32Array, layout: Layout, params: TrainForwardParams, out?: Float32Array): Promise<{ stats: ChannelStats; output: Float32Array }>;
  /**
   * A backward whose statistics were this shard's own (not a SyncBatchNorm group's): the sums of
   * `gradSums`, then grad_input = w·invstd·(dy − S1/n − (x − mean)·invstd²·S2/n) with batch
   * statistics, or dy·w·invstd without.
   */
  backward(x: Float32Array, dy: Float32Array, layout: Layout, params: BackwardParams, out?: Float32Array): Promise<{ sums: GradSums; gradInput: Float32Array }>;
}

/*
 * OUTPUT_INTO: the passes that write a tensor (normalize, gradInput and the fused forward and
 * backward) take an optional `out`, an array of the input's length that the caller will not read
 * again (x for a forward nothing saves, dy for a backward), which the answer may be written into
 * instead of a new array: element i of the answer depends on element i of the inputs alone, and
 * each backend reads it before writing it. A backend may ignore `out`; the answer is always the
 * array returned.
 */

export interface Kernels {
  readonly backend: BackendName;
  /** A line for logs: what runs underneath (adapter, renderer, executor). */
  readonly description: string;
  /** Batch statistics of each channel. Requires n * s > 0. */
  stats(x: Float32Array, layout: Layout): Promise<ChannelStats>;
  /**
   * The normalised tensor, in a new array of x's length or in `out` (see OUTPUT_INTO below).
   */
  normalize(x: Float32Array, layout: Layout, params: NormalizeParams, out?: Float32Array): Promise<Float32Array>;
  /** Backward's per-channel reductions of dy (same layout as x). */
  gradSums(x: Float32Array, dy: Float32Array, layout: Layout, mean: Float64Array): Promise<GradSums>;
  /** The input gradient, in a new array of x's length or in `out` (see OUTPUT_INTO below). */
  gradInput(x: Float32Array, dy: Float32Array, layout: Layout, params: GradInputParams, out?: Float32Array): Promise<Float32Array>;
  /** Fused passes, where the backend has them. */
  readonly fused?: FusedKernels;
  /**
   * A float32 array of `length` elements in the memory this backend reads fastest (shared memory
   * for worker threads); the wire decodes tensors into it. Plain memory where absent.
   */
  allocate?(length: number): Float32Array;
  /** Gives back an array from `allocate` that nothing will read again, for reuse. */
  release?(tensor: Float32Array): void;
  /**
   * Bytes just before `tensor` in its buffer that belong to it, free for the wire to write an
   * answer's message head into (wire/tensor-answer.ts); 0 for arrays it did not allocate so.
   */
  headRoom?(tensor: Float32Array): number;
  /** Bytes of released arrays held for reuse. */
  readonly pooledBytes?: number;
  /** Releases compiled kernels and device resources. */
  dispose(): Promise<void>;
}

export function layoutOf(shape: readonly number[]): Layout {
  let s = 1;
  for (let i = 2; i < shape.length; i++) s *= shape[i]!;
  return { n: shape[0]!, c: shape[1]!, s };
}
