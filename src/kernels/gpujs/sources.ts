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
 * Code that adds `v` to `sum` and the rounding error of that addition to `err`: Fast2Sum on the
 * larger and the smaller of the two, which is exact (Neumaier's form of compensated summation).
 * Every result is multiplied by `one` before it is added further: a shader compiler that
 * reassociates additions (Mesa's Vulkan driver, lavapipe, does inside loops) would otherwise add
 * `err` to one half of the cancelling pair first and lose it; it cannot move an addition across a
 * multiplication by a value it does not know.
 */
const addCompensated = (sum: string, err: string, v: string) => `
    {
      const addV = ${v};
      const addT = (${sum} + addV) * one;
      let addBig = ${sum};
      let addSmall = addV;
      if (Math.abs(${sum}) < Math.abs(addV)) {
        addBig = addV;
        addSmall = ${sum};
      }
      ${err} = ${err} + ((addBig - addT) * one + addSmall) * one;
      ${sum} = addT;
    }`;

/**
 * A compensated float32 sum over the `parts` partial results of channel `ch` in the first
 * (offset 0) or second (offset c * parts) half of p, into `name`, with `second` a further summand
 * per part. The partial results have either sign (sums of deviations cancel), so each addition is
 * exact (see addCompensated; Kahan's update would lose the error whenever a term is larger than
 * the running sum). Afterwards `name` is the sum rounded to float32 and `<name>Err` what that
 * rounding left out.
 */
const combineParts = (name: string, parts: number, offset: string, second = '') => `
  let ${name} = 0;
  let ${name}Err = 0;
  for (let q = 0; q < ${parts}; q++) {
    ${addCompensated(name, `${name}Err`, `p[${offset} + ch * ${parts} + q]`)}
    ${second ? addCompensated(name, `${name}Err`, second) : ''}
  }
  let ${name}Rest = 0;
  ${addCompensated(name, `${name}Rest`, `${name}Err`)}
  ${name}Err = ${name}Rest;`;

/**
 * Per channel, from the first pass's compensated block sums of x - hi: their total / count (the
 * mean's offset from hi) as a float32 quotient t in the first c cells and the quotient's remainder
 * / count in the second, so that hi + t + remainder is the mean to about 2^-33 of t. t alone is
 * the centre of the second pass. The remainder total − t·count is formed from exact products: t
 * cut into a head of at most 12 significant bits (by floor, which no compiler can fold away as it
 * can Veltkamp's split) and a tail of at most 14, count given as three pieces of at most 10 bits
 * (count1 + count2 + count3). Each step is multiplied by `one` so that no compiler reorders them.
 */
export const centerSource = (parts: number) => `function (p, c, count, count1, count2, count3, one) {
  let ch = this.thread.x;
  let row = 0;
  if (ch >= c) { ch = ch - c; row = 1; }
  ${combineParts('total', parts, '0', `0 - p[c * ${parts} + ch * ${parts} + q]`)}
  const t = total / count;
  if (row == 0) { return t; }
  if (t == 0) { return (total + totalErr) / count; }
  const quantum = Math.pow(2, Math.floor(Math.log2(Math.abs(t))) - 10);
  const tHi = Math.floor(t / quantum) * quantum;
  const tLo = (t - tHi) * one;
  let r = (total - tHi * count1) * one;
  r = (r - tHi * count2) * one;
  r = (r - tLo * count1) * one;
  r = (r - tHi * count3) * one;
  r = (r - tLo * count2) * one;
  r = (r - tLo * count3) * one;
  r = (r + totalErr) * one;
  return r / count;
}`;

/**
 * Per channel, from the second pass's sums of squares about hi + t: three rows of c values, the
 * mean as a float32 head and tail (the head, then the tail, so that (x - head) - tail is what the
 * separate normalize kernel computes), then scale = weight / sqrt(m2 / count + eps), or 0 where m2
 * and eps are both 0. The head and tail are a two-sum of hi and t, plus the remainder of t; m2 is
 * the sum of squares less count · remainder² (the centre's distance from the mean).
 */
export const forwardCoeffsSource = (parts: number) => `function (p, hi, t, weight, c, count, eps, one) {
  let ch = this.thread.x;
  let row = 0;
  if (ch >= c) { ch = ch - c; row = 1; }
  if (ch >= c) { ch = ch - c; row = 2; }
  const rest = t[c + ch];
  if (row < 2) {
    let head = hi[ch];
    let err = 0;
    ${addCompensated('head', 'err', 't[ch]')}
    if (row == 0) { return head; }
    return err + rest;
  }
  ${combineParts('sq', parts, '0')}
  let m2 = sq - (rest * count) * rest;
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
