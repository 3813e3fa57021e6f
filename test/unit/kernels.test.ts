/**
 * Every compute backend that starts here against the float64 reference: statistics and
 * normalisation over many shapes, offset data, unaligned and odd sizes.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Kernels, Layout } from '../../src/kernels/kernels.js';
import { referenceGradInput, referenceGradSums, referenceNormalize, referenceStats } from '../../src/kernels/reference.js';
import { availableBackends } from '../support/backends.js';
import { expectClose } from '../support/compare.js';
import { channelData } from '../support/data.js';

const SHAPES: [string, Layout][] = [
  ['(4,16,8,8)', { n: 4, c: 16, s: 64 }],
  ['(8,256,14,14)', { n: 8, c: 256, s: 196 }],
  ['(256,1024) as (N,C)', { n: 256, c: 1024, s: 1 }],
  ['(3,5,7) odd sizes', { n: 3, c: 5, s: 7 }],
  ['(2,3,1000) a block boundary inside a plane', { n: 2, c: 3, s: 1000 }],
  ['(1,2,2) two values per channel', { n: 1, c: 2, s: 2 }],
  ['(600,3) more rows than a block', { n: 600, c: 3, s: 1 }],
  ['(2,4,4,4,4) as 3d', { n: 2, c: 4, s: 64 }],
];

const DATA: [string, number, number][] = [
  ['N(0,1)', 0, 1],
  ['offset 100, spread 0.1', 100, 0.1],
  ['offset 1000, spread 0.01', 1000, 0.01],
  ['offset -300, spread 0.001', -300, 0.001],
];

for (const backend of await availableBackends()) {
  describe(`${backend.label} kernels`, () => {
    let kernels: Kernels;
    beforeAll(async () => {
      kernels = await backend.start();
    });
    afterAll(async () => kernels?.dispose());

    it('report the backend they run on', () => {
      expect(kernels.backend).toBe(backend.name);
      expect(kernels.description.length).toBeGreaterThan(0);
    });

    for (const [shapeName, layout] of SHAPES) {
      for (const [dataName, offset, spread] of DATA) {
        it(`statistics and normalisation of ${shapeName}, ${dataName}`, async () => {
          const x = channelData(layout.n, layout.c, layout.s, offset, spread, layout.c * 31 + layout.s);
          const count = layout.n * layout.s;
          const ref = referenceStats(x, layout);
          const got = await kernels.stats(x, layout);
          for (let ch = 0; ch < layout.c; ch++) {
            const sd = Math.sqrt(ref.m2[ch]! / count);
            // The mean to within a millionth of the spread; the spread to float32 precision.
            expect(Math.abs(got.mean[ch]! - ref.mean[ch]!), `mean of channel ${ch}`).toBeLessThanOrEqual(1e-6 * sd + 1e-12);
            expect(Math.abs(got.m2[ch]! - ref.m2[ch]!), `m2 of channel ${ch}`).toBeLessThanOrEqual(2e-6 * ref.m2[ch]! + 1e-30);
          }
          const scale = Float64Array.from(ref.m2, (m2, ch) => (1 / Math.sqrt(m2 / count + 1e-5)) * (ch % 2 ? 1.5 : -0.5));
          const shift = Float64Array.from(ref.mean, (_, ch) => ch * 0.1 - 0.3);
          const params = { mean: ref.mean, scale, shift };
          const y = await kernels.normalize(x, layout, params);
          expectClose(y, referenceNormalize(x, layout, params), { rtol: 1e-6, atol: 2e-6 }, 'normalised output');

          // Backward: the sums about the mean, and the elementwise input gradient.
          const dy = channelData(layout.n, layout.c, layout.s, 0.5, 1, layout.n + 7);
          const sums = await kernels.gradSums(x, dy, layout, ref.mean);
          const sumsRef = referenceGradSums(x, dy, layout, ref.mean);
          // Float32 sums in blocks: within a millionth of the sum of magnitudes.
          const magnitudes = referenceGradSums(
            x.map((v, i) => ref.mean[Math.floor(i / layout.s) % layout.c]! + Math.abs(v - ref.mean[Math.floor(i / layout.s) % layout.c]!)),
            dy.map(Math.abs),
            layout,
            ref.mean,
          );
          for (let ch = 0; ch < layout.c; ch++) {
            expect(Math.abs(sums.sumDy[ch]! - sumsRef.sumDy[ch]!), `sum dy of channel ${ch}`).toBeLessThanOrEqual(1e-6 * magnitudes.sumDy[ch]!);
            expect(Math.abs(sums.sumDyXmu[ch]! - sumsRef.sumDyXmu[ch]!), `sum dy(x-mean) of channel ${ch}`).toBeLessThanOrEqual(
              1e-6 * magnitudes.sumDyXmu[ch]! + 1e-12,
            );
          }
          const a = Float64Array.from(scale, (v) => v * 0.9);
          const b = Float64Array.from(scale, (v, ch) => -v * v * v * (sumsRef.sumDyXmu[ch]! / count));
          const k = Float64Array.from(scale, (v, ch) => -v * (sumsRef.sumDy[ch]! / count));
          const gradParams = { mean: ref.mean, a, b, k };
          const gi = await kernels.gradInput(x, dy, layout, gradParams);
          expectClose(gi, referenceGradInput(x, dy, layout, gradParams), { rtol: 1e-5, atol: 1e-5 * Math.max(...a.map(Math.abs)) }, 'input gradient');
        });
      }
    }

    it('reads input at any byte offset in a larger buffer', async () => {
      const layout = { n: 3, c: 4, s: 50 };
      const x = channelData(layout.n, layout.c, layout.s, 2, 1, 5);
      const backing = new ArrayBuffer(x.byteLength + 64);
      const shifted = new Float32Array(backing, 32, x.length);
      shifted.set(x);
      const ref = referenceStats(x, layout);
      const got = await kernels.stats(shifted, layout);
      expectClose(got.mean, ref.mean, { rtol: 1e-6, atol: 1e-7 }, 'mean');
    });

    it('keeps results of earlier calls intact', async () => {
      const layout = { n: 2, c: 2, s: 64 };
      const params = { mean: Float64Array.of(0, 0), scale: Float64Array.of(1, 1), shift: Float64Array.of(0, 0) };
      const first = await kernels.normalize(channelData(2, 2, 64, 0, 1, 1), layout, params);
      const copy = first.slice();
      await kernels.normalize(channelData(2, 2, 64, 5, 1, 2), layout, params);
      expect(first).toEqual(copy);
    });

    it('runs concurrent calls of different shapes without mixing them up', async () => {
      const a = { n: 4, c: 3, s: 100 };
      const b = { n: 7, c: 2, s: 5 };
      const xa = channelData(a.n, a.c, a.s, 1, 1, 3);
      const xb = channelData(b.n, b.c, b.s, -1, 2, 4);
      const [sa, sb] = await Promise.all([kernels.stats(xa, a), kernels.stats(xb, b)]);
      expectClose(sa.mean, referenceStats(xa, a).mean, { rtol: 1e-6, atol: 1e-7 }, 'a');
      expectClose(sb.mean, referenceStats(xb, b).mean, { rtol: 1e-6, atol: 1e-7 }, 'b');
    });
  });
}
