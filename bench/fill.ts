/** Deterministic benchmark inputs shared by the benchmark programs. */

/** Fills `target` with centre + spread · U(−1, 1) from a linear congruential generator. */
export function fill(target: Float32Array, seed: number, centre: number, spread: number): Float32Array {
  let s = seed >>> 0;
  for (let i = 0; i < target.length; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    target[i] = centre + spread * ((s / 4294967296) * 2 - 1);
  }
  return target;
}
