/**
 * The native backend's own machinery: how it splits a tensor between threads, what it does with
 * non-finite values, its tensor pool and its shutdown. (Its arithmetic is checked against the
 * reference with every other backend in kernels.test.ts and the golden tests.)
 */
import { afterEach, describe, expect, it } from 'vitest';
import { NativeKernels } from '../../src/kernels/native/native-kernels.js';
import { referenceGradSums, referenceStats } from '../../src/kernels/reference.js';
import { channelData } from '../support/data.js';

const open: NativeKernels[] = [];
function start(options: ConstructorParameters<typeof NativeKernels>[0]): NativeKernels {
  const kernels = new NativeKernels(options);
  open.push(kernels);
  return kernels;
}
afterEach(async () => {
  await Promise.all(open.splice(0).map((k) => k.dispose()));
});

describe('native backend', () => {
  it('gives the same sums whether one thread or several share the work, for any split', async () => {
    // Unit counts that do not divide evenly, fewer units than threads, (N, C) and (N, C, S).
    const layouts = [
      { n: 3, c: 5, s: 7 },
      { n: 1, c: 2, s: 3 },
      { n: 7, c: 3, s: 1 },
      { n: 2, c: 1, s: 1 },
      { n: 5, c: 1, s: 11 },
    ];
    const one = start({ threads: 1 });
    for (const threads of [2, 3, 5]) {
      const many = start({ threads, inlineBelow: 0 });
      for (const layout of layouts) {
        const x = channelData(layout.n, layout.c, layout.s, 10, 2, threads);
        const dy = channelData(layout.n, layout.c, layout.s, 0, 1, threads + 1);
        const ref = referenceStats(x, layout);
        const a = await one.stats(x, layout);
        const b = await many.stats(x, layout);
        for (let ch = 0; ch < layout.c; ch++) {
          expect(b.mean[ch]).toBeCloseTo(a.mean[ch]!, 12);
          expect(b.m2[ch]).toBeCloseTo(a.m2[ch]!, 10);
          expect(b.mean[ch]).toBeCloseTo(ref.mean[ch]!, 12);
        }
        const sums = await many.gradSums(x, dy, layout, ref.mean);
        const sumsRef = referenceGradSums(x, dy, layout, ref.mean);
        for (let ch = 0; ch < layout.c; ch++) {
          expect(sums.sumDy[ch]).toBeCloseTo(sumsRef.sumDy[ch]!, 10);
          expect(sums.sumDyXmu[ch]).toBeCloseTo(sumsRef.sumDyXmu[ch]!, 10);
        }
      }
    }
  });

  it('matches the reference on infinities and NaN, including in the value it shifts by', async () => {
    const kernels = start({ threads: 2, inlineBelow: 0 });
    const layout = { n: 2, c: 3, s: 2 };
    const x = Float32Array.of(Infinity, 1, 2, 3, NaN, 5, 6, 7, 8, 9, 10, 11);
    const got = await kernels.stats(x, layout);
    const ref = referenceStats(x, layout);
    expect(Array.from(got.mean)).toEqual(Array.from(ref.mean));
    expect(Array.from(got.m2, Number.isNaN)).toEqual(Array.from(ref.m2, Number.isNaN));
    expect(got.m2[1]).toBeCloseTo(ref.m2[1]!, 10);
  });

  it('hands large tensors out in shared memory and small ones in plain memory', () => {
    const kernels = start({ threads: 2, inlineBelow: 1000 });
    expect(kernels.allocate(1000).buffer).toBeInstanceOf(SharedArrayBuffer);
    expect(kernels.allocate(999).buffer).toBeInstanceOf(ArrayBuffer);
    expect(start({ threads: 1, inlineBelow: 0 }).allocate(5000).buffer).toBeInstanceOf(ArrayBuffer);
  });

  it('reuses released tensors, ignores foreign or repeated releases, and keeps the pool within its budget', () => {
    const kernels = start({ threads: 2, inlineBelow: 0, poolBytes: 4096 });
    const a = kernels.allocate(512);
    kernels.release(a);
    kernels.release(a);
    expect(kernels.pooledBytes).toBe(2048);
    expect(kernels.allocate(512)).toBe(a);
    expect(kernels.pooledBytes).toBe(0);
    expect(kernels.allocate(512)).not.toBe(a);

    kernels.release(new Float32Array(new SharedArrayBuffer(2048)).subarray(1));
    kernels.release(new Float32Array(512));
    expect(kernels.pooledBytes).toBe(0);

    const big = [kernels.allocate(512), kernels.allocate(512), kernels.allocate(512)];
    for (const t of big) kernels.release(t);
    expect(kernels.pooledBytes).toBe(4096);
    // The oldest went first.
    expect(kernels.allocate(512)).toBe(big[2]);
    expect(kernels.allocate(512)).toBe(big[1]);
    expect(kernels.pooledBytes).toBe(0);
  });

  it('copies a tensor outside shared memory before handing it to the workers', async () => {
    const kernels = start({ threads: 2, inlineBelow: 0 });
    const layout = { n: 4, c: 2, s: 8 };
    const x = channelData(layout.n, layout.c, layout.s, 3, 1, 7);
    expect(x.buffer).toBeInstanceOf(ArrayBuffer);
    const y = await kernels.normalize(x, layout, { mean: Float64Array.of(3, 3), scale: Float64Array.of(1, 1), shift: Float64Array.of(0, 0) });
    expect(y[5]).toBeCloseTo(x[5]! - 3, 6);
    expect(y[63]).toBeCloseTo(x[63]! - 3, 6);
  });

  it('refuses work once disposed', async () => {
    const kernels = new NativeKernels({ threads: 2, inlineBelow: 0 });
    await kernels.dispose();
    await expect(kernels.stats(new Float32Array(4), { n: 2, c: 1, s: 2 })).rejects.toThrow(/disposed/);
  });
});
