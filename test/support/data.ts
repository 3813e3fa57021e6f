/** Deterministic test data. */

/** A seeded standard normal generator (xorshift32 + Box–Muller). */
export function normal(seed: number): () => number {
  let s = seed >>> 0 || 1;
  const uniform = () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return (s + 1) / 4294967297;
  };
  return () => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
}

/** An (N, C, S) tensor whose channel c is offset + spread * (1 + c / C) * N(0, 1). */
export function channelData(n: number, c: number, s: number, offset: number, spread: number, seed = 1): Float32Array {
  const rand = normal(seed);
  const x = new Float32Array(n * c * s);
  for (let b = 0; b < n; b++)
    for (let ch = 0; ch < c; ch++)
      for (let i = 0; i < s; i++) x[(b * c + ch) * s + i] = offset + ch * 0.25 + spread * (1 + ch / c) * rand();
  return x;
}
