/**
 * The native backend's WebAssembly SIMD loops, as WebAssembly text (assembled by simd.ts). Each
 * function is the twin of a loop in loops.ts and gives its bits: the same float64 operations in
 * the same order, two lanes of f64x2 at a time (no fused multiply-add, as in JavaScript).
 *
 * - `*_rows` take an (N, C, S) range: `rows` rows of `s` values, the first of channel `ch`. Sums
 *   run in four lanes (elements 4i, 4i+1, 4i+2, 4i+3 of the row, as loops.ts's a0..a3), the rest
 *   of the row into lane 0, then acc + a0 + a1 + (a2 + a3).
 * - `*_nc` take an (N, C) range of `rows` samples, four channels per vector; sums take four
 *   samples at a time (acc + ((d0 + d1) + (d2 + d3))) and the last samples one by one.
 *
 * Pointers are byte offsets into the module's memory: tensors as float32, per-channel values as
 * float64 (the sums: 2c values, Σ then Σ of the second quantity).
 */

/** f32x4 → its low and high halves as f64x2. */
const lo = (v: string) => `(f64x2.promote_low_f32x4 ${v})`;
const hi = (v: string) => `(f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 ${v} ${v}))`;
/** Two f64x2 → one f32x4, each value rounded to nearest. */
const pack = (a: string, b: string) =>
  `(i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 (f32x4.demote_f64x2_zero ${a}) (f32x4.demote_f64x2_zero ${b}))`;
const f32 = (p: string) => `(f64.promote_f32 (f32.load ${p}))`;
const lane = (v: string, i: 0 | 1) => `(f64x2.extract_lane ${i} ${v})`;
const ZERO = '(v128.const f64x2 0 0)';

/**
 * A loop over rows of `s` values: `perRow` runs before each row (channel `$ch`, row start `$p`,
 * row end `$end`), `vector` while 16 bytes remain, `scalar` for the rest, `after` at the row's end.
 * `$p` advances over the source tensor (and `$q`, `$o` over the others, by the same amount).
 */
function rows(perRow: string, vector: string, scalar: string, after: string): string {
  return `
    (local.set $r (i32.const 0))
    (block $rows_done (loop $rows
      (br_if $rows_done (i32.ge_u (local.get $r) (local.get $rows)))
      (local.set $end (i32.add (local.get $p) (i32.shl (local.get $s) (i32.const 2))))
      ${perRow}
      (block $vec_done (loop $vec
        (br_if $vec_done (i32.gt_u (i32.add (local.get $p) (i32.const 16)) (local.get $end)))
        ${vector}
        (local.set $p (i32.add (local.get $p) (i32.const 16)))
        (local.set $q (i32.add (local.get $q) (i32.const 16)))
        (local.set $o (i32.add (local.get $o) (i32.const 16)))
        (br $vec)))
      (block $tail_done (loop $tail
        (br_if $tail_done (i32.ge_u (local.get $p) (local.get $end)))
        ${scalar}
        (local.set $p (i32.add (local.get $p) (i32.const 4)))
        (local.set $q (i32.add (local.get $q) (i32.const 4)))
        (local.set $o (i32.add (local.get $o) (i32.const 4)))
        (br $tail)))
      ${after}
      (local.set $ch (i32.add (local.get $ch) (i32.const 1)))
      (if (i32.eq (local.get $ch) (local.get $c)) (then (local.set $ch (i32.const 0))))
      (local.set $r (i32.add (local.get $r) (i32.const 1)))
      (br $rows)))`;
}

const ROW_LOCALS = `(local $r i32) (local $p i32) (local $q i32) (local $o i32) (local $end i32) (local $at i32)
    (local $m f64) (local $m2 v128) (local $u f64) (local $u2 v128) (local $w f64) (local $w2 v128) (local $z f64) (local $z2 v128)
    (local $alo v128) (local $ahi v128) (local $qlo v128) (local $qhi v128) (local $v v128) (local $g v128)
    (local $dlo v128) (local $dhi v128) (local $d f64) (local $e f64) (local $a0 f64) (local $q0 f64)`;

