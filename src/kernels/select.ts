/**
 * Backend selection at start-up, in the manner of onnxruntime-web's backend registry: candidates
 * in priority order, each initialised once and proven by a self-test against the float64
 * reference; the first that passes serves. When none does, one error says why each failed.
 *
 * `auto` follows a documented rule (docs/backends.md): gpu.js on a hardware GPU first (webgpu,
 * then headlessgl); otherwise the native multi-threaded loops, which beat every gpu.js backend on
 * CPU cores, software GPU drivers (lavapipe, llvmpipe, SwiftShader) included. webasm and cpu
 * remain as fallbacks.
 */
import type { BackendChoice } from '../config.js';
import { GpuJsKernels, type GpuJsMode } from './gpujs/gpujs-kernels.js';
import { probeHeadlessGL, probeWebGPU, type Probe } from './gpujs/environment.js';
import type { BackendName, Kernels } from './kernels.js';
import { NativeKernels } from './native/native-kernels.js';
import { createReferenceKernels, referenceGradInput, referenceGradSums, referenceNormalize, referenceStats } from './reference.js';

export interface Attempt {
  readonly backend: BackendName;
  readonly ok: boolean;
  /** Why it was passed over, or what runs underneath when it was chosen. */
  readonly detail: string;
}

export interface Selection {
  readonly kernels: Kernels;
  readonly attempts: readonly Attempt[];
}

export class NoBackendError extends Error {
  override readonly name = 'NoBackendError';
  constructor(readonly attempts: readonly Attempt[]) {
    super(`no compute backend could start: ${attempts.map((a) => `[${a.backend}] ${a.detail}`).join('; ')}`);
  }
}

const PROBES: Readonly<Record<GpuJsMode, () => Promise<Probe>>> = {
  webgpu: probeWebGPU,
  headlessgl: probeHeadlessGL,
  webasm: async () => ({ available: true, hardware: false, description: 'WebAssembly SIMD on the CPU' }),
  cpu: async () => ({ available: true, hardware: false, description: 'gpu.js transpiled JavaScript on the CPU' }),
};

/** Starts one backend and checks it against the reference; throws with the reason on failure. */
export async function startBackend(name: BackendName, opts: { requireHardware?: boolean } = {}): Promise<Kernels> {
  if (name === 'reference') return createReferenceKernels();
  let kernels: Kernels;
  if (name === 'native') {
    const native = new NativeKernels();
    await native.ready;
    kernels = native;
  } else {
    const probe = await PROBES[name]();
    if (!probe.available) throw new Error(probe.description);
    if (opts.requireHardware && !probe.hardware) throw new Error(`software device (${probe.description}); auto prefers the native loops over it`);
    kernels = new GpuJsKernels(name, probe.description);
  }
  try {
    await selfTest(kernels);
  } catch (err) {
    await kernels.dispose().catch(() => undefined);
    throw err;
  }
  return kernels;
}

export async function selectKernels(choice: BackendChoice): Promise<Selection> {
  const order: { name: BackendName; requireHardware: boolean }[] =
    choice === 'auto'
      ? [
          { name: 'webgpu', requireHardware: true },
          { name: 'headlessgl', requireHardware: true },
          { name: 'native', requireHardware: false },
          { name: 'webasm', requireHardware: false },
          { name: 'cpu', requireHardware: false },
        ]
      : [{ name: choice, requireHardware: false }];
  const attempts: Attempt[] = [];
  for (const { name, requireHardware } of order) {
    try {
      const kernels = await startBackend(name, { requireHardware });
      attempts.push({ backend: name, ok: true, detail: kernels.description });
      return { kernels, attempts };
    } catch (err) {
      attempts.push({ backend: name, ok: false, detail: (err as Error).message });
    }
  }
  throw new NoBackendError(attempts);
}

/**
 * Runs every kernel on a small tensor with a large offset, compares the results with
 * the reference, and checks that gpu.js really ran in the mode asked for (it can fall back to
 * its cpu kernels without failing).
 */
async function selfTest(kernels: Kernels): Promise<void> {
  const layout = { n: 3, c: 2, s: 40 };
  const x = new Float32Array(layout.n * layout.c * layout.s).map((_, i) => 100 + ((i * 7919) % 13) / 8 - (i % 2));
  const stats = await kernels.stats(x, layout);
  const ref = referenceStats(x, layout);
  const params = { mean: ref.mean, scale: Float64Array.of(2, 0.5), shift: Float64Array.of(1, -1) };
  const y = await kernels.normalize(x, layout, params);
  const yRef = referenceNormalize(x, layout, params);
  const flat = { ...layout, n: 1, s: 2 };
  const yFlat = await kernels.normalize(x.subarray(0, 4), flat, params);
  const yFlatRef = referenceNormalize(x.subarray(0, 4), flat, params);
  for (let ch = 0; ch < layout.c; ch++) {
    if (Math.abs(stats.mean[ch]! - ref.mean[ch]!) > 1e-5 || Math.abs(stats.m2[ch]! - ref.m2[ch]!) > 1e-4 * ref.m2[ch]!) {
      throw new Error(`self-test: statistics of channel ${ch} are off (mean ${stats.mean[ch]} vs ${ref.mean[ch]})`);
    }
  }
  const worst = Math.max(...y.map((v, i) => Math.abs(v - yRef[i]!)), ...yFlat.map((v, i) => Math.abs(v - yFlatRef[i]!)));
  if (!(worst <= 1e-5)) throw new Error(`self-test: normalised values are off by ${worst}`);
  const dy = y.map((v, i) => v * ((i % 7) - 3));
  const sums = await kernels.gradSums(x, dy, layout, ref.mean);
  const sumsRef = referenceGradSums(x, dy, layout, ref.mean);
  const gradParams = { mean: ref.mean, a: Float64Array.of(0.5, 2), b: Float64Array.of(-0.25, 0.125), k: Float64Array.of(1, -1) };
  const gi = await kernels.gradInput(x, dy, layout, gradParams);
  const giRef = referenceGradInput(x, dy, layout, gradParams);
  for (let ch = 0; ch < layout.c; ch++) {
    const off = Math.abs(sums.sumDy[ch]! - sumsRef.sumDy[ch]!) + Math.abs(sums.sumDyXmu[ch]! - sumsRef.sumDyXmu[ch]!);
    if (!(off <= 1e-3)) throw new Error(`self-test: backward sums of channel ${ch} are off by ${off}`);
  }
  const worstGrad = Math.max(...gi.map((v, i) => Math.abs(v - giRef[i]!)));
  if (!(worstGrad <= 1e-4)) throw new Error(`self-test: input gradients are off by ${worstGrad}`);
  if (kernels.fused) {
    const fused = await kernels.fused.trainForward(x, layout, { weight: Float64Array.of(2, 0.5), bias: Float64Array.of(1, -1), eps: 1e-5 });
    for (let ch = 0; ch < layout.c; ch++) {
      if (Math.abs(fused.stats.mean[ch]! - ref.mean[ch]!) > 1e-5 || Math.abs(fused.stats.m2[ch]! - ref.m2[ch]!) > 1e-4 * ref.m2[ch]!) {
        throw new Error(`self-test: fused statistics of channel ${ch} are off (mean ${fused.stats.mean[ch]} vs ${ref.mean[ch]})`);
      }
    }
  }
  if (!(kernels instanceof GpuJsKernels)) return;
  const modes = kernels.modes();
  if (modes.some((m) => m !== kernels.backend)) {
    throw new Error(`gpu.js ran its kernels as ${modes.join(', ')} instead of ${kernels.backend}`);
  }
}
