/**
 * gpu.js kernel sources. They are strings, not functions, so that no TypeScript or test
 * transpiler can rewrite the code gpu.js parses.
 *
 * Accuracy: float32 arithmetic over at most BLOCK elements per thread, compensated (Kahan), then
 * the partial results are added in float64 on the host. The first pass sums each channel shifted
 * by its first element (rounded to 8 bits), so that a large common offset cancels exactly, and
 * returns each block's
 * sum with its compensation, so the mean is as good as a float64 sum. The second pass sums squared
 * deviations from that mean, split into a float32 head and tail ((x - hi) - lo) so that a large
 * common offset cancels exactly. Shader compilers may reassociate float arithmetic (Mesa's does),
 * which would fold the compensation away; multiplying the running sum by `one`, an argument that
 * is 1 at run time but unknown at compile time, keeps it.
 */

/** Elements summed by one thread: the loop bound every kernel is compiled with. */
export const BLOCK = 256;

/**
 * Index arithmetic is done in floats on the GL backends; `floor(a / b)` is corrected by one step
 * either way so that it is exact for every index below 2^24.
 */
const divmod = (q: string, r: string, a: string, d: string) => `
  let ${q} = Math.floor(${a} / ${d});
  let ${r} = ${a} - ${q} * ${d};
  if (${r} < 0) { ${q} = ${q} - 1; ${r} = ${r} + ${d}; }
  if (${r} >= ${d}) { ${q} = ${q} + 1; ${r} = ${r} - ${d}; }`;

/**
 * Kahan-compensated sums over blocks of a channel. Output cell t = ch * parts + p covers elements
 * [p * block, p * block + block) of channel ch, where the channel's elements are numbered
 * j = b * s + i across the batch; cells from c * parts on cover the same blocks again with
 * `second` set. `term` is the code that sets the summand from v = (x - hi) - lo; `result` the
 * code that returns from sum and comp.
 */
const blockSums = (args: string, term: string, result: string) => `function (${args}) {
  let t = this.thread.x;
  let second = 0;
  if (t >= c * parts) {
    t = t - c * parts;
    second = 1;
  }
  ${divmod('ch', 'p', 't', 'parts')}
  const j0 = p * block;
  let len = count - j0;
  if (len > block) { len = block; }
  ${divmod('b', 'i', 'j0', 's')}
  let base = (b * c + ch) * s;
  const h = hi[ch];
  const l = lo[ch];
  let sum = 0;
  let comp = 0;
  for (let k = 0; k < ${BLOCK}; k++) {
    if (k >= len) { break; }
    const v = (x[base + i] - h) - l;
    ${term}
    const yv = term - comp;
    const tv = (sum + yv) * one;
    comp = (tv - sum) - yv;
    sum = tv;
    i = i + 1;
    if (i >= s) {
      i = 0;
      b = b + 1;
      base = (b * c + ch) * s;
    }
  }
  ${result}
}`;

/**
 * Sums of v, or of v * v when order is 2. With 2 * c * parts cells, the second half holds each
 * block's compensation, so that sum - compensation, added in float64, keeps the bits a float32
 * result would drop.
 */
export const PARTIAL_SUMS = blockSums(
  'x, c, s, count, parts, block, hi, lo, order, one',
  'let term = v; if (order == 2) { term = v * v; }',
  'if (second == 1) { return comp; } return sum;',
);

/** Backward's sums: Σ dy in the first c * parts cells, Σ dy * v in the second. */
export const GRAD_SUMS = blockSums(
  'x, dy, c, s, count, parts, block, hi, lo, one',
  'const g = dy[base + i]; let term = g; if (second == 1) { term = g * v; }',
  'return sum;',
);

/**
 * An elementwise kernel over a flat output (for small planes) and over an (N * C, S) output with
 * one row per (sample, channel) plane (for large planes). `expression` computes element `idx` of
 * channel `ch`.
 */
const elementwise = (args: string, expression: string) => ({
  flat: `function (${args}) {
  const idx = this.thread.x;
  ${divmod('plane', 'i', 'idx', 's')}
  ${divmod('b', 'ch', 'plane', 'c')}
  return ${expression};
}`,
  planes: `function (${args}) {
  const plane = this.thread.y;
  ${divmod('b', 'ch', 'plane', 'c')}
  const idx = plane * s + this.thread.x;
  return ${expression};
}`,
});

/** y = ((x - hi) - lo) * scale + shift. */
export const NORMALIZE = elementwise('x, c, s, hi, lo, scale, shift', '((x[idx] - hi[ch]) - lo[ch]) * scale[ch] + shift[ch]');

/** grad_input = dy * a + ((x - hi) - lo) * b + k. */
export const GRAD_INPUT = elementwise('x, dy, c, s, hi, lo, a, bb, k', 'dy[idx] * a[ch] + ((x[idx] - hi[ch]) - lo[ch]) * bb[ch] + k[ch]');