/** Loads channel $ch's value of the per-channel array at `ptr` into $name (f64) and $name2 (splat). */
const channelValue = (name: string, ptr: string) =>
  `(local.set $${name} (f64.load (i32.add (local.get ${ptr}) (i32.shl (local.get $ch) (i32.const 3)))))
      (local.set $${name}2 (f64x2.splat (local.get $${name})))`;

/** acc[ch] = acc[ch] + a0 + a1 + (a2 + a3) for the lanes in lo/hi, with the row's tail in a0. */
const addLanes = (slot: string, a0: string, loV: string, hiV: string) =>
  `(f64.store ${slot} (f64.add (f64.add (f64.add (f64.load ${slot}) ${a0}) ${lane(loV, 1)}) (f64.add ${lane(hiV, 0)} ${lane(hiV, 1)})))`;

/** After a row: its two sums (a, q) added into the chunk's slots of its channel, a at ch, q at c + ch. */
const ADD_ROW_SUMS = `(local.set $at (i32.add (local.get $pacc) (i32.shl (local.get $ch) (i32.const 3))))
      ${addLanes('(local.get $at)', lane('(local.get $alo)', 0), '(local.get $alo)', '(local.get $ahi)')}
      (local.set $at (i32.add (local.get $at) (i32.shl (local.get $c) (i32.const 3))))
      ${addLanes('(local.get $at)', lane('(local.get $qlo)', 0), '(local.get $qlo)', '(local.get $qhi)')}`;

const statsRows = `
  (func (export "stats_rows") (param $px i32) (param $s i32) (param $rows i32) (param $ch i32) (param $c i32) (param $pk i32) (param $pacc i32)
    ${ROW_LOCALS}
    (local.set $p (local.get $px))
    ${rows(
      `${channelValue('m', '$pk')}
      (local.set $alo ${ZERO}) (local.set $ahi ${ZERO}) (local.set $qlo ${ZERO}) (local.set $qhi ${ZERO})`,
      `(local.set $v (v128.load (local.get $p)))
        (local.set $dlo (f64x2.sub ${lo('(local.get $v)')} (local.get $m2)))
        (local.set $dhi (f64x2.sub ${hi('(local.get $v)')} (local.get $m2)))
        (local.set $alo (f64x2.add (local.get $alo) (local.get $dlo)))
        (local.set $ahi (f64x2.add (local.get $ahi) (local.get $dhi)))
        (local.set $qlo (f64x2.add (local.get $qlo) (f64x2.mul (local.get $dlo) (local.get $dlo))))
        (local.set $qhi (f64x2.add (local.get $qhi) (f64x2.mul (local.get $dhi) (local.get $dhi))))`,
      `(local.set $d (f64.sub ${f32('(local.get $p)')} (local.get $m)))
        (local.set $alo (f64x2.replace_lane 0 (local.get $alo) (f64.add ${lane('(local.get $alo)', 0)} (local.get $d))))
        (local.set $qlo (f64x2.replace_lane 0 (local.get $qlo) (f64.add ${lane('(local.get $qlo)', 0)} (f64.mul (local.get $d) (local.get $d)))))`,
      ADD_ROW_SUMS,
    )})`;

const gradSumsRows = `
  (func (export "grad_sums_rows") (param $px i32) (param $pdy i32) (param $s i32) (param $rows i32) (param $ch i32) (param $c i32) (param $pm i32) (param $pacc i32)
    ${ROW_LOCALS}
    (local.set $p (local.get $px))
    (local.set $q (local.get $pdy))
    ${rows(
      `${channelValue('m', '$pm')}
      (local.set $alo ${ZERO}) (local.set $ahi ${ZERO}) (local.set $qlo ${ZERO}) (local.set $qhi ${ZERO})`,
      `(local.set $v (v128.load (local.get $p)))
        (local.set $g (v128.load (local.get $q)))
        (local.set $dlo ${lo('(local.get $g)')})
        (local.set $dhi ${hi('(local.get $g)')})
        (local.set $alo (f64x2.add (local.get $alo) (local.get $dlo)))
        (local.set $ahi (f64x2.add (local.get $ahi) (local.get $dhi)))
        (local.set $qlo (f64x2.add (local.get $qlo) (f64x2.mul (local.get $dlo) (f64x2.sub ${lo('(local.get $v)')} (local.get $m2)))))
        (local.set $qhi (f64x2.add (local.get $qhi) (f64x2.mul (local.get $dhi) (f64x2.sub ${hi('(local.get $v)')} (local.get $m2)))))`,
      `(local.set $d ${f32('(local.get $q)')})
        (local.set $alo (f64x2.replace_lane 0 (local.get $alo) (f64.add ${lane('(local.get $alo)', 0)} (local.get $d))))
        (local.set $qlo (f64x2.replace_lane 0 (local.get $qlo)
          (f64.add ${lane('(local.get $qlo)', 0)} (f64.mul (local.get $d) (f64.sub ${f32('(local.get $p)')} (local.get $m))))))`,
      ADD_ROW_SUMS,
    )})`;

