/** Numeric comparisons for tests: tolerances from batchnorm-semantics.md §8, NaN-aware. */
import { expect } from 'vitest';

export const TOL = {
  output: { rtol: 1e-5, atol: 1e-5 },
  gradient: { rtol: 1e-4, atol: 1e-5 },
  stats: { rtol: 1e-5, atol: 1e-6 },
} as const;

export interface Tolerance {
  readonly rtol: number;
  readonly atol: number;
}

/** Index and values of the first element outside |a - b| <= atol + rtol * |b|, or null. */
export function firstMismatch(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: Tolerance): string | null {
  if (actual.length !== expected.length) return `length ${actual.length} != ${expected.length}`;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!;
    const e = expected[i]!;
    if (Number.isNaN(e) || Number.isNaN(a)) {
      if (Number.isNaN(e) !== Number.isNaN(a)) return `[${i}] ${a} vs ${e}`;
      continue;
    }
    if (!Number.isFinite(e) || !Number.isFinite(a)) {
      if (a !== e) return `[${i}] ${a} vs ${e}`;
      continue;
    }
    if (Math.abs(a - e) > tol.atol + tol.rtol * Math.abs(e)) return `[${i}] ${a} vs ${e} (diff ${Math.abs(a - e)})`;
  }
  return null;
}

export function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: Tolerance, what: string): void {
  const mismatch = firstMismatch(actual, expected, tol);
  expect(mismatch, `${what}: ${mismatch}`).toBeNull();
}

/** The largest |a - b| over finite elements. */
export function maxAbsError(actual: ArrayLike<number>, exact: ArrayLike<number>): number {
  let worst = 0;
  for (let i = 0; i < exact.length; i++) {
    const d = Math.abs(actual[i]! - exact[i]!);
    if (d > worst) worst = d;
  }
  return worst;
}

export function maxAbs(values: ArrayLike<number>): number {
  let worst = 0;
  for (let i = 0; i < values.length; i++) worst = Math.max(worst, Math.abs(values[i]!));
  return worst;
}

/**
 * "At least as close to the exact result as PyTorch's float32 CPU kernels": our largest error is
 * no larger than PyTorch's, or within two float32 ulps of the largest exact value (the floor any
 * float32 result has).
 */
export function expectAtLeastAsAccurate(ours: ArrayLike<number>, torch: ArrayLike<number>, exact: ArrayLike<number>, what: string): void {
  const oursErr = maxAbsError(ours, exact);
  const torchErr = maxAbsError(torch, exact);
  const floor = 2 ** -22 * maxAbs(exact);
  expect(oursErr, `${what}: our max error ${oursErr} vs PyTorch's ${torchErr} (float32 floor ${floor})`).toBeLessThanOrEqual(
    Math.max(torchErr, floor),
  );
}
