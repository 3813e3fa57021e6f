/**
 * The native backend's loops: plain typed-array code that V8 compiles to scalar machine code,
 * with every sum in float64 (JavaScript numbers) and one rounding to float32 per output.
 *
 * Each loop covers a range of units so that worker threads can split one tensor between them:
 * with s > 1 a unit is one (sample, channel) row of s elements; with s = 1 (an (N, C) input) a
 * unit is one sample's C values. Sums are added into `acc` (length 2c): acc[ch] and acc[c + ch].
 *
 * These functions are also the source of the worker threads (`Function.prototype.toString`), so
 * each must be self-contained: no imports, no closures, no calls to anything but each other.
 */

/**
 * Σ (x − k) and Σ (x − k)² per channel, with k the channel's shift (its first value, so a large
 * common offset cancels exactly: the difference of two float32 values is exact in float64).
 */
export function statsUnits(x: Float32Array, c: number, s: number, u0: number, u1: number, k: Float64Array, acc: Float64Array): void {
  if (s === 1) {
    // Four samples at a time: one read-modify-write of the sums per four values.
    let b = u0;
    for (; b + 3 < u1; b += 4) {
      const r0 = b * c, r1 = r0 + c, r2 = r1 + c, r3 = r2 + c;
      for (let ch = 0; ch < c; ch++) {
        const shift = k[ch]!;
        const d0 = x[r0 + ch]! - shift, d1 = x[r1 + ch]! - shift, d2 = x[r2 + ch]! - shift, d3 = x[r3 + ch]! - shift;
        acc[ch] = acc[ch]! + (d0 + d1 + (d2 + d3));
        acc[c + ch] = acc[c + ch]! + (d0 * d0 + d1 * d1 + (d2 * d2 + d3 * d3));
      }
    }
    for (; b < u1; b++) {
      const base = b * c;
      for (let ch = 0; ch < c; ch++) {
        const d = x[base + ch]! - k[ch]!;
        acc[ch] = acc[ch]! + d;
        acc[c + ch] = acc[c + ch]! + d * d;
      }
    }
    return;
  }
  let ch = u0 % c;
  for (let r = u0; r < u1; r++) {
    const shift = k[ch]!;
    const end = r * s + s;
    let i = r * s;
    // Four independent accumulators each: one chain of dependent adds would run at the adder's latency.
    let a0 = 0, a1 = 0, a2 = 0, a3 = 0, q0 = 0, q1 = 0, q2 = 0, q3 = 0;
    for (; i + 3 < end; i += 4) {
      const d0 = x[i]! - shift, d1 = x[i + 1]! - shift, d2 = x[i + 2]! - shift, d3 = x[i + 3]! - shift;
      a0 += d0; a1 += d1; a2 += d2; a3 += d3;
      q0 += d0 * d0; q1 += d1 * d1; q2 += d2 * d2; q3 += d3 * d3;
    }
    for (; i < end; i++) {
      const d = x[i]! - shift;
      a0 += d;
      q0 += d * d;
    }
    acc[ch] = acc[ch]! + a0 + a1 + (a2 + a3);
    acc[c + ch] = acc[c + ch]! + q0 + q1 + (q2 + q3);
    if (++ch === c) ch = 0;
  }
}

/** y = (x − mean) · scale + shift. */
export function normalizeUnits(
  x: Float32Array, y: Float32Array, c: number, s: number, u0: number, u1: number,
  mean: Float64Array, scale: Float64Array, shift: Float64Array,
): void {
  if (s === 1) {
    let b = u0;
    for (; b + 1 < u1; b += 2) {
      const r0 = b * c, r1 = r0 + c;
      for (let ch = 0; ch < c; ch++) {
        const mu = mean[ch]!, sc = scale[ch]!, sh = shift[ch]!;
        y[r0 + ch] = (x[r0 + ch]! - mu) * sc + sh;
        y[r1 + ch] = (x[r1 + ch]! - mu) * sc + sh;
      }
    }
    for (; b < u1; b++) {
      const base = b * c;
      for (let ch = 0; ch < c; ch++) y[base + ch] = (x[base + ch]! - mean[ch]!) * scale[ch]! + shift[ch]!;
    }
    return;
  }
  let ch = u0 % c;
  for (let r = u0; r < u1; r++) {
    const mu = mean[ch]!, sc = scale[ch]!, sh = shift[ch]!;
    const end = r * s + s;
    let i = r * s;
    for (; i + 3 < end; i += 4) {
      y[i] = (x[i]! - mu) * sc + sh;
      y[i + 1] = (x[i + 1]! - mu) * sc + sh;
      y[i + 2] = (x[i + 2]! - mu) * sc + sh;
      y[i + 3] = (x[i + 3]! - mu) * sc + sh;
    }
    for (; i < end; i++) y[i] = (x[i]! - mu) * sc + sh;
    if (++ch === c) ch = 0;
  }
}