const normalizeRows = `
  (func (export "normalize_rows") (param $px i32) (param $py i32) (param $s i32) (param $rows i32) (param $ch i32) (param $c i32) (param $pm i32) (param $psc i32) (param $psh i32)
    ${ROW_LOCALS}
    (local.set $p (local.get $px))
    (local.set $o (local.get $py))
    ${rows(
      `${channelValue('m', '$pm')}
      ${channelValue('u', '$psc')}
      ${channelValue('w', '$psh')}`,
      `(local.set $v (v128.load (local.get $p)))
        (v128.store (local.get $o) ${pack(
          `(f64x2.add (f64x2.mul (f64x2.sub ${lo('(local.get $v)')} (local.get $m2)) (local.get $u2)) (local.get $w2))`,
          `(f64x2.add (f64x2.mul (f64x2.sub ${hi('(local.get $v)')} (local.get $m2)) (local.get $u2)) (local.get $w2))`,
        )})`,
      `(f32.store (local.get $o) (f32.demote_f64 (f64.add (f64.mul (f64.sub ${f32('(local.get $p)')} (local.get $m)) (local.get $u)) (local.get $w))))`,
      '',
    )})`;

const gradInputRows = `
  (func (export "grad_input_rows") (param $px i32) (param $pdy i32) (param $pgi i32) (param $s i32) (param $rows i32) (param $ch i32) (param $c i32)
    (param $pm i32) (param $pa i32) (param $pb i32) (param $pk i32)
    ${ROW_LOCALS}
    (local.set $p (local.get $px))
    (local.set $q (local.get $pdy))
    (local.set $o (local.get $pgi))
    ${rows(
      `${channelValue('m', '$pm')}
      ${channelValue('u', '$pa')}
      ${channelValue('w', '$pb')}
      ${channelValue('z', '$pk')}`,
      `(local.set $v (v128.load (local.get $p)))
        (local.set $g (v128.load (local.get $q)))
        (v128.store (local.get $o) ${pack(
          `(f64x2.add (f64x2.add (f64x2.mul ${lo('(local.get $g)')} (local.get $u2)) (f64x2.mul (f64x2.sub ${lo('(local.get $v)')} (local.get $m2)) (local.get $w2))) (local.get $z2))`,
          `(f64x2.add (f64x2.add (f64x2.mul ${hi('(local.get $g)')} (local.get $u2)) (f64x2.mul (f64x2.sub ${hi('(local.get $v)')} (local.get $m2)) (local.get $w2))) (local.get $z2))`,
        )})`,
      `(f32.store (local.get $o) (f32.demote_f64 (f64.add (f64.add (f64.mul ${f32('(local.get $q)')} (local.get $u))
          (f64.mul (f64.sub ${f32('(local.get $p)')} (local.get $m)) (local.get $w))) (local.get $z))))`,
      '',
    )})`;

/*
 * (N, C) loops: `samples` sample rows of c channels, vectors of four channels and then the last
 * channels one by one. $p0..$p3 point at up to four consecutive samples' rows, $o at the output's.
 */
