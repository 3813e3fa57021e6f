/**
 * The native backend's loops: plain typed-array code that V8 compiles to scalar machine code,
 * with every sum in float64 (JavaScript numbers) and one rounding to float32 per output.
 *
 * Each loop covers a range of units so that worker threads can split one tensor between them:
 * with s > 1 a unit is one (sample, channel) row of s elements; with s = 1 (an (N, C) input) a
 * unit is one sample's C values. Sums are added into `acc` (length 2c): acc[ch] and acc[c + ch].
 * Below them: the same loops on WebAssembly SIMD (simd-wat.ts, over chunks copied into each
 * thread's SIMD memory), the chunks threads take (`*Chunks`), and the fused forward and backward
 * shares.
 *
 * These functions are also the source of the worker threads (`Function.prototype.toString`), so
 * each must be self-contained: no imports, no closures, no calls to anything but each other.
 */
import type { BackwardParams, GradInputParams, NormalizeParams, TrainForwardParams } from '../kernels.js';

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
    // Four accumulators, as in statsUnits (and in the SIMD loops' four lanes).
    let a0 = 0, a1 = 0, a2 = 0, a3 = 0, q0 = 0, q1 = 0, q2 = 0, q3 = 0;
    for (; i + 3 < end; i += 4) {
      const g0 = dy[i]!, g1 = dy[i + 1]!, g2 = dy[i + 2]!, g3 = dy[i + 3]!;
      a0 += g0; a1 += g1; a2 += g2; a3 += g3;
      q0 += g0 * (x[i]! - mu); q1 += g1 * (x[i + 1]! - mu); q2 += g2 * (x[i + 2]! - mu); q3 += g3 * (x[i + 3]! - mu);
    }
    for (; i < end; i++) {
      const g = dy[i]!;
      a0 += g;
      q0 += g * (x[i]! - mu);
    }
    acc[ch] = acc[ch]! + a0 + a1 + (a2 + a3);
    acc[c + ch] = acc[c + ch]! + q0 + q1 + (q2 + q3);
    if (++ch === c) ch = 0;
  }
}