/** Planes at least this long use the planes form. */
export const PLANE_KERNEL_MIN_S = 32;

/*
 * Fused passes (gpu.js pipelines, see fused.ts): the same block sums, plus small per-channel
 * kernels that combine the blocks' partial results inside the pipeline, so that no intermediate
 * has to come back to the host before the elementwise pass. Each is compiled per shape class:
 * `parts` (blocks per channel) is a constant of the source.
 */

/**
 * A compensated float32 sum over the `parts` partial results of channel `ch` in the first
 * (offset 0) or second (offset cells) half of p, into `name`; `term` may rewrite the summand `pv`.
 */
const combineParts = (name: string, parts: number, offset: string, term = 'pv') => `
  let ${name} = 0;
  let ${name}Comp = 0;
  for (let q = 0; q < ${parts}; q++) {
    const pv = p[${offset} + ch * ${parts} + q];
    const ${name}Y = ${term} - ${name}Comp;
    const ${name}T = (${name} + ${name}Y) * one;
    ${name}Comp = (${name}T - ${name}) - ${name}Y;
    ${name} = ${name}T;
  }
  ${name} = ${name} - ${name}Comp;`;

/** Sums of v * v in the first c * parts cells, of v in the second: one pass gives both. */
export const SQUARES_AND_DEVIATIONS = blockSums(
  'x, c, s, count, parts, block, hi, lo, one',
  'let term = v; if (second == 0) { term = v * v; }',
  'return sum;',
);

/**
 * Per channel, from the first pass's compensated block sums of x - hi: t = their total / count,
 * the mean's offset from hi to float32 precision (the centre of the second pass).
 */
export const centerSource = (parts: number) => `function (p, c, count, one) {
  const ch = this.thread.x;
  ${combineParts('total', parts, '0', `pv - p[c * ${parts} + ch * ${parts} + q]`)}
  return total / count;
}`;

/**
 * Per channel, from the second pass's sums about hi + t: three rows of c values, the mean as a
 * float32 head and tail (the head, then the tail, so that (x - head) - tail is what the separate
 * normalize kernel computes), then scale = weight / sqrt(m2 / count + eps), or 0 where m2 and eps
 * are both 0. The head and tail come from a two-sum of hi and t plus the second pass's own mean
 * offset; `one` keeps a shader compiler from folding the two-sum away.
 */
export const forwardCoeffsSource = (parts: number) => `function (p, hi, t, weight, c, count, eps, one) {
  let ch = this.thread.x;
  let row = 0;
  if (ch >= c) { ch = ch - c; row = 1; }
  if (ch >= c) { ch = ch - c; row = 2; }
  ${combineParts('sq', parts, '0')}
  ${combineParts('lin', parts, `c * ${parts}`)}
  const drift = lin / count;
  if (row < 2) {
    const a = hi[ch];
    const b = t[ch];
    const head = (a + b) * one;
    const bv = (head - a) * one;
    const av = (head - bv) * one;
    const err = (a - av) + (b - bv);
    if (row == 0) { return head; }
    return err + drift;
  }
  let m2 = sq - lin * drift;
  if (m2 < 0) { m2 = 0; }
  const variance = m2 / count;
  let invstd = 0;
  if (variance > 0 || eps > 0) { invstd = 1 / Math.sqrt(variance + eps); }
  return invstd * weight[ch];
}`;

/** y = ((x - head) - tail) * scale + bias, with head, tail and scale the rows of k. */
export const FUSED_NORMALIZE = elementwise('x, c, s, k, bias', '((x[idx] - k[ch]) - k[c + ch]) * k[c + c + ch] + bias[ch]');

/**
 * Per channel, from backward's block sums (Σ dy, then Σ dy·(x − mean)): two rows of c values,
 * b = −a·invstd²·S2/count and k = −a·S1/count with batch statistics, zeros without.
 */
export const gradCoeffsSource = (parts: number) => `function (p, a, invstd, c, count, batch, one) {
  let ch = this.thread.x;
  let row = 0;
  if (ch >= c) { ch = ch - c; row = 1; }
  if (batch == 0) { return 0; }
  const av = a[ch];
  if (row == 0) {
    ${combineParts('s2', parts, `c * ${parts}`)}
    const iv = invstd[ch];
    const b = (av * iv) * (iv * (s2 / count));
    return 0 - b;
  }
  ${combineParts('s1', parts, '0')}
  return 0 - av * (s1 / count);
}`;

/** grad_input = dy * a + ((x - hi) - lo) * b + k, with b and k the rows of kk. */
export const FUSED_GRAD_INPUT = elementwise('x, dy, c, s, hi, lo, a, kk', 'dy[idx] * a[ch] + ((x[idx] - hi[ch]) - lo[ch]) * kk[ch] + kk[c + ch]');