const NC_LOCALS = `(local $b i32) (local $ch i32) (local $row i32) (local $x i32) (local $at i32) (local $cv i32)
    (local $v0 v128) (local $v1 v128) (local $v2 v128) (local $v3 v128) (local $g0 v128) (local $g1 v128) (local $g2 v128) (local $g3 v128)
    (local $mlo v128) (local $mhi v128) (local $alo v128) (local $ahi v128) (local $blo v128) (local $bhi v128) (local $klo v128) (local $khi v128)
    (local $d0 v128) (local $d1 v128) (local $d2 v128) (local $d3 v128)
    (local $e0 v128) (local $e1 v128) (local $e2 v128) (local $e3 v128)
    (local $s0 f64) (local $s1 f64) (local $s2 f64) (local $s3 f64) (local $t0 f64) (local $t1 f64) (local $t2 f64) (local $t3 f64) (local $m f64)`;

/**
 * Loops over samples `step` at a time (4, then 1 for the rest): for each, over channels four at a
 * time (`vector`, with $x the byte offset of the channel in a row and $at in a float64 array) and
 * then one at a time (`scalar`, likewise).
 */
function samples(step4: { vector: string; scalar: string }, step1: { vector: string; scalar: string }): string {
  const channels = (body: { vector: string; scalar: string }) => `
      (local.set $ch (i32.const 0))
      (block $cv_done (loop $cvl
        (br_if $cv_done (i32.gt_u (i32.add (local.get $ch) (i32.const 4)) (local.get $c)))
        (local.set $x (i32.shl (local.get $ch) (i32.const 2)))
        (local.set $at (i32.shl (local.get $ch) (i32.const 3)))
        ${body.vector}
        (local.set $ch (i32.add (local.get $ch) (i32.const 4)))
        (br $cvl)))
      (block $cs_done (loop $csl
        (br_if $cs_done (i32.ge_u (local.get $ch) (local.get $c)))
        (local.set $x (i32.shl (local.get $ch) (i32.const 2)))
        (local.set $at (i32.shl (local.get $ch) (i32.const 3)))
        ${body.scalar}
        (local.set $ch (i32.add (local.get $ch) (i32.const 1)))
        (br $csl)))`;
  return `
    (local.set $row (i32.shl (local.get $c) (i32.const 2)))
    (local.set $b (i32.const 0))
    (block $b4_done (loop $b4
      (br_if $b4_done (i32.gt_u (i32.add (local.get $b) (i32.const 4)) (local.get $samples)))
      ${channels(step4)}
      (local.set $b (i32.add (local.get $b) (i32.const 4)))
      (br $b4)))
    (block $b1_done (loop $b1
      (br_if $b1_done (i32.ge_u (local.get $b) (local.get $samples)))
      ${channels(step1)}
      (local.set $b (i32.add (local.get $b) (i32.const 1)))
      (br $b1)))`;
}

/** Byte offset of sample $b + j's channel $ch in the tensor at `base`. */
const at = (base: string, j: number) =>
  `(i32.add (local.get ${base}) (i32.add (i32.mul (i32.add (local.get $b) (i32.const ${j})) (local.get $row)) (local.get $x)))`;
const chan = (base: string, off = 0) => `(i32.add (local.get ${base}) (i32.add (local.get $at) (i32.const ${off})))`;
/** The second half of a 2c array: channel $ch's slot plus c values. */
const chan2 = (base: string, off = 0) => `(i32.add ${chan(base, off)} (i32.shl (local.get $c) (i32.const 3)))`;
const v128add = (slot: string, value: string) => `(v128.store ${slot} (f64x2.add (v128.load ${slot}) ${value}))`;
const f64add = (slot: string, value: string) => `(f64.store ${slot} (f64.add (f64.load ${slot}) ${value}))`;
const sum4 = (op: 'f64x2' | 'f64', a: string, b: string, c: string, d: string) => `(${op}.add (${op}.add ${a} ${b}) (${op}.add ${c} ${d}))`;
const L = (name: string) => `(local.get $${name})`;

