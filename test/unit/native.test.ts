/**
 * The native backend's own machinery: how it splits a tensor between threads, what it does with
 * non-finite values, its tensor pool and its shutdown. (Its arithmetic is checked against the
 * reference with every other backend in kernels.test.ts and the golden tests.)
 */
import { createHash } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import type { BackwardParams, Layout, TrainForwardParams } from '../../src/kernels/kernels.js';
import { NativeKernels } from '../../src/kernels/native/native-kernels.js';
import { backward, BatchNorm } from '../../src/nn/batch-norm.js';
import { resolveConfig } from '../../src/nn/config.js';
import { referenceGradSums, referenceStats } from '../../src/kernels/reference.js';
import { channelData } from '../support/data.js';
import { until } from '../support/until.js';

const open: NativeKernels[] = [];
function start(options: ConstructorParameters<typeof NativeKernels>[0]): NativeKernels {
  const kernels = new NativeKernels(options);
  open.push(kernels);
  return kernels;
}
afterEach(async () => {
  await Promise.all(open.splice(0).map((k) => k.dispose()));
});

function backwardParams(c: number, batchStats: boolean, count: number): BackwardParams {
  return { mean: new Float64Array(c), invstd: new Float64Array(c).fill(1), weight: new Float64Array(c).fill(1), batchStats, count };
}

