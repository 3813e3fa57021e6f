/**
 * The float64 reference: plain loops with every sum and product in float64 and one rounding to
 * float32 at the end. It is the oracle that every other backend is tested against, and it can
 * serve (`--backend reference`).
 */
import type { ChannelStats, GradInputParams, GradSums, Kernels, Layout, NormalizeParams } from './kernels.js';

export function referenceStats(x: Float32Array, { n, c, s }: Layout): ChannelStats {
  const mean = new Float64Array(c);
  const m2 = new Float64Array(c);
  const count = n * s;
  for (let ch = 0; ch < c; ch++) {
    let sum = 0;
    for (let b = 0; b < n; b++) {
      const base = (b * c + ch) * s;
      for (let i = 0; i < s; i++) sum += x[base + i]!;
    }
    const mu = sum / count;
    let dev = 0;
    for (let b = 0; b < n; b++) {
      const base = (b * c + ch) * s;
      for (let i = 0; i < s; i++) {
        const d = x[base + i]! - mu;
        dev += d * d;
      }
    }
    mean[ch] = mu;
    m2[ch] = dev;
  }
  return { mean, m2 };
}

export function referenceNormalize(x: Float32Array, { n, c, s }: Layout, p: NormalizeParams): Float32Array {
  const y = new Float32Array(x.length);
  for (let b = 0; b < n; b++) {
    for (let ch = 0; ch < c; ch++) {
      const mu = p.mean[ch]!;
      const scale = p.scale[ch]!;
      const shift = p.shift[ch]!;
      const base = (b * c + ch) * s;
      for (let i = 0; i < s; i++) y[base + i] = (x[base + i]! - mu) * scale + shift;
    }
  }
  return y;
}

export function referenceGradSums(x: Float32Array, dy: Float32Array, { n, c, s }: Layout, mean: Float64Array): GradSums {
  const sumDy = new Float64Array(c);
  const sumDyXmu = new Float64Array(c);
  for (let ch = 0; ch < c; ch++) {
    const mu = mean[ch]!;
    let s1 = 0;
    let s2 = 0;
    for (let b = 0; b < n; b++) {
      const base = (b * c + ch) * s;
      for (let i = 0; i < s; i++) {
        const g = dy[base + i]!;
        s1 += g;
        s2 += g * (x[base + i]! - mu);
      }
    }
    sumDy[ch] = s1;
    sumDyXmu[ch] = s2;
  }
  return { sumDy, sumDyXmu };
}

export function referenceGradInput(x: Float32Array, dy: Float32Array, { n, c, s }: Layout, p: GradInputParams): Float32Array {
  const gi = new Float32Array(x.length);
  for (let b = 0; b < n; b++) {
    for (let ch = 0; ch < c; ch++) {
      const mu = p.mean[ch]!;
      const a = p.a[ch]!;
      const bb = p.b[ch]!;
      const k = p.k[ch]!;
      const base = (b * c + ch) * s;
      for (let i = 0; i < s; i++) gi[base + i] = dy[base + i]! * a + (x[base + i]! - mu) * bb + k;
    }
  }
  return gi;
}

export function createReferenceKernels(): Kernels {
  return {
    backend: 'reference',
    description: 'float64 TypeScript loops (the test oracle)',
    stats: async (x, layout) => referenceStats(x, layout),
    normalize: async (x, layout, params) => referenceNormalize(x, layout, params),
    gradSums: async (x, dy, layout, mean) => referenceGradSums(x, dy, layout, mean),
    gradInput: async (x, dy, layout, params) => referenceGradInput(x, dy, layout, params),
    dispose: async () => {},
  };
}