const statsNc = `
  (func (export "stats_nc") (param $px i32) (param $c i32) (param $samples i32) (param $pk i32) (param $pacc i32)
    ${NC_LOCALS}
    ${samples(
      {
        vector: `(local.set $mlo (v128.load ${chan('$pk')})) (local.set $mhi (v128.load ${chan('$pk', 16)}))
        ${[0, 1, 2, 3].map((j) => `(local.set $v${j} (v128.load ${at('$px', j)}))
        (local.set $d${j} (f64x2.sub ${lo(L(`v${j}`))} ${L('mlo')})) (local.set $e${j} (f64x2.sub ${hi(L(`v${j}`))} ${L('mhi')}))`).join('\n        ')}
        ${v128add(chan('$pacc'), sum4('f64x2', L('d0'), L('d1'), L('d2'), L('d3')))}
        ${v128add(chan('$pacc', 16), sum4('f64x2', L('e0'), L('e1'), L('e2'), L('e3')))}
        ${v128add(chan2('$pacc'), sum4('f64x2', ...([0, 1, 2, 3].map((j) => `(f64x2.mul ${L(`d${j}`)} ${L(`d${j}`)})`) as [string, string, string, string])))}
        ${v128add(chan2('$pacc', 16), sum4('f64x2', ...([0, 1, 2, 3].map((j) => `(f64x2.mul ${L(`e${j}`)} ${L(`e${j}`)})`) as [string, string, string, string])))}`,
        scalar: `(local.set $m (f64.load ${chan('$pk')}))
        ${[0, 1, 2, 3].map((j) => `(local.set $s${j} (f64.sub ${f32(at('$px', j))} ${L('m')}))`).join('\n        ')}
        ${f64add(chan('$pacc'), sum4('f64', L('s0'), L('s1'), L('s2'), L('s3')))}
        ${f64add(chan2('$pacc'), sum4('f64', ...([0, 1, 2, 3].map((j) => `(f64.mul ${L(`s${j}`)} ${L(`s${j}`)})`) as [string, string, string, string])))}`,
      },
      {
        vector: `(local.set $v0 (v128.load ${at('$px', 0)}))
        (local.set $d0 (f64x2.sub ${lo(L('v0'))} (v128.load ${chan('$pk')})))
        (local.set $e0 (f64x2.sub ${hi(L('v0'))} (v128.load ${chan('$pk', 16)})))
        ${v128add(chan('$pacc'), L('d0'))}
        ${v128add(chan('$pacc', 16), L('e0'))}
        ${v128add(chan2('$pacc'), `(f64x2.mul ${L('d0')} ${L('d0')})`)}
        ${v128add(chan2('$pacc', 16), `(f64x2.mul ${L('e0')} ${L('e0')})`)}`,
        scalar: `(local.set $s0 (f64.sub ${f32(at('$px', 0))} (f64.load ${chan('$pk')})))
        ${f64add(chan('$pacc'), L('s0'))}
        ${f64add(chan2('$pacc'), `(f64.mul ${L('s0')} ${L('s0')})`)}`,
      },
    )})`;