describe('native backend', () => {
  it('gives the same bits whether one thread or several share the work, for any split', async () => {
    // Unit counts that do not divide evenly, fewer units than threads, (N, C) and (N, C, S), and
    // tensors of several chunks.
    const layouts = [
      { n: 3, c: 5, s: 7 },
      { n: 1, c: 2, s: 3 },
      { n: 7, c: 3, s: 1 },
      { n: 2, c: 1, s: 1 },
      { n: 5, c: 1, s: 11 },
      { n: 6, c: 3, s: 3001 },
      { n: 301, c: 211, s: 1 },
    ];
    const bits = (a: Float64Array) => Array.from(a, String);
    const one = start({ threads: 1, simd: false });
    for (const threads of [2, 3, 5]) {
      const many = start({ threads, inlineBelow: 0 });
      await many.ready;
      expect(many.simd).toBe(true);
      for (const layout of layouts) {
        const x = channelData(layout.n, layout.c, layout.s, 10, 2, threads);
        const dy = channelData(layout.n, layout.c, layout.s, 0, 1, threads + 1);
        const ref = referenceStats(x, layout);
        const a = await one.stats(x, layout);
        const b = await many.stats(x, layout);
        expect(bits(b.mean)).toEqual(bits(a.mean));
        expect(bits(b.m2)).toEqual(bits(a.m2));
        for (let ch = 0; ch < layout.c; ch++) expect(b.mean[ch]).toBeCloseTo(ref.mean[ch]!, 12);
        const sums = await many.gradSums(x, dy, layout, ref.mean);
        const sumsOne = await one.gradSums(x, dy, layout, ref.mean);
        expect(bits(sums.sumDy)).toEqual(bits(sumsOne.sumDy));
        expect(bits(sums.sumDyXmu)).toEqual(bits(sumsOne.sumDyXmu));
        const sumsRef = referenceGradSums(x, dy, layout, ref.mean);
        for (let ch = 0; ch < layout.c; ch++) {
          expect(sums.sumDy[ch]).toBeCloseTo(sumsRef.sumDy[ch]!, 8);
          expect(sums.sumDyXmu[ch]).toBeCloseTo(sumsRef.sumDyXmu[ch]!, 8);
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

  it('wakes its workers through their doorbells, also after they have slept, and gives their bits', async () => {
    // A worker that never woke would leave every chunk to the calling thread and change no
    // result, so the workers' own count of tasks taken is what shows them working.
    const kernels = start({ threads: 3, inlineBelow: 0 });
    await kernels.ready;
    const layout = { n: 8, c: 3, s: 5000 };
    const x = kernels.allocate(layout.n * layout.c * layout.s);
    x.set(channelData(layout.n, layout.c, layout.s, 2, 1, 11));
    const first = await kernels.stats(x, layout);
    await until(() => kernels.workerTasks >= 2, 5_000, 'both workers to take the first pass');
    await new Promise((r) => setTimeout(r, 100));
    const again = await kernels.stats(x, layout);
    await until(() => kernels.workerTasks >= 4, 5_000, 'both workers to wake for the second pass');
    expect(again.mean).toEqual(first.mean);
    expect(again.m2).toEqual(first.m2);
    const reference = referenceStats(x, layout);
    for (let ch = 0; ch < layout.c; ch++) expect(first.mean[ch]).toBeCloseTo(reference.mean[ch]!, 9);
  });

  it('keeps a worker looking for the next task while tasks come closer than spinMicros, and lets it sleep otherwise', async () => {
    // Passes 5 ms apart against a 60 s spinMicros: once one such gap has been seen, the worker
    // finds every later ring while it looks and is never woken from sleep again. With spinMicros
    // 0, or gaps (25 ms) longer than the window (1 ms), it never looks and sleeps after each pass.
    // (Wake-up counts are bounds: a worker descheduled past a ring finds it without sleeping.)
    const layout = { n: 4, c: 2, s: 5000 };
    const wakesOver = async (spinMicros: number, gapMs = 5) => {
      const kernels = start({ threads: 2, inlineBelow: 0, spinMicros });
      await kernels.ready;
      const x = kernels.allocate(layout.n * layout.c * layout.s);
      x.set(channelData(layout.n, layout.c, layout.s, 2, 1, 5));
      const pass = async (i: number) => {
        await kernels.stats(x, layout);
        await until(() => kernels.workerTasks >= i, 5_000, `the worker to take pass ${i}`);
        await new Promise((r) => setTimeout(r, gapMs));
      };
      await pass(1);
      await pass(2);
      const [wakes, looks] = [kernels.workerWakes, kernels.workerLooks];
      for (let i = 3; i <= 7; i++) await pass(i);
      return { wakes: kernels.workerWakes - wakes, looks: kernels.workerLooks - looks };
    };
    const spinning = await wakesOver(60_000_000);
    expect(spinning.wakes).toBe(0);
    expect(spinning.looks).toBeGreaterThan(0);
    for (const [spinMicros, gapMs] of [[0, 25], [1000, 25]] as const) {
      const sleeping = await wakesOver(spinMicros, gapMs);
      expect(sleeping.looks).toBe(0);
      expect(sleeping.wakes).toBeGreaterThan(0);
    }
  });

  it('refuses work once disposed', async () => {
    const kernels = new NativeKernels({ threads: 2, inlineBelow: 0 });
    await kernels.dispose();
    await expect(kernels.stats(new Float32Array(4), { n: 2, c: 1, s: 2 })).rejects.toThrow(/disposed/);
    await expect(kernels.fused.backward(new Float32Array(4), new Float32Array(4), { n: 2, c: 1, s: 2 }, backwardParams(1, true, 4))).rejects.toThrow(/disposed/);
  });

  describe('fused passes', () => {
    const layouts: Layout[] = [
      { n: 4, c: 3, s: 6001 },
      { n: 64, c: 1024, s: 1 },
      { n: 3, c: 5, s: 7 },
      { n: 7, c: 3, s: 1 },
      { n: 9, c: 4, s: 1 },
      { n: 2, c: 1, s: 13 },
      { n: 1, c: 2, s: 3 },
    ];

    /** trainForward on the separate kernels, as batch-norm.ts runs it without `fused`. */
    async function separateForward(k: NativeKernels, x: Float32Array, layout: Layout, p: TrainForwardParams) {
      const stats = await k.stats(x, layout);
      const count = layout.n * layout.s;
      const scale = stats.m2.map((m2, ch) => {
        const variance = m2 / count;
        return (variance === 0 && p.eps === 0 ? 0 : 1 / Math.sqrt(variance + p.eps)) * p.weight[ch]!;
      });
      return { stats, output: await k.normalize(x, layout, { mean: stats.mean, scale, shift: p.bias }) };
    }

    /** backward on the separate kernels, as batch-norm.ts runs it without `fused`. */
    async function separateBackward(k: NativeKernels, x: Float32Array, dy: Float32Array, layout: Layout, p: BackwardParams) {
      const sums = await k.gradSums(x, dy, layout, p.mean);
      const a = p.invstd.map((v, ch) => p.weight[ch]! * v);
      const b = new Float64Array(layout.c);
      const kk = new Float64Array(layout.c);
      if (p.batchStats) {
        for (let ch = 0; ch < layout.c; ch++) {
          b[ch] = (-a[ch]! * p.invstd[ch]! * p.invstd[ch]! * sums.sumDyXmu[ch]!) / p.count;
          kk[ch] = (-a[ch]! * sums.sumDy[ch]!) / p.count;
        }
      }
      return { sums, gradInput: await k.gradInput(x, dy, layout, { mean: p.mean, a, b, k: kk }) };
    }

    /** The values as strings (NaN and -0 included), or for long arrays a digest of them: a mismatch in a long array is then one line. */
    const bits = (a: ArrayLike<number>) => {
      const text = Array.from(a, (v) => (Number.isNaN(v) ? 'NaN' : Object.is(v, -0) ? '-0' : String(v)));
      if (text.length <= 64) return text;
      return [`${text.length} values`, createHash('sha256').update(text.join(',')).digest('hex')];
    };

    it('give the bits of the separate kernels, on one thread or several, on the SIMD loops or not, for any split', async () => {
      const first = new Map<string, string[]>();
      /** The same bits as with one thread (the first count run). */
      const same = (key: string, values: ArrayLike<number>) => {
        if (!first.has(key)) first.set(key, bits(values));
        expect(bits(values)).toEqual(first.get(key));
      };
      // keepBytes: what each thread keeps of the first half's chunks for the second (the default
      // keeps every chunk here, 300 kB some of them, 0 none: those are copied in again).
      const configs = [[1, false], [1, true], [1, true, 300_000], [2, true], [2, true, 0], [3, false], [3, true], [3, true, 300_000]] as const;
      for (const [threads, simd, keepBytes] of configs) {
        const kernels = start({ threads, inlineBelow: 0, simd, keepBytes });
        await kernels.ready;
        expect(kernels.simd).toBe(simd);
        for (const layout of layouts) {
          const { n, c, s } = layout;
          const x = kernels.allocate(n * c * s);
          x.set(channelData(n, c, s, 10, 2, 1));
          const dy = kernels.allocate(n * c * s);
          dy.set(channelData(n, c, s, 0, 1, 2));
          const weight = Float64Array.from({ length: c }, (_, ch) => 0.5 + ch / 4);
          const bias = Float64Array.from({ length: c }, (_, ch) => ch - 1);
          for (const eps of [1e-5, 0]) {
            const p = { weight, bias, eps };
            const fused = await kernels.fused.trainForward(x, layout, p);
            const separate = await separateForward(kernels, x, layout, p);
            expect(bits(fused.stats.mean)).toEqual(bits(separate.stats.mean));
            expect(bits(fused.stats.m2)).toEqual(bits(separate.stats.m2));
            expect(bits(fused.output)).toEqual(bits(separate.output));
            same(`${JSON.stringify(layout)} ${eps} y`, fused.output);
            same(`${JSON.stringify(layout)} ${eps} m2`, fused.stats.m2);
          }
          const stats = await kernels.stats(x, layout);
          const invstd = stats.m2.map((m2) => 1 / Math.sqrt(m2 / (n * s) + 1e-5));
          for (const batchStats of [true, false]) {
            const p = { mean: stats.mean, invstd, weight, batchStats, count: n * s };
            const fused = await kernels.fused.backward(x, dy, layout, p);
            const separate = await separateBackward(kernels, x, dy, layout, p);
            expect(bits(fused.sums.sumDy)).toEqual(bits(separate.sums.sumDy));
            expect(bits(fused.sums.sumDyXmu)).toEqual(bits(separate.sums.sumDyXmu));
            expect(bits(fused.gradInput)).toEqual(bits(separate.gradInput));
            same(`${JSON.stringify(layout)} ${batchStats} gi`, fused.gradInput);
          }
        }
      }
    });

    it('match the reference on a constant channel with eps 0 and on non-finite values', async () => {
      const kernels = start({ threads: 2, inlineBelow: 0 });
      const layout = { n: 2, c: 3, s: 2 };
      // Channel 0 is constant (invstd 0 with eps 0), channel 1 holds a NaN, channel 2 an infinity.
      const x = Float32Array.of(4, 4, 1, NaN, -Infinity, 1, 4, 4, 2, 3, 5, 6);
      const p = { weight: Float64Array.of(1, 1, 1), bias: Float64Array.of(0.5, 0, 0), eps: 0 };
      const fused = await kernels.fused.trainForward(x, layout, p);
      const ref = referenceStats(x, layout);
      expect(bits(fused.stats.mean)).toEqual(bits(ref.mean));
      expect(Array.from(fused.output.subarray(0, 2))).toEqual([0.5, 0.5]);
      expect(Array.from(fused.output.subarray(6, 8))).toEqual([0.5, 0.5]);
      expect(Number.isNaN(fused.output[2]!)).toBe(true);
      const separate = await separateForward(kernels, x, layout, p);
      expect(bits(fused.output)).toEqual(bits(separate.output));
    });

    it('run beside separate passes and each other with every call in flight at once', async () => {
      const kernels = start({ threads: 2, inlineBelow: 0 });
      const layout = { n: 8, c: 4, s: 64 };
      const length = layout.n * layout.c * layout.s;
      const inputs = [1, 2, 3, 4, 5, 6].map((seed) => {
        const x = kernels.allocate(length);
        x.set(channelData(layout.n, layout.c, layout.s, seed, 1, seed));
        return x;
      });
      const p = { weight: new Float64Array(4).fill(1), bias: new Float64Array(4), eps: 1e-5 };
      const alone = [];
      for (const x of inputs) alone.push(await kernels.fused.trainForward(x, layout, p));
      const together = await Promise.all(inputs.flatMap((x) => [kernels.fused.trainForward(x, layout, p), kernels.stats(x, layout).then(() => separateForward(kernels, x, layout, p))]));
      for (let i = 0; i < inputs.length; i++) {
        expect(bits(together[2 * i]!.output)).toEqual(bits(alone[i]!.output));
        expect(bits(together[2 * i + 1]!.output)).toEqual(bits(alone[i]!.output));
      }
    });
  });

  describe('answers written into inputs the caller gives up (OUTPUT_INTO)', () => {
    const shape = [4, 3, 8, 8];
    const length = 4 * 3 * 64;
    const module = (weight: number[]) => {
      const m = new BatchNorm(resolveConfig({ kind: 'BATCH_NORM_2D', numFeatures: 3n, cumulativeAverage: false }));
      m.loadStateDict({ weight: { shape: [3], data: Float32Array.from(weight) }, bias: { shape: [3], data: Float32Array.of(0.5, -1, 2) } }, 2, false);
      return m;
    };
    const input = (kernels: NativeKernels) => {
      const x = kernels.allocate(length);
      x.set(channelData(4, 3, 64, 2, 3, 9));
      return x;
    };

    for (const training of [true, false]) {
      it(`puts a ${training ? 'training' : 'eval'} forward's output in place of an input nothing saves, with the same values`, async () => {
        const kernels = start({ threads: 2, inlineBelow: 0 });
        await kernels.ready;
        const a = module([1.5, -2, 0.25]);
        const b = module([1.5, -2, 0.25]);
        a.update({ training });
        b.update({ training });
        const kept = input(kernels);
        const expected = (await a.forward(kept, shape, kernels, false, false)).output;
        const given = input(kernels);
        const got = (await b.forward(given, shape, kernels, false, true)).output;
        expect(got).toBe(given);
        expect(Array.from(got)).toEqual(Array.from(expected));
        expect(Array.from(kept)).toEqual(Array.from(channelData(4, 3, 64, 2, 3, 9)));
        // A forward that saves its input keeps it.
        const saved = input(kernels);
        const withSave = await module([1.5, -2, 0.25]).forward(saved, shape, kernels, true, true);
        expect(withSave.output).not.toBe(saved);
      });
    }

    it('leaves the input alone where an infinite scale needs it afterwards', async () => {
      const kernels = start({ threads: 2, inlineBelow: 0 });
      const given = input(kernels);
      const reference = input(kernels);
      const out = (await module([Infinity, 1, 1]).forward(given, shape, kernels, false, true)).output;
      expect(out).not.toBe(given);
      const expected = (await module([Infinity, 1, 1]).forward(reference, shape, kernels, false, false)).output;
      expect(Array.from(out, String)).toEqual(Array.from(expected, String));
    });

    it('puts grad_input in place of a grad_output the caller gives up, with the same values', async () => {
      const kernels = start({ threads: 2, inlineBelow: 0 });
      await kernels.ready;
      const m = module([1.5, -2, 0.25]);
      const { saved } = await m.forward(input(kernels), shape, kernels, true, true);
      const dy = () => {
        const t = kernels.allocate(length);
        t.set(channelData(4, 3, 64, 0, 1, 4));
        return t;
      };
      const expected = await backward(saved!, dy(), shape, kernels);
      const given = dy();
      const got = await backward(saved!, given, shape, kernels, { dyDisposable: true });
      expect(got.gradInput).toBe(given);
      expect(Array.from(got.gradInput)).toEqual(Array.from(expected.gradInput));
      expect(Array.from(got.gradWeight!)).toEqual(Array.from(expected.gradWeight!));
    });
  });
});