/** Σ dy and Σ dy · (x − mean) per channel. */
export function gradSumsUnits(
  x: Float32Array, dy: Float32Array, c: number, s: number, u0: number, u1: number, mean: Float64Array, acc: Float64Array,
): void {
  if (s === 1) {
    let b = u0;
    for (; b + 3 < u1; b += 4) {
      const r0 = b * c, r1 = r0 + c, r2 = r1 + c, r3 = r2 + c;
      for (let ch = 0; ch < c; ch++) {
        const mu = mean[ch]!;
        const g0 = dy[r0 + ch]!, g1 = dy[r1 + ch]!, g2 = dy[r2 + ch]!, g3 = dy[r3 + ch]!;
        acc[ch] = acc[ch]! + (g0 + g1 + (g2 + g3));
        acc[c + ch] = acc[c + ch]! + (g0 * (x[r0 + ch]! - mu) + g1 * (x[r1 + ch]! - mu) + (g2 * (x[r2 + ch]! - mu) + g3 * (x[r3 + ch]! - mu)));
      }
    }
    for (; b < u1; b++) {
      const base = b * c;
      for (let ch = 0; ch < c; ch++) {
        const g = dy[base + ch]!;
        acc[ch] = acc[ch]! + g;
        acc[c + ch] = acc[c + ch]! + g * (x[base + ch]! - mean[ch]!);
      }
    }
    return;
  }
  let ch = u0 % c;
  for (let r = u0; r < u1; r++) {
    const mu = mean[ch]!;
    const end = r * s + s;
    let i = r * s;
    let a0 = 0, a1 = 0, q0 = 0, q1 = 0;
    for (; i + 1 < end; i += 2) {
      const g0 = dy[i]!, g1 = dy[i + 1]!;
      a0 += g0; a1 += g1;
      q0 += g0 * (x[i]! - mu); q1 += g1 * (x[i + 1]! - mu);
    }
    if (i < end) {
      const g = dy[i]!;
      a0 += g;
      q0 += g * (x[i]! - mu);
    }
    acc[ch] = acc[ch]! + a0 + a1;
    acc[c + ch] = acc[c + ch]! + q0 + q1;
    if (++ch === c) ch = 0;
  }
}

/** grad_input = dy · a + (x − mean) · b + k. */
export function gradInputUnits(
  x: Float32Array, dy: Float32Array, gi: Float32Array, c: number, s: number, u0: number, u1: number,
  mean: Float64Array, a: Float64Array, b: Float64Array, k: Float64Array,
): void {
  if (s === 1) {
    // Two samples at a time: each channel's four coefficients are read once per two values.
    let n = u0;
    for (; n + 1 < u1; n += 2) {
      const r0 = n * c, r1 = r0 + c;
      for (let ch = 0; ch < c; ch++) {
        const mu = mean[ch]!, aa = a[ch]!, bb = b[ch]!, kk = k[ch]!;
        gi[r0 + ch] = dy[r0 + ch]! * aa + (x[r0 + ch]! - mu) * bb + kk;
        gi[r1 + ch] = dy[r1 + ch]! * aa + (x[r1 + ch]! - mu) * bb + kk;
      }
    }
    for (; n < u1; n++) {
      const base = n * c;
      for (let ch = 0; ch < c; ch++) gi[base + ch] = dy[base + ch]! * a[ch]! + (x[base + ch]! - mean[ch]!) * b[ch]! + k[ch]!;
    }
    return;
  }
  let ch = u0 % c;
  for (let r = u0; r < u1; r++) {
    const mu = mean[ch]!, aa = a[ch]!, bb = b[ch]!, kk = k[ch]!;
    const end = r * s + s;
    let i = r * s;
    for (; i + 1 < end; i += 2) {
      gi[i] = dy[i]! * aa + (x[i]! - mu) * bb + kk;
      gi[i + 1] = dy[i + 1]! * aa + (x[i + 1]! - mu) * bb + kk;
    }
    if (i < end) gi[i] = dy[i]! * aa + (x[i]! - mu) * bb + kk;
    if (++ch === c) ch = 0;
  }
}