const gradSumsNc = `
  (func (export "grad_sums_nc") (param $px i32) (param $pdy i32) (param $c i32) (param $samples i32) (param $pm i32) (param $pacc i32)
    ${NC_LOCALS}
    ${samples(
      {
        vector: `(local.set $mlo (v128.load ${chan('$pm')})) (local.set $mhi (v128.load ${chan('$pm', 16)}))
        ${[0, 1, 2, 3].map((j) => `(local.set $v${j} (v128.load ${at('$px', j)})) (local.set $g${j} (v128.load ${at('$pdy', j)}))`).join('\n        ')}
        ${v128add(chan('$pacc'), sum4('f64x2', ...([0, 1, 2, 3].map((j) => lo(L(`g${j}`))) as [string, string, string, string])))}
        ${v128add(chan('$pacc', 16), sum4('f64x2', ...([0, 1, 2, 3].map((j) => hi(L(`g${j}`))) as [string, string, string, string])))}
        ${v128add(chan2('$pacc'), sum4('f64x2', ...([0, 1, 2, 3].map((j) => `(f64x2.mul ${lo(L(`g${j}`))} (f64x2.sub ${lo(L(`v${j}`))} ${L('mlo')}))`) as [string, string, string, string])))}
        ${v128add(chan2('$pacc', 16), sum4('f64x2', ...([0, 1, 2, 3].map((j) => `(f64x2.mul ${hi(L(`g${j}`))} (f64x2.sub ${hi(L(`v${j}`))} ${L('mhi')}))`) as [string, string, string, string])))}`,
        scalar: `(local.set $m (f64.load ${chan('$pm')}))
        ${[0, 1, 2, 3].map((j) => `(local.set $s${j} ${f32(at('$pdy', j))}) (local.set $t${j} (f64.mul ${L(`s${j}`)} (f64.sub ${f32(at('$px', j))} ${L('m')})))`).join('\n        ')}
        ${f64add(chan('$pacc'), sum4('f64', L('s0'), L('s1'), L('s2'), L('s3')))}
        ${f64add(chan2('$pacc'), sum4('f64', L('t0'), L('t1'), L('t2'), L('t3')))}`,
      },
      {
        vector: `(local.set $v0 (v128.load ${at('$px', 0)})) (local.set $g0 (v128.load ${at('$pdy', 0)}))
        ${v128add(chan('$pacc'), lo(L('g0')))}
        ${v128add(chan('$pacc', 16), hi(L('g0')))}
        ${v128add(chan2('$pacc'), `(f64x2.mul ${lo(L('g0'))} (f64x2.sub ${lo(L('v0'))} (v128.load ${chan('$pm')})))`)}
        ${v128add(chan2('$pacc', 16), `(f64x2.mul ${hi(L('g0'))} (f64x2.sub ${hi(L('v0'))} (v128.load ${chan('$pm', 16)})))`)}`,
        scalar: `(local.set $s0 ${f32(at('$pdy', 0))})
        ${f64add(chan('$pacc'), L('s0'))}
        ${f64add(chan2('$pacc'), `(f64.mul ${L('s0')} (f64.sub ${f32(at('$px', 0))} (f64.load ${chan('$pm')})))`)}`,
      },
    )})`;

/**
 * y = (x − mean) · scale + shift over (N, C): x at $px, y at $po (element-wise: any order). Each
 * vector of channels' coefficients is loaded once per four samples (the compiler reloads them
 * after every store otherwise: a store could have changed them).
 */
const normalizeNc = `
  (func (export "normalize_nc") (param $px i32) (param $po i32) (param $c i32) (param $samples i32) (param $pm i32) (param $psc i32) (param $psh i32)
    ${NC_LOCALS}
    ${(() => {
      const load = `(local.set $mlo (v128.load ${chan('$pm')})) (local.set $mhi (v128.load ${chan('$pm', 16)}))
        (local.set $alo (v128.load ${chan('$psc')})) (local.set $ahi (v128.load ${chan('$psc', 16)}))
        (local.set $blo (v128.load ${chan('$psh')})) (local.set $bhi (v128.load ${chan('$psh', 16)}))`;
      const vec = (j: number) => `(local.set $v0 (v128.load ${at('$px', j)}))
        (v128.store ${at('$po', j)} ${pack(
          `(f64x2.add (f64x2.mul (f64x2.sub ${lo(L('v0'))} ${L('mlo')}) ${L('alo')}) ${L('blo')})`,
          `(f64x2.add (f64x2.mul (f64x2.sub ${hi(L('v0'))} ${L('mhi')}) ${L('ahi')}) ${L('bhi')})`,
        )})`;
      const sca = (j: number) =>
        `(f32.store ${at('$po', j)} (f32.demote_f64 (f64.add (f64.mul (f64.sub ${f32(at('$px', j))} (f64.load ${chan('$pm')})) (f64.load ${chan('$psc')})) (f64.load ${chan('$psh')}))))`;
      return samples({ vector: load + [0, 1, 2, 3].map(vec).join('\n        '), scalar: [0, 1, 2, 3].map(sca).join('\n        ') }, { vector: load + vec(0), scalar: sca(0) });
    })()})`;

