/**
 * The fused passes of the gpu.js backends (gpu.js pipelines, src/kernels/gpujs/fused.ts): results
 * against the float64 reference and against the separate kernels, on awkward layouts and offset
 * data; the executor gpu.js really ran them on (no silent fallback to its step-by-step executor);
 * pipelines compiled once per shape class and kept in a bounded cache.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { probeWebGPU } from '../../src/kernels/gpujs/environment.js';
import { FUSED_EXECUTORS, type FusedMode } from '../../src/kernels/gpujs/fused.js';
import { GpuJsKernels } from '../../src/kernels/gpujs/gpujs-kernels.js';
import type { Layout } from '../../src/kernels/kernels.js';
import { referenceGradInput, referenceGradSums, referenceNormalize, referenceStats } from '../../src/kernels/reference.js';
import { availableBackends } from '../support/backends.js';
import { expectClose, maxAbs } from '../support/compare.js';
import { channelData } from '../support/data.js';

const available = new Set((await availableBackends()).map((b) => b.name));
const MODES = (['webasm', 'webgpu'] as const).filter((m) => available.has(m));

async function start(mode: FusedMode, options: ConstructorParameters<typeof GpuJsKernels>[2] = {}): Promise<GpuJsKernels> {
  // availableBackends() disposed its probe run, which takes navigator.gpu away again.
  if (mode === 'webgpu') expect((await probeWebGPU()).available).toBe(true);
  return new GpuJsKernels(mode, `${mode} (test)`, options);
}

const LAYOUTS: [string, Layout][] = [
  ['(4,16,8,8)', { n: 4, c: 16, s: 64 }],
  ['(8,256,14,14)', { n: 8, c: 256, s: 196 }],
  ['(256,64) as (N,C), s = 1', { n: 256, c: 64, s: 1 }],
  ['(3,5,7) odd sizes', { n: 3, c: 5, s: 7 }],
  ['(2,3,1000) a block boundary inside a plane', { n: 2, c: 3, s: 1000 }],
  ['(1,2,2) n * s = 2', { n: 1, c: 2, s: 2 }],
  ['(2,1) n * s = 2, s = 1, C = 1', { n: 2, c: 1, s: 1 }],
  ['(5,1,300) C = 1', { n: 5, c: 1, s: 300 }],
  ['(600,3) more rows than a block', { n: 600, c: 3, s: 1 }],
];

const DATA: [string, number, number][] = [
  ['N(0,1)', 0, 1],
  ['N(3,2)', 3, 2],
  ['offset 1000, spread 0.01', 1000, 0.01],
  ['offset -300, spread 0.001', -300, 0.001],
];

const affine = (c: number) => ({
  weight: Float64Array.from({ length: c }, (_, ch) => (ch % 2 ? 1.5 : -0.5)),
  bias: Float64Array.from({ length: c }, (_, ch) => ch * 0.1 - 0.3),
});

for (const mode of MODES) {
  describe(`${mode} fused passes`, () => {
    let kernels: GpuJsKernels;
    beforeAll(async () => {
      // Every size on a pipeline (on webasm small tensors go to the separate kernels by default).
      kernels = await start(mode, { minElements: 0 });
    });
    afterAll(async () => kernels?.dispose());

    for (const [layoutName, layout] of LAYOUTS) {
      for (const [dataName, offset, spread] of DATA) {
        it(`train forward and backward of ${layoutName}, ${dataName}`, async () => {
          const { n, c, s } = layout;
          const count = n * s;
          const x = channelData(n, c, s, offset, spread, c * 31 + s);
          const { weight, bias } = affine(c);
          const eps = 1e-5;
          const fused = await kernels.fused!.trainForward(x, layout, { weight, bias, eps });

          // Statistics: as accurate as stats() (the mean is its very value).
          const ref = referenceStats(x, layout);
          const separate = await kernels.stats(x, layout);
          expect(Array.from(fused.stats.mean), 'mean equals stats()').toEqual(Array.from(separate.mean));
          for (let ch = 0; ch < c; ch++) {
            const sd = Math.sqrt(ref.m2[ch]! / count);
            expect(Math.abs(fused.stats.mean[ch]! - ref.mean[ch]!), `mean of channel ${ch}`).toBeLessThanOrEqual(1e-6 * sd + 1e-12);
            expect(Math.abs(fused.stats.m2[ch]! - ref.m2[ch]!), `m2 of channel ${ch}`).toBeLessThanOrEqual(2e-6 * ref.m2[ch]! + 1e-30);
          }
          // Output: y = (x - mean) * invstd * w + b with the float64 statistics.
          const invstd = ref.m2.map((m2) => 1 / Math.sqrt(m2 / count + eps));
          const params = { mean: ref.mean, scale: invstd.map((v, ch) => v * weight[ch]!), shift: bias };
          expectClose(fused.output, referenceNormalize(x, layout, params), { rtol: 1e-6, atol: 2e-6 }, 'output');

          // Backward with batch statistics, then without.
          const dy = channelData(n, c, s, 0.5, 1, n + 7);
          const back = { mean: ref.mean, invstd, weight, count };
          const got = await kernels.fused!.backward(x, dy, layout, { ...back, batchStats: true });
          const sumsRef = referenceGradSums(x, dy, layout, ref.mean);
          const magnitudes = referenceGradSums(
            x.map((v, i) => ref.mean[Math.floor(i / s) % c]! + Math.abs(v - ref.mean[Math.floor(i / s) % c]!)),
            dy.map(Math.abs),
            layout,
            ref.mean,
          );
          for (let ch = 0; ch < c; ch++) {
            expect(Math.abs(got.sums.sumDy[ch]! - sumsRef.sumDy[ch]!), `Σ dy of channel ${ch}`).toBeLessThanOrEqual(1e-6 * magnitudes.sumDy[ch]!);
            expect(Math.abs(got.sums.sumDyXmu[ch]! - sumsRef.sumDyXmu[ch]!), `Σ dy(x-mean) of channel ${ch}`).toBeLessThanOrEqual(
              1e-6 * magnitudes.sumDyXmu[ch]! + 1e-12,
            );
          }
          const a = invstd.map((v, ch) => v * weight[ch]!);
          const b = a.map((v, ch) => (-v * invstd[ch]! * invstd[ch]! * sumsRef.sumDyXmu[ch]!) / count);
          const k = a.map((v, ch) => (-v * sumsRef.sumDy[ch]!) / count);
          const giRef = referenceGradInput(x, dy, layout, { mean: ref.mean, a, b, k });
          // Relative to the terms grad_input is the difference of (it cancels to 0 when n * s = 2).
          const terms = referenceGradInput(x, dy.map(Math.abs), layout, {
            mean: ref.mean,
            a: a.map(Math.abs),
            b: new Float64Array(c),
            k: k.map(Math.abs),
          });
          const worst = maxAbs(terms);
          expectClose(got.gradInput, giRef, { rtol: 1e-5, atol: 1e-5 * worst }, 'input gradient with batch statistics');

          const eval_ = await kernels.fused!.backward(x, dy, layout, { ...back, batchStats: false });
          const zeros = new Float64Array(c);
          const evalSeparate = await kernels.gradInput(x, dy, layout, { mean: ref.mean, a, b: zeros, k: zeros });
          expect(Array.from(eval_.gradInput), 'without batch statistics: dy * w * invstd, as the separate kernel').toEqual(Array.from(evalSeparate));
        });
      }
    }

    it('compute every channel in the pipeline on ordinary data (no channel redone on the host)', () => {
      // Everything above ran with the in-pipeline mean, scale and coefficients.
      expect(kernels.pipelineCounters()!.hostChannels).toBe(0);
    });

    it('ran on the fused executor of their backend, never on the generic fallback', () => {
      const counters = kernels.pipelineCounters()!;
      expect(counters.cached.length).toBeGreaterThan(0);
      for (const p of counters.cached) {
        expect(p.backend, `${p.pass} ${JSON.stringify(p.layout)}`).toBe(mode);
        expect(FUSED_EXECUTORS[mode], `${p.pass} ${JSON.stringify(p.layout)}`).toContain(p.executorKind);
        expect(p.fallbackReason).toBeNull();
      }
      if (mode === 'webgpu') expect(new Set(counters.cached.map((p) => p.executorKind))).toEqual(new Set(['fused-encoder']));
      // webasm: the worker pool for the big layouts, the calling thread for the tiny ones.
      const kindOf = (l: Layout) => counters.cached.find((p) => p.pass === 'forward' && p.layout.c === l.c && p.layout.s === l.s && p.layout.n === l.n)?.executorKind;
      if (mode === 'webasm') {
        expect(kindOf({ n: 8, c: 256, s: 196 })).toBe('fused-threaded');
        expect(kindOf({ n: 3, c: 5, s: 7 })).toBe('fused-sync');
      }
    });

    it('give a constant channel with eps = 0 invstd 0: output the bias, m2 exactly 0', async () => {
      const layout = { n: 4, c: 3, s: 50 };
      const x = channelData(4, 3, 50, 2, 1, 9);
      for (let b = 0; b < 4; b++) x.fill(7.3, (b * 3 + 1) * 50, (b * 3 + 2) * 50);
      const { weight, bias } = affine(3);
      const got = await kernels.fused!.trainForward(x, layout, { weight, bias, eps: 0 });
      expect(got.stats.m2[1]).toBe(0);
      expect(got.stats.mean[1]).toBe(Math.fround(7.3));
      for (let b = 0; b < 4; b++) {
        for (const v of got.output.subarray((b * 3 + 1) * 50, (b * 3 + 2) * 50)) expect(v).toBe(Math.fround(bias[1]!));
      }
      // And its gradient: zero through that channel.
      const invstd = Float64Array.from(got.stats.m2, (m2) => (m2 === 0 ? 0 : 1 / Math.sqrt(m2 / 200)));
      const dy = channelData(4, 3, 50, 0.5, 1, 3);
      const back = await kernels.fused!.backward(x, dy, layout, { mean: got.stats.mean, invstd, weight, batchStats: true, count: 200 });
      for (let b = 0; b < 4; b++) {
        // (a zero of either sign: lavapipe's compiler does not keep signed zeros)
        for (const v of back.gradInput.subarray((b * 3 + 1) * 50, (b * 3 + 2) * 50)) expect(Math.abs(v)).toBe(0);
      }
    });

    it('read input at any byte offset, keep earlier results, and leave the input alone', async () => {
      const layout = { n: 3, c: 4, s: 50 };
      const x = channelData(3, 4, 50, 2, 1, 5);
      const backing = new ArrayBuffer(x.byteLength + 64);
      const shifted = new Float32Array(backing, 32, x.length);
      shifted.set(x);
      const { weight, bias } = affine(4);
      const first = await kernels.fused!.trainForward(shifted, layout, { weight, bias, eps: 1e-5 });
      expect(Array.from(shifted)).toEqual(Array.from(x));
      expect(Object.keys(shifted)).toEqual(Object.keys(x));
      const kept = first.output.slice();
      await kernels.fused!.trainForward(channelData(3, 4, 50, -7, 3, 6), layout, { weight, bias, eps: 1e-5 });
      expect(Array.from(first.output)).toEqual(Array.from(kept));
      const direct = await kernels.fused!.trainForward(x, layout, { weight, bias, eps: 1e-5 });
      expect(Array.from(first.output)).toEqual(Array.from(direct.output));
    });

    it('run concurrent calls of different shapes, fused and separate, without mixing them up', async () => {
      const a = { n: 4, c: 3, s: 100 };
      const b = { n: 7, c: 2, s: 5 };
      const xa = channelData(a.n, a.c, a.s, 1, 1, 3);
      const xb = channelData(b.n, b.c, b.s, -1, 2, 4);
      const pa = affine(a.c);
      const pb = affine(b.c);
      const [fa, sb, fb, sa] = await Promise.all([
        kernels.fused!.trainForward(xa, a, { ...pa, eps: 1e-5 }),
        kernels.stats(xb, b),
        kernels.fused!.trainForward(xb, b, { ...pb, eps: 1e-5 }),
        kernels.stats(xa, a),
      ]);
      expect(Array.from(fa.stats.mean)).toEqual(Array.from(sa.mean));
      expect(Array.from(fb.stats.mean)).toEqual(Array.from(sb.mean));
      expectClose(fa.stats.mean, referenceStats(xa, a).mean, { rtol: 1e-6, atol: 1e-7 }, 'a');
      expectClose(fb.stats.mean, referenceStats(xb, b).mean, { rtol: 1e-6, atol: 1e-7 }, 'b');
    });
  });

  describe(`${mode} pipelines`, () => {
    it('are compiled once per shape class: repeated calls compile nothing', async () => {
      const kernels = await start(mode, { minElements: 0 });
      type ModuleConstructor = new (...args: unknown[]) => unknown;
      const wasm = (globalThis as unknown as { WebAssembly: { Module: ModuleConstructor } }).WebAssembly;
      const Original = wasm.Module;
      let modules = 0;
      wasm.Module = new Proxy(Original, {
        construct(target, args, newTarget) {
          modules++;
          return Reflect.construct(target, args, newTarget);
        },
      });
      try {
        const layout = { n: 4, c: 8, s: 100 };
        const x = channelData(4, 8, 100, 1, 2);
        const dy = channelData(4, 8, 100, 0, 1, 2);
        const { weight, bias } = affine(8);
        const run = async () => {
          const f = await kernels.fused!.trainForward(x, layout, { weight, bias, eps: 1e-5 });
          const invstd = f.stats.m2.map((m2) => 1 / Math.sqrt(m2 / 400 + 1e-5));
          await kernels.fused!.backward(x, dy, layout, { mean: f.stats.mean, invstd, weight, batchStats: true, count: 400 });
        };
        await run();
        const afterFirst = { ...kernels.pipelineCounters()!, modules };
        expect(afterFirst.compiled).toBe(2);
        if (mode === 'webasm') expect(afterFirst.modules, 'the first call does compile WebAssembly modules').toBeGreaterThan(0);
        for (let i = 0; i < 5; i++) await run();
        const after = kernels.pipelineCounters()!;
        expect(after.compiled).toBe(2);
        expect(modules - afterFirst.modules).toBe(0);
        expect(after.live).toEqual(afterFirst.live);
        expect(after.cached.map((p) => p.calls)).toEqual([6, 6]);
      } finally {
        wasm.Module = Original;
        await kernels.dispose();
      }
    });

    it('stay in a bounded cache: the least recently used are destroyed', async () => {
      const kernels = await start(mode, { minElements: 0, cacheSize: 3 });
      try {
        const { weight, bias } = affine(2);
        const forward = async (n: number) => {
          const layout = { n, c: 2, s: 10 };
          const x = channelData(n, 2, 10, 5, 1, n);
          const got = await kernels.fused!.trainForward(x, layout, { weight, bias, eps: 1e-5 });
          expectClose(got.stats.mean, referenceStats(x, layout).mean, { rtol: 1e-6, atol: 1e-7 }, `mean of n = ${n}`);
        };
        const base = kernels.pipelineCounters()!.live;
        await forward(1);
        const one = kernels.pipelineCounters()!.live;
        const perPipeline = { pipelines: one.pipelines - base.pipelines, kernels: one.kernels - base.kernels };
        expect(perPipeline.pipelines).toBe(1);
        for (const n of [2, 3, 4, 5, 6]) await forward(n);
        let counters = kernels.pipelineCounters()!;
        expect(counters.compiled).toBe(6);
        expect(counters.evicted).toBe(3);
        expect(counters.cached.map((p) => p.layout.n)).toEqual([4, 5, 6]);
        // Evicted pipelines are gone from gpu.js too, kernels and all.
        expect(counters.live).toEqual({ pipelines: base.pipelines + 3, kernels: base.kernels + 3 * perPipeline.kernels });
        await forward(4); // a hit: moves to the back, compiles nothing
        await forward(1); // evicted before: compiled again, and evicts 5
        counters = kernels.pipelineCounters()!;
        expect(counters.compiled).toBe(7);
        expect(counters.cached.map((p) => p.layout.n)).toEqual([6, 4, 1]);
        expect(counters.live).toEqual({ pipelines: base.pipelines + 3, kernels: base.kernels + 3 * perPipeline.kernels });
      } finally {
        await kernels.dispose();
      }
    });
  });
}

describe('fused passes by default', () => {
  it.runIf(available.has('webasm'))('send small webasm tensors to the separate kernels, big ones to a pipeline', async () => {
    const kernels = await start('webasm');
    try {
      const small = { n: 4, c: 8, s: 100 };
      const x = channelData(4, 8, 100, 3, 2);
      const { weight, bias } = affine(8);
      const got = await kernels.fused!.trainForward(x, small, { weight, bias, eps: 1e-5 });
      expect(kernels.pipelineCounters()!.compiled).toBe(0);
      const stats = await kernels.stats(x, small);
      expect(Array.from(got.stats.mean)).toEqual(Array.from(stats.mean));
      expect(Array.from(got.stats.m2)).toEqual(Array.from(stats.m2));
      const invstd = stats.m2.map((m2) => 1 / Math.sqrt(m2 / 400 + 1e-5));
      const y = await kernels.normalize(x, small, { mean: stats.mean, scale: invstd.map((v, ch) => v * weight[ch]!), shift: bias });
      expect(Array.from(got.output)).toEqual(Array.from(y));

      const big = { n: 8, c: 64, s: 2048 };
      expect(kernels.fused!.fusesLayout(big)).toBe(true);
      const xb = channelData(8, 64, 2048, 3, 2);
      const fb = await kernels.fused!.trainForward(xb, big, { ...affine(64), eps: 1e-5 });
      expect(kernels.pipelineCounters()!.compiled).toBe(1);
      expectClose(fb.stats.mean, referenceStats(xb, big).mean, { rtol: 1e-6, atol: 1e-7 }, 'mean');
      expect(kernels.pipelineCounters()!.cached[0]!.executorKind).toBe('fused-threaded');
    } finally {
      await kernels.dispose();
    }
  });

  it('are absent where gpu.js has no fused executor (cpu, headlessgl)', async () => {
    const cpu = new GpuJsKernels('cpu', 'cpu (test)');
    expect(cpu.fused).toBeUndefined();
    expect(cpu.pipelineCounters()).toBeUndefined();
    await cpu.dispose();
    if (available.has('headlessgl')) {
      const gl = new GpuJsKernels('headlessgl', 'headlessgl (test)');
      expect(gl.fused).toBeUndefined();
      await gl.dispose();
    }
    for (const mode of MODES) {
      const kernels = await start(mode);
      expect(kernels.fused).toBeDefined();
      await kernels.dispose();
    }
  });
});