/** grad_input = dy · a + (x − mean) · b + k. */
export function gradInputUnits(
  x: Float32Array, dy: Float32Array, gi: Float32Array, c: number, s: number, u0: number, u1: number,
  mean: Float64Array, a: Float64Array, b: Float64Array, k: Float64Array,
): void {
  if (s === 1) {
    // Four samples at a time: each channel's four coefficients are read once per four values
    // (a quarter faster than two at a time on (256,1024); eight are no faster than four).
    let n = u0;
    for (; n + 3 < u1; n += 4) {
      const r0 = n * c, r1 = r0 + c, r2 = r1 + c, r3 = r2 + c;
      for (let ch = 0; ch < c; ch++) {
        const mu = mean[ch]!, aa = a[ch]!, bb = b[ch]!, kk = k[ch]!;
        const x0 = x[r0 + ch]!, x1 = x[r1 + ch]!, x2 = x[r2 + ch]!, x3 = x[r3 + ch]!;
        const g0 = dy[r0 + ch]!, g1 = dy[r1 + ch]!, g2 = dy[r2 + ch]!, g3 = dy[r3 + ch]!;
        gi[r0 + ch] = g0 * aa + (x0 - mu) * bb + kk;
        gi[r1 + ch] = g1 * aa + (x1 - mu) * bb + kk;
        gi[r2 + ch] = g2 * aa + (x2 - mu) * bb + kk;
        gi[r3 + ch] = g3 * aa + (x3 - mu) * bb + kk;
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
    // Loads first, then stores: V8 keeps the eight loads ahead of the four conversions and stores.
    for (; i + 3 < end; i += 4) {
      const x0 = x[i]!, x1 = x[i + 1]!, x2 = x[i + 2]!, x3 = x[i + 3]!;
      const g0 = dy[i]!, g1 = dy[i + 1]!, g2 = dy[i + 2]!, g3 = dy[i + 3]!;
      gi[i] = g0 * aa + (x0 - mu) * bb + kk;
      gi[i + 1] = g1 * aa + (x1 - mu) * bb + kk;
      gi[i + 2] = g2 * aa + (x2 - mu) * bb + kk;
      gi[i + 3] = g3 * aa + (x3 - mu) * bb + kk;
    }
    for (; i < end; i++) gi[i] = dy[i]! * aa + (x[i]! - mu) * bb + kk;
    if (++ch === c) ch = 0;
  }
}

/*
 * The SIMD loops (simd-wat.ts), where a thread has them: each chunk is copied into the thread's
 * own WebAssembly memory, run there, and its output copied back. They give the bits of the loops
 * above, so which of the two a thread runs changes nothing but the time.
 */

/** One thread's instance of the SIMD loops. */
export interface SimdLoops {
  readonly exports: Readonly<Record<string, (...args: number[]) => void>>;
  readonly memory: WebAssembly.Memory;
}

/**
 * A region's bytes, a multiple of 16 padded to 1088 bytes (17 cache lines) past a multiple of
 * 4096, so that regions the loops walk side by side start at different offsets within a 4 KiB
 * page. At the same page offset a load waits on an earlier store to any of them (the core
 * compares addresses' low 12 bits first) and they fight for one set of the L1 cache: the (N, C)
 * grad_input loop on (256,1024) ran 1.8 times as long with its three tensors 64 KiB + 16 bytes
 * apart.
 */
export function staggered(bytes: number): number {
  const b = Math.ceil(bytes / 16) * 16;
  return b + ((4096 + 1088 - (b % 4096)) % 4096);
}

/** `simd`'s memory, grown to at least `end` bytes. (Growing replaces its buffer.) */
export function simdMemory(simd: SimdLoops, end: number): ArrayBuffer {
  const have = simd.memory.buffer.byteLength;
  if (end > have) simd.memory.grow(Math.ceil((end - have) / 65536));
  return simd.memory.buffer;
}

/**
 * One pass's place in a thread's SIMD memory: four per-channel float64 arrays (p0..p3) and a
 * chunk's 2c sums, room for one chunk's x, dy and output, then the chunks kept for a fused pass's
 * second half (`kept`: chunk → its x and dy pointers), up to `limit`.
 */
export interface SimdPass {
  readonly simd: SimdLoops;
  readonly c: number;
  readonly ch: number;
  readonly sums: number;
  readonly x: number;
  readonly dy: number;
  readonly out: number;
  next: number;
  readonly limit: number;
  readonly kept: Map<number, number[]>;
}

/**
 * Lays a pass out for chunks of up to `most` elements, keeping up to `keep` bytes of chunks for
 * a second half, with `arrays` in p0.. (simdArrays).
 */
export function simdPass(simd: SimdLoops, c: number, most: number, keep: number, arrays: Float64Array[]): SimdPass {
  const ch = staggered(c * 8);
  const sums = 4 * ch;
  const x = sums + staggered(16 * c);
  const room = staggered(most * 4 + 16);
  const kept = x + 3 * room;
  simdMemory(simd, kept);
  const pass = { simd, c, ch, sums, x, dy: x + room, out: x + 2 * room, next: kept, limit: kept + keep, kept: new Map<number, number[]>() };
  simdArrays(pass, arrays);
  return pass;
}

/** Puts per-channel arrays in p0.. of `pass`. */
export function simdArrays(pass: SimdPass, arrays: Float64Array[]): void {
  const buffer = pass.simd.memory.buffer;
  for (let i = 0; i < arrays.length; i++) new Float64Array(buffer, i * pass.ch, pass.c).set(arrays[i]!);
}

/** Where a chunk of units starts, as an element index, and its elements. */
export function chunkElements(c: number, s: number, u0: number, u1: number): [number, number] {
  const unit = s === 1 ? c : s;
  return [u0 * unit, (u1 - u0) * unit];
}

/** The most elements a chunk of `chunks` over `units` can hold (chunkStart rounds). */
export function mostElements(c: number, s: number, units: number, chunks: number): number {
  return (Math.ceil(units / chunks) + 1) * (s === 1 ? c : s);
}

/**
 * Copies elements [first, first + length) of each tensor into `pass`'s memory, at the source's
 * offset modulo 16 (V8 copies between equally aligned offsets word by word): with `keepIt`,
 * after the chunks kept so far where the pass has room left, else into its room for one chunk.
 * Returns the pointers.
 */
export function simdPut(pass: SimdPass, chunk: number, tensors: Float32Array[], first: number, length: number, keepIt: boolean): number[] {
  const size = staggered(length * 4 + 16);
  const keep = keepIt && pass.next + tensors.length * size <= pass.limit;
  const at = keep ? [pass.next, pass.next + size] : [pass.x, pass.dy];
  const buffer = simdMemory(pass.simd, keep ? pass.next + tensors.length * size : pass.out);
  const pointers = [];
  for (let i = 0; i < tensors.length; i++) {
    const t = tensors[i]!;
    const p = at[i]! + ((t.byteOffset + first * 4) % 16);
    new Float32Array(buffer, p, length).set(t.subarray(first, first + length));
    pointers.push(p);
  }
  if (keep) {
    pass.next += tensors.length * size;
    pass.kept.set(chunk, pointers);
  }
  return pointers;
}

/** Where an output chunk goes in `pass`'s memory: its room, at the output's offset modulo 16. */
export function simdOut(pass: SimdPass, y: Float32Array, first: number): number {
  return pass.out + ((y.byteOffset + first * 4) % 16);
}

/*
 * Chunks. A tensor's units are cut into `chunks` ranges that depend on its layout alone
 * (chunkCount); each chunk's sums go into its own row of `partials` (chunks × 2c), and the rows
 * are added in chunk order. So every sum has the same bits whichever thread ran which chunk, and
 * however many threads there are.
 *
 * The threads of a pass take chunks from a shared counter and count them done (`sync`, a shared
 * Int32Array: taken, done, the fused second half's done, failed, then a claim per chunk). A fused
 * forward or backward is one hand-off: once every chunk of the reduction is done, each thread
 * adds the rows up itself and goes on to the element-wise half, claiming first the chunks it read
 * in the first half (their x and dy are still in its SIMD memory, up to the pass's `keep` bytes)
 * and then any chunk no thread has claimed. A worker that wakes late finds the chunks taken and
 * does nothing, so the calling thread never waits for a thread to start, only for chunks that
 * another thread has taken to finish.
 */

/** sync's slots (the functions below write them as numbers: the workers run them as source). */
export const TAKEN = 0;
export const DONE = 1;
export const DONE_2 = 2;
export const FAILED = 3;
export const SYNC_SLOTS = 4;

/**
 * Chunks for `units` units of `length` elements: one per 32768 elements, from 1 to 1024 (a
 * chunk's three tensors, 384 KiB, then fit a core's L2 cache in each thread's SIMD memory, up to
 * 32M-element tensors). Half as many chunks as at 16384 elements halve the rows of sums each
 * thread adds and the per-chunk work: 5 to 11 % off the fused passes on (256,1024) and
 * (32,64,56,56), the same on (8,256,14,14) (docs/benchmarks.md, issue 15's seventh part).
 */
export function chunkCount(units: number, length: number): number {
  return Math.max(1, Math.min(units, 1024, Math.ceil(length / 32768)));
}

/** Where chunk `k` of `chunks` starts. */
export function chunkStart(units: number, chunks: number, k: number): number {
  return Math.round((units * k) / chunks);
}

/**
 * Waits until sync[slot] reaches `target`: a short spin (the other threads are running), then
 * futex waits. Throws when a thread failed, or after `timeoutMs` (a thread that died never ends).
 */
export function waitFor(sync: Int32Array, slot: number, target: number, timeoutMs = 10_000): void {
  let spins = 0;
  let seen;
  let deadline = 0;
  while ((seen = Atomics.load(sync, slot)) < target) {
    if (Atomics.load(sync, 3) !== 0) throw new Error('a native worker failed its share of the pass (its stderr has the error)');
    if (++spins < 4096) continue;
    if (deadline === 0) deadline = Date.now() + timeoutMs;
    Atomics.wait(sync, slot, seen, 20);
    if (Date.now() > deadline) throw new Error(`a native pass waited ${timeoutMs} ms for its other threads`);
  }
}

/** A share of a pass failed: lets every thread through and says so. */
export function failPass(sync: Int32Array, chunks: number): void {
  Atomics.store(sync, 3, 1);
  Atomics.store(sync, 1, chunks);
  Atomics.store(sync, 2, chunks);
  Atomics.notify(sync, 1);
  Atomics.notify(sync, 2);
}

/** Counts chunk done at sync[slot], waking a waiting thread after the last one. */
export function chunkDone(sync: Int32Array, slot: number, chunks: number): void {
  if (Atomics.add(sync, slot, 1) + 1 === chunks) Atomics.notify(sync, slot);
}

/** The rows of `partials` added up in row order. */
export function addRows(partials: Float64Array, width: number, rows: number): Float64Array {
  const total = partials.slice(0, width);
  for (let p = 1; p < rows; p++) {
    const base = p * width;
    for (let i = 0; i < width; i++) total[i] = total[i]! + partials[base + i]!;
  }
  return total;
}

/**
 * addRows on the SIMD loops where there are some (the same adds in the same order), using
 * `simd`'s memory from byte `at` (a multiple of 16) on: a (256, 1024) tensor has 8 rows of 2048
 * sums (16 with the smaller chunks of before, which the JavaScript loop added in 50 µs, a tenth
 * of a backward).
 */
export function sumRows(simd: SimdLoops | null, partials: Float64Array, width: number, rows: number, at: number): Float64Array {
  if (simd === null || rows === 1 || width % 2 !== 0) return addRows(partials, width, rows);
  const values = rows * width;
  const buffer = simdMemory(simd, at + (values + width) * 8);
  new Float64Array(buffer, at, values).set(partials.subarray(0, values));
  simd.exports.add_rows!(at, width, rows, at + values * 8);
  return new Float64Array(buffer, at + values * 8, width).slice();
}

/** Runs `body` over each chunk this thread takes from counter sync[0], counting it done at sync[1]. */
export function takeChunks(sync: Int32Array, units: number, chunks: number, body: (u0: number, u1: number, chunk: number) => void): void {
  for (let chunk = Atomics.add(sync, 0, 1); chunk < chunks; chunk = Atomics.add(sync, 0, 1)) {
    body(chunkStart(units, chunks, chunk), chunkStart(units, chunks, chunk + 1), chunk);
    chunkDone(sync, 1, chunks);
  }
}

/**
 * A fused pass's second half: runs `body` over the chunks this thread claims (sync[4 + chunk]
 * from 0 to 1), first those `kept` names (with their pointers), then, from the last chunk down,
 * any still unclaimed; counts each done at sync[2].
 */
export function claimChunks(
  sync: Int32Array, units: number, chunks: number, kept: Map<number, number[]> | null,
  body: (u0: number, u1: number, chunk: number, pointers: number[] | undefined) => void,
): void {
  const run = (chunk: number, pointers: number[] | undefined) => {
    if (Atomics.compareExchange(sync, 4 + chunk, 0, 1) !== 0) return;
    body(chunkStart(units, chunks, chunk), chunkStart(units, chunks, chunk + 1), chunk, pointers);
    chunkDone(sync, 2, chunks);
  };
  if (kept) for (const [chunk, pointers] of kept) run(chunk, pointers);
  for (let chunk = chunks - 1; chunk >= 0; chunk--) if (Atomics.load(sync, 4 + chunk) === 0) run(chunk, undefined);
}

/**
 * A reduction over the chunks this thread takes, each chunk's sums into its row of partials.
 * On the JavaScript loops the sums go into plain memory first (V8's code for read-modify-writes
 * of shared memory is slower); the SIMD loops add into the pass's sums, zeroed per chunk.
 * `simdSum(pass, pointers, u0, u1)` runs one chunk on the SIMD loops. Returns the SIMD pass.
 */
export function sumChunks(
  simd: SimdLoops | null, tensors: Float32Array[], c: number, s: number, units: number, chunks: number, keep: number, arrays: Float64Array[],
  partials: Float64Array, sync: Int32Array,
  jsSum: (u0: number, u1: number, acc: Float64Array) => void, simdSum: (pass: SimdPass, pointers: number[], u0: number, u1: number) => void,
): SimdPass | null {
  const width = 2 * c;
  if (simd === null) {
    const acc = new Float64Array(width);
    takeChunks(sync, units, chunks, (u0, u1, chunk) => {
      acc.fill(0);
      jsSum(u0, u1, acc);
      partials.set(acc, chunk * width);
    });
    return null;
  }
  const pass = simdPass(simd, c, mostElements(c, s, units, chunks), keep, arrays);
  takeChunks(sync, units, chunks, (u0, u1, chunk) => {
    const [first, length] = chunkElements(c, s, u0, u1);
    const pointers = simdPut(pass, chunk, tensors, first, length, true);
    const sums = new Float64Array(pass.simd.memory.buffer, pass.sums, width);
    sums.fill(0);
    simdSum(pass, pointers, u0, u1);
    partials.set(sums, chunk * width);
  });
  return pass;
}

/**
 * statsUnits over the chunks this thread takes, each into its row of partials, keeping up to
 * `keep` bytes of x in SIMD memory. Returns the SIMD pass, if any.
 */
export function statsChunks(
  simd: SimdLoops | null, x: Float32Array, c: number, s: number, units: number, chunks: number, k: Float64Array, partials: Float64Array, sync: Int32Array,
  keep: number,
): SimdPass | null {
  return sumChunks(simd, [x], c, s, units, chunks, keep, [k], partials, sync,
    (u0, u1, acc) => statsUnits(x, c, s, u0, u1, k, acc),
    (pass, at, u0, u1) => {
      if (s === 1) pass.simd.exports.stats_nc!(at[0]!, c, u1 - u0, 0, pass.sums);
      else pass.simd.exports.stats_rows!(at[0]!, s, u1 - u0, u0 % c, c, 0, pass.sums);
    });
}

/** gradSumsUnits over the chunks this thread takes, as statsChunks (keeping x and dy). */
export function gradSumsChunks(
  simd: SimdLoops | null, x: Float32Array, dy: Float32Array, c: number, s: number, units: number, chunks: number, mean: Float64Array,
  partials: Float64Array, sync: Int32Array, keep: number,
): SimdPass | null {
  return sumChunks(simd, [x, dy], c, s, units, chunks, keep, [mean], partials, sync,
    (u0, u1, acc) => gradSumsUnits(x, dy, c, s, u0, u1, mean, acc),
    (pass, at, u0, u1) => {
      if (s === 1) pass.simd.exports.grad_sums_nc!(at[0]!, at[1]!, c, u1 - u0, 0, pass.sums);
      else pass.simd.exports.grad_sums_rows!(at[0]!, at[1]!, s, u1 - u0, u0 % c, c, 0, pass.sums);
    });
}

/**
 * An element-wise pass over chunks: taken from the counter, or (`fused`: the second half of a
 * fused pass) claimed, those `first`, the first half's pass, kept first. `simdRun(pass, pointers,
 * out, u0, u1)` runs a chunk on the SIMD loops with its inputs at `pointers`, its output to go at
 * `out`; the output is then copied into `y`.
 */
export function mapChunks(
  simd: SimdLoops | null, inputs: Float32Array[], y: Float32Array, c: number, s: number, units: number, chunks: number, arrays: Float64Array[],
  sync: Int32Array, fused: boolean, first: SimdPass | null,
  jsRun: (u0: number, u1: number) => void, simdRun: (pass: SimdPass, pointers: number[], out: number, u0: number, u1: number) => void,
): void {
  let pass: SimdPass | null = null;
  if (simd !== null) {
    pass = first ?? simdPass(simd, c, mostElements(c, s, units, chunks), 0, arrays);
    if (first) simdArrays(first, arrays);
  }
  const body = (u0: number, u1: number, chunk: number, pointers: number[] | undefined) => {
    if (pass === null) return jsRun(u0, u1);
    const [at, length] = chunkElements(c, s, u0, u1);
    const from = pointers ?? simdPut(pass, chunk, inputs, at, length, false);
    const out = simdOut(pass, y, at);
    simdRun(pass, from, out, u0, u1);
    y.set(new Float32Array(pass.simd.memory.buffer, out, length), at);
  };
  if (fused) claimChunks(sync, units, chunks, first ? first.kept : null, body);
  else takeChunks(sync, units, chunks, (u0, u1, chunk) => body(u0, u1, chunk, undefined));
}

/** normalizeUnits over the chunks this thread takes (or claims, `fused`). */
export function normalizeChunks(
  simd: SimdLoops | null, x: Float32Array, y: Float32Array, c: number, s: number, units: number, chunks: number,
  mean: Float64Array, scale: Float64Array, shift: Float64Array, sync: Int32Array, fused: boolean, first: SimdPass | null,
): void {
  mapChunks(simd, [x], y, c, s, units, chunks, [mean, scale, shift], sync, fused, first,
    (u0, u1) => normalizeUnits(x, y, c, s, u0, u1, mean, scale, shift),
    (pass, at, out, u0, u1) => {
      const ch = pass.ch;
      if (s === 1) pass.simd.exports.normalize_nc!(at[0]!, out, c, u1 - u0, 0, ch, 2 * ch);
      else pass.simd.exports.normalize_rows!(at[0]!, out, s, u1 - u0, u0 % c, c, 0, ch, 2 * ch);
    });
}

/** gradInputUnits over the chunks this thread takes (or claims, `fused`). */
export function gradInputChunks(
  simd: SimdLoops | null, x: Float32Array, dy: Float32Array, gi: Float32Array, c: number, s: number, units: number, chunks: number,
  mean: Float64Array, a: Float64Array, b: Float64Array, k: Float64Array, sync: Int32Array, fused: boolean, first: SimdPass | null,
): void {
  mapChunks(simd, [x, dy], gi, c, s, units, chunks, [mean, a, b, k], sync, fused, first,
    (u0, u1) => gradInputUnits(x, dy, gi, c, s, u0, u1, mean, a, b, k),
    (pass, at, out, u0, u1) => {
      const ch = pass.ch;
      if (s === 1) pass.simd.exports.grad_input_nc!(at[0]!, at[1]!, out, c, u1 - u0, 0, ch, 2 * ch, 3 * ch);
      else pass.simd.exports.grad_input_rows!(at[0]!, at[1]!, out, s, u1 - u0, u0 % c, c, 0, ch, 2 * ch, 3 * ch);
    });
}

/**
 * Each channel's mean and sum of squared deviations m2 from its sums shifted by k: total[ch] =
 * Σ (x − k) and total[c + ch] = Σ (x − k)² over `count` values. m2 is clamped at 0 (rounding can
 * take it below), NaN kept.
 */
export function meanAndM2(total: Float64Array, k: Float64Array, c: number, count: number): Float64Array[] {
  const mean = new Float64Array(c);
  const m2 = new Float64Array(c);
  for (let ch = 0; ch < c; ch++) {
    const sum = total[ch]!;
    mean[ch] = k[ch]! + sum / count;
    const dev = total[c + ch]! - (sum * sum) / count;
    m2[ch] = dev > 0 ? dev : Number.isNaN(dev) ? dev : 0;
  }
  return [mean, m2];
}

/**
 * A training forward's share: statistics shifted by k; once every chunk is done, the batch's
 * mean and m2 (meanAndM2, as NativeKernels.stats derives them) and scale = invstd · weight with invstd =
 * 1/sqrt(m2/count + eps), or 0 where both are 0; then y over the chunks it claims, those whose x
 * it kept first. Returns [mean, m2].
 */
export function trainForwardShare(
  simd: SimdLoops | null, x: Float32Array, y: Float32Array, c: number, s: number, units: number, chunks: number, k: Float64Array,
  weight: Float64Array, bias: Float64Array, eps: number, count: number, partials: Float64Array, sync: Int32Array, keep: number,
): Float64Array[] {
  const pass = statsChunks(simd, x, c, s, units, chunks, k, partials, sync, keep);
  waitFor(sync, 1, chunks);
  const [mean, m2] = meanAndM2(sumRows(simd, partials, 2 * c, chunks, pass ? pass.next : 0), k, c, count) as [Float64Array, Float64Array];
  const scale = new Float64Array(c);
  for (let ch = 0; ch < c; ch++) {
    const variance = m2[ch]! / count;
    scale[ch] = (variance === 0 && eps === 0 ? 0 : 1 / Math.sqrt(variance + eps)) * weight[ch]!;
  }
  normalizeChunks(simd, x, y, c, s, units, chunks, mean, scale, bias, sync, true, pass);
  return [mean, m2];
}

/**
 * A backward's share: Σ dy and Σ dy·(x − mean); once every chunk is done, a = weight·invstd and,
 * with batch statistics, b = −a·invstd²·S2/count and k = −a·S1/count (as batch-norm.ts derives
 * them); then grad_input = dy·a + (x − mean)·b + k over the chunks it claims, those whose x and
 * dy it kept first. Returns the sums.
 */
export function backwardShare(
  simd: SimdLoops | null, x: Float32Array, dy: Float32Array, gi: Float32Array, c: number, s: number, units: number, chunks: number,
  mean: Float64Array, invstd: Float64Array, weight: Float64Array, batchStats: boolean, count: number, partials: Float64Array, sync: Int32Array,
  keep: number,
): Float64Array {
  const pass = gradSumsChunks(simd, x, dy, c, s, units, chunks, mean, partials, sync, keep);
  waitFor(sync, 1, chunks);
  const total = sumRows(simd, partials, 2 * c, chunks, pass ? pass.next : 0);
  const a = new Float64Array(c);
  const b = new Float64Array(c);
  const k = new Float64Array(c);
  for (let ch = 0; ch < c; ch++) {
    const iv = invstd[ch]!;
    a[ch] = weight[ch]! * iv;
    if (batchStats) {
      b[ch] = (-a[ch]! * iv * iv * total[c + ch]!) / count;
      k[ch] = (-a[ch]! * total[ch]!) / count;
    }
  }
  gradInputChunks(simd, x, dy, gi, c, s, units, chunks, mean, a, b, k, sync, true, pass);
  return total;
}

/**
 * What every task of a pass shares: its chunks, their rows of sums, the counters and claims, and
 * the bytes of chunks each thread may keep in its SIMD memory between a fused pass's halves.
 */
export interface Shared {
  units: number;
  chunks: number;
  partials: Float64Array;
  sync: Int32Array;
  keep: number;
}

/** A share of a pass, as the calling thread runs it and the workers receive it. */
export type Task = Shared &
  (
    | { op: 'stats'; x: Float32Array; c: number; s: number; k: Float64Array }
    | { op: 'normalize'; x: Float32Array; y: Float32Array; c: number; s: number; p: NormalizeParams }
    | { op: 'gradSums'; x: Float32Array; dy: Float32Array; c: number; s: number; mean: Float64Array }
    | { op: 'gradInput'; x: Float32Array; dy: Float32Array; gi: Float32Array; c: number; s: number; p: GradInputParams }
    | { op: 'trainForward'; x: Float32Array; y: Float32Array; c: number; s: number; k: Float64Array; p: TrainForwardParams; count: number }
    | { op: 'backward'; x: Float32Array; dy: Float32Array; gi: Float32Array; c: number; s: number; p: BackwardParams }
  );

/**
 * Runs this thread's share of a task: the one dispatcher, for the calling thread and (as source)
 * for the workers. Returns the fused passes' statistics or sums, null for the others.
 */
export function runShare(simd: SimdLoops | null, t: Task): Float64Array[] | Float64Array | null {
  switch (t.op) {
    case 'stats':
      statsChunks(simd, t.x, t.c, t.s, t.units, t.chunks, t.k, t.partials, t.sync, 0);
      return null;
    case 'normalize':
      normalizeChunks(simd, t.x, t.y, t.c, t.s, t.units, t.chunks, t.p.mean, t.p.scale, t.p.shift, t.sync, false, null);
      return null;
    case 'gradSums':
      gradSumsChunks(simd, t.x, t.dy, t.c, t.s, t.units, t.chunks, t.mean, t.partials, t.sync, 0);
      return null;
    case 'gradInput':
      gradInputChunks(simd, t.x, t.dy, t.gi, t.c, t.s, t.units, t.chunks, t.p.mean, t.p.a, t.p.b, t.p.k, t.sync, false, null);
      return null;
    case 'trainForward':
      return trainForwardShare(simd, t.x, t.y, t.c, t.s, t.units, t.chunks, t.k, t.p.weight, t.p.bias, t.p.eps, t.count, t.partials, t.sync, t.keep);
    case 'backward': {
      const p = t.p;
      return backwardShare(simd, t.x, t.dy, t.gi, t.c, t.s, t.units, t.chunks, p.mean, p.invstd, p.weight, p.batchStats, p.count, t.partials, t.sync, t.keep);
    }
  }
}