/** grad_input over (N, C): x at $px, dy at $pdy, the answer at $po (coefficients loaded as in normalize_nc). */
const gradInputNc = `
  (func (export "grad_input_nc") (param $px i32) (param $pdy i32) (param $po i32) (param $c i32) (param $samples i32) (param $pm i32) (param $pa i32) (param $pb i32) (param $pk i32)
    ${NC_LOCALS}
    ${(() => {
      const load = `(local.set $mlo (v128.load ${chan('$pm')})) (local.set $mhi (v128.load ${chan('$pm', 16)}))
        (local.set $alo (v128.load ${chan('$pa')})) (local.set $ahi (v128.load ${chan('$pa', 16)}))
        (local.set $blo (v128.load ${chan('$pb')})) (local.set $bhi (v128.load ${chan('$pb', 16)}))
        (local.set $klo (v128.load ${chan('$pk')})) (local.set $khi (v128.load ${chan('$pk', 16)}))`;
      const vec = (j: number) => `(local.set $v0 (v128.load ${at('$px', j)})) (local.set $g0 (v128.load ${at('$pdy', j)}))
        (v128.store ${at('$po', j)} ${pack(
          `(f64x2.add (f64x2.add (f64x2.mul ${lo(L('g0'))} ${L('alo')}) (f64x2.mul (f64x2.sub ${lo(L('v0'))} ${L('mlo')}) ${L('blo')})) ${L('klo')})`,
          `(f64x2.add (f64x2.add (f64x2.mul ${hi(L('g0'))} ${L('ahi')}) (f64x2.mul (f64x2.sub ${hi(L('v0'))} ${L('mhi')}) ${L('bhi')})) ${L('khi')})`,
        )})`;
      const sca = (j: number) => `(f32.store ${at('$po', j)} (f32.demote_f64 (f64.add (f64.add (f64.mul ${f32(at('$pdy', j))} (f64.load ${chan('$pa')}))
          (f64.mul (f64.sub ${f32(at('$px', j))} (f64.load ${chan('$pm')})) (f64.load ${chan('$pb')}))) (f64.load ${chan('$pk')}))))`;
      return samples({ vector: load + [0, 1, 2, 3].map(vec).join('\n        '), scalar: [0, 1, 2, 3].map(sca).join('\n        ') }, { vector: load + vec(0), scalar: sca(0) });
    })()})`;

/**
 * addRows (loops.ts) over `rows` rows of `width` float64 values at $p, into $out: row 0, then
 * each later row added in row order, two values at a time. `width` is even (2c).
 */
const addRowsF64 = `
  (func (export "add_rows") (param $p i32) (param $width i32) (param $rows i32) (param $out i32)
    (local $r i32) (local $src i32) (local $dst i32) (local $end i32)
    (local.set $end (i32.add (local.get $out) (i32.shl (local.get $width) (i32.const 3))))
    (local.set $src (local.get $p))
    (local.set $dst (local.get $out))
    (block $first_done (loop $first
      (br_if $first_done (i32.ge_u (local.get $dst) (local.get $end)))
      (v128.store (local.get $dst) (v128.load (local.get $src)))
      (local.set $src (i32.add (local.get $src) (i32.const 16)))
      (local.set $dst (i32.add (local.get $dst) (i32.const 16)))
      (br $first)))
    (local.set $r (i32.const 1))
    (block $rows_done (loop $rows
      (br_if $rows_done (i32.ge_u (local.get $r) (local.get $rows)))
      (local.set $dst (local.get $out))
      (block $row_done (loop $row
        (br_if $row_done (i32.ge_u (local.get $dst) (local.get $end)))
        (v128.store (local.get $dst) (f64x2.add (v128.load (local.get $dst)) (v128.load (local.get $src))))
        (local.set $src (i32.add (local.get $src) (i32.const 16)))
        (local.set $dst (i32.add (local.get $dst) (i32.const 16)))
        (br $row)))
      (local.set $r (i32.add (local.get $r) (i32.const 1)))
      (br $rows)))
  )`;

export const SIMD_WAT = `(module
  (memory (export "memory") 1)
  ${statsRows}
  ${gradSumsRows}
  ${normalizeRows}
  ${gradInputRows}
  ${statsNc}
  ${gradSumsNc}
  ${normalizeNc}
  ${gradInputNc}
  ${addRowsF64}
)`;
