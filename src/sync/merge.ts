/**
 * Pools per-rank statistics in float64 with counts (Chan et al.'s parallel algorithm), so that the
 * result is BatchNorm's statistics over the concatenated batch. Ranks with no values take part in
 * the step and are left out of the merge.
 */

/** One rank's statistics: per channel, the mean and the sum of squared deviations from it. */
export interface RankStats {
  readonly count: number;
  readonly mean: Float64Array;
  readonly m2: Float64Array;
}

export function mergeStats(ranks: readonly RankStats[], channels: number): RankStats {
  let count = 0;
  const mean = new Float64Array(channels);
  const m2 = new Float64Array(channels);
  for (const r of ranks) {
    if (r.count === 0) continue;
    const total = count + r.count;
    for (let ch = 0; ch < channels; ch++) {
      const delta = r.mean[ch]! - mean[ch]!;
      mean[ch] = mean[ch]! + (delta * r.count) / total;
      m2[ch] = m2[ch]! + r.m2[ch]! + (delta * delta * count * r.count) / total;
    }
    count = total;
  }
  return { count, mean, m2 };
}

/** Per channel sums over ranks, in float64 and rank order. */
export function sumVectors(vectors: readonly Float64Array[], channels: number): Float64Array {
  const out = new Float64Array(channels);
  for (const v of vectors) for (let ch = 0; ch < channels; ch++) out[ch] = out[ch]! + v[ch]!;
  return out;
}
