/**
 * One BatchNorm module as a state machine with PyTorch 1.13's rules (docs/semantics.md, from
 * batchnorm-semantics.md §2–§5, §9). Pure: it holds typed arrays and asks a `Kernels` backend for
 * statistics and normalisation; it never sees the wire.
 *
 * Every operation validates before it changes anything, except where PyTorch itself changes
 * state before raising: a forward bumps num_batches_tracked before the one-value-per-channel,
 * empty-input and channel checks (§3), so a failed forward can leave the counter one higher.
 */
import { bnError } from '../errors.js';
import { layoutOf, type GradSums, type Kernels, type Layout } from '../kernels/kernels.js';
import { CLASS_NAMES, checkEps, checkGroup, checkMomentum, moduleRepr, type ModuleConfig, type SyncRule } from './config.js';
import { loadStateDict, type LoadInput, type LoadResult, type StateDict } from './state-dict.js';

export const BUFFER_NAMES = ['running_mean', 'running_var', 'num_batches_tracked'] as const;
export type BufferName = (typeof BUFFER_NAMES)[number];

/** A read-only copy of what a module holds; `null` is Python's None. */
export interface ModuleSnapshot {
  readonly config: ModuleConfig;
  readonly training: boolean;
  readonly trackRunningStats: boolean;
  readonly eps: number;
  readonly momentum: number | null;
  readonly weight: Float32Array | null;
  readonly bias: Float32Array | null;
  readonly runningMean: Float32Array | null;
  readonly runningVar: Float32Array | null;
  readonly numBatchesTracked: bigint | null;
}

export interface ModuleUpdate {
  training?: boolean | undefined;
  trackRunningStats?: boolean | undefined;
  /** A number assigns momentum; null assigns momentum = None. */
  momentum?: number | null | undefined;
  eps?: number | undefined;
  clearBuffers?: readonly BufferName[] | undefined;
}

/**
 * What backward needs from a forward, as autograd would save it: the input, the statistics that
 * normalised it (batch or running) and the weight.
 */
export interface SavedForward {
  readonly shape: readonly number[];
  readonly x: Float32Array;
  readonly mean: Float64Array;
  readonly invstd: Float64Array;
  /** null when the module is not affine: then there are no parameter gradients. */
  readonly weight: Float32Array | null;
  /** The number of values per channel the statistics came from (n for batch statistics). */
  readonly count: number;
  /** Whether the statistics were the batch's own (their gradient flows back into the input). */
  readonly batchStats: boolean;
}

export interface ForwardResult {
  readonly output: Float32Array;
  /** The statistics that normalised the input (batch or running), over `count` values per channel. */
  readonly stats: { readonly count: number; readonly mean: Float64Array; readonly invstd: Float64Array };
  /** Present when the forward was asked to save for backward. */
  readonly saved: SavedForward | null;
}

/** §4 steps 2–4 for the module's current state (see BatchNorm.plan). */
export interface ForwardPlan {
  /** The mode the call runs in: the module's own, or eval for evalForward. */
  readonly training: boolean;
  /** num_batches_tracked once this call commits. */
  readonly nbtAfter: bigint | null;
  /** The running-statistics update factor (momentum, or 1/nbt for momentum=None). */
  readonly factor: number;
  /** Whether batch statistics normalise the input. */
  readonly bnTraining: boolean;
  /** The buffers passed to the kernel (updated with batch statistics), or null. */
  readonly runningMean: Float32Array | null;
  readonly runningVar: Float32Array | null;
}

export interface Gradients {
  readonly gradInput: Float32Array;
  readonly gradWeight: Float32Array | null;
  readonly gradBias: Float32Array | null;
}

/** PyTorch's repr of a shape, as it appears in error texts: `torch.Size([1, 3])`. */
export function torchSize(shape: readonly number[]): string {
  return `torch.Size([${shape.join(', ')}])`;
}

const RANKS: Readonly<Record<ModuleConfig['kind'], { ok: (rank: number) => boolean; expected: string }>> = {
  BATCH_NORM_1D: { ok: (r) => r === 2 || r === 3, expected: '2D or 3D' },
  BATCH_NORM_2D: { ok: (r) => r === 4, expected: '4D' },
  BATCH_NORM_3D: { ok: (r) => r === 5, expected: '5D' },
  SYNC_BATCH_NORM: { ok: (r) => r >= 2, expected: 'at least 2D' },
};

export class BatchNorm {
  #config: ModuleConfig;
  #training = true;
  #track: boolean;
  #eps: number;
  #momentum: number | null;
  #weight: Float32Array | null;
  #bias: Float32Array | null;
  #runningMean: Float32Array | null;
  #runningVar: Float32Array | null;
  #nbt: bigint | null;
  /** Counts state changes, so that a caller can tell whether an operation changed anything. */
  #generation = 0;

  constructor(config: ModuleConfig) {
    const c = config.numFeatures;
    this.#config = config;
    this.#track = config.trackRunningStats;
    this.#eps = config.eps;
    this.#momentum = config.momentum;
    this.#weight = config.affine ? new Float32Array(c).fill(1) : null;
    this.#bias = config.affine ? new Float32Array(c) : null;
    this.#runningMean = config.trackRunningStats ? new Float32Array(c) : null;
    this.#runningVar = config.trackRunningStats ? new Float32Array(c).fill(1) : null;
    this.#nbt = config.trackRunningStats ? 0n : null;
  }

  get config(): ModuleConfig {
    return this.#config;
  }

  /** Increases with every change of state (parameters, buffers, counter, flags, config). */
  get generation(): number {
    return this.#generation;
  }

  /** A module with exactly the state of `s` (a restore from disk, or undoing a change). */
  static fromSnapshot(s: ModuleSnapshot): BatchNorm {
    const m = new BatchNorm(s.config);
    m.restore(s);
    return m;
  }

  /** Puts the module back into the state of `s`, bit for bit. */
  restore(s: ModuleSnapshot): void {
    const copy = (a: Float32Array | null) => (a === null ? null : a.slice());
    this.#config = s.config;
    this.#training = s.training;
    this.#track = s.trackRunningStats;
    this.#eps = s.eps;
    this.#momentum = s.momentum;
    this.#weight = copy(s.weight);
    this.#bias = copy(s.bias);
    this.#runningMean = copy(s.runningMean);
    this.#runningVar = copy(s.runningVar);
    this.#nbt = s.numBatchesTracked;
    this.#generation++;
  }

  get training(): boolean {
    return this.#training;
  }

  /**
   * convert_sync_batchnorm for this module: it becomes a SyncBatchNorm of a group of `worldSize`
   * ranks and keeps everything else, the training flag included (PyTorch 1.13 dropped it).
   */
  convertToSync(worldSize: number, syncRule: SyncRule): void {
    checkGroup('SYNC_BATCH_NORM', worldSize, (detail) => bnError('BN_ERR_INVALID_UPDATE', { detail }));
    this.#config = { ...this.#config, kind: 'SYNC_BATCH_NORM', worldSize, syncRule };
    this.#generation++;
  }

  /**
   * Whether a call in the current mode pools statistics across the group: when batch statistics
   * are used (PR #44445), or only when training as well (PyTorch 1.9's rule). A group of one
   * pools with itself, which is plain BatchNorm.
   */
  needsSync(plan: ForwardPlan): boolean {
    return this.#config.kind === 'SYNC_BATCH_NORM' && plan.bnTraining && (this.#config.syncRule === 'SYNC_WHEN_BATCH_STATS' || plan.training);
  }

  get className(): string {
    return CLASS_NAMES[this.config.kind];
  }

  get repr(): string {
    return moduleRepr(this.config.kind, this.config.numFeatures, this.#eps, this.#momentum, this.config.affine, this.#track);
  }

  snapshot(): ModuleSnapshot {
    const copy = (a: Float32Array | null) => (a === null ? null : a.slice());
    return {
      config: this.config,
      training: this.#training,
      trackRunningStats: this.#track,
      eps: this.#eps,
      momentum: this.#momentum,
      weight: copy(this.#weight),
      bias: copy(this.#bias),
      runningMean: copy(this.#runningMean),
      runningVar: copy(this.#runningVar),
      numBatchesTracked: this.#nbt,
    };
  }

  /** train()/eval(), attribute assignments, then `module.<buffer> = None`, all or nothing. */
  update(u: ModuleUpdate): void {
    const invalid = (detail: string) => bnError('BN_ERR_INVALID_UPDATE', { detail });
    if (u.eps !== undefined) checkEps(u.eps, invalid);
    if (typeof u.momentum === 'number') checkMomentum(u.momentum, invalid);
    if (u.training !== undefined) this.#training = u.training;
    if (u.trackRunningStats !== undefined) this.#track = u.trackRunningStats;
    if (u.eps !== undefined) this.#eps = u.eps;
    if (u.momentum !== undefined) this.#momentum = u.momentum;
    for (const name of u.clearBuffers ?? []) {
      if (name === 'running_mean') this.#runningMean = null;
      else if (name === 'running_var') this.#runningVar = null;
      else this.#nbt = null;
    }
    this.#generation++;
  }

  /**
   * reset_running_stats(): only while track_running_stats is true. PyTorch raises AttributeError
   * part-way when a buffer is None; this checks first and changes nothing in that case.
   */
  resetRunningStats(operation = 'reset_running_stats'): void {
    if (!this.#track) return;
    const missing: [BufferName, string][] = [];
    if (this.#runningMean === null) missing.push(['running_mean', 'zero_']);
    if (this.#runningVar === null) missing.push(['running_var', 'fill_']);
    if (this.#nbt === null) missing.push(['num_batches_tracked', 'zero_']);
    const first = missing[0];
    if (first) throw bnError('BN_ERR_BUFFER_IS_NONE', { operation, buffer: first[0], method: first[1] });
    this.#runningMean!.fill(0);
    this.#runningVar!.fill(1);
    this.#nbt = 0n;
    this.#generation++;
  }

  /** reset_parameters(): reset_running_stats(), then weight = 1 and bias = 0. */
  resetParameters(): void {
    this.resetRunningStats('reset_parameters');
    if (this.config.affine) {
      this.#weight?.fill(1);
      this.#bias?.fill(0);
      this.#generation++;
    }
  }

  /** state_dict(): the present (not None) parameters and buffers, in PyTorch's key order. */
  stateDict(): StateDict {
    const s = this.snapshot();
    const dict: StateDict = {};
    if (s.weight) dict.weight = s.weight;
    if (s.bias) dict.bias = s.bias;
    if (s.runningMean) dict.running_mean = s.runningMean;
    if (s.runningVar) dict.running_var = s.runningVar;
    if (s.numBatchesTracked !== null) dict.num_batches_tracked = s.numBatchesTracked;
    return dict;
  }

  /** load_state_dict(state, strict) with the version-2 rule; nothing changes when it fails. */
  loadStateDict(state: LoadInput, version: number | null, strict: boolean): LoadResult {
    const result = loadStateDict(
      {
        className: this.className,
        trackRunningStats: this.#track,
        local: {
          weight: this.#weight,
          bias: this.#bias,
          running_mean: this.#runningMean,
          running_var: this.#runningVar,
          num_batches_tracked: this.#nbt,
        },
      },
      state,
      version,
      strict,
    );
    const v = result.values;
    if (v.weight) this.#weight!.set(v.weight);
    if (v.bias) this.#bias!.set(v.bias);
    if (v.running_mean) this.#runningMean!.set(v.running_mean);
    if (v.running_var) this.#runningVar!.set(v.running_var);
    if (v.num_batches_tracked !== undefined) this.#nbt = v.num_batches_tracked;
    this.#generation++;
    return result;
  }

  /**
   * The decisions of §4 steps 2–4 for the module as it is now, in its own mode or in `training`'s:
   * the counter after a training call, the update factor, whether batch statistics are used, and
   * which buffers are passed.
   */
  plan(training = this.#training): ForwardPlan {
    let factor = this.#momentum ?? 0;
    let nbt = this.#nbt;
    if (training && this.#track && nbt !== null) {
      nbt += 1n;
      factor = this.#momentum ?? 1 / Number(nbt);
    }
    const passBuffers = !training || this.#track;
    return {
      training,
      nbtAfter: nbt,
      factor,
      bnTraining: training || (this.#runningMean === null && this.#runningVar === null),
      runningMean: passBuffers ? this.#runningMean : null,
      runningVar: passBuffers ? this.#runningVar : null,
    };
  }

  /** §2.4: the input's rank, and SyncBatchNorm's zero-channel check. Nothing changes. */
  checkRank(shape: readonly number[]): void {
    const rank = RANKS[this.config.kind];
    if (!rank.ok(shape.length)) throw bnError('BN_ERR_INPUT_RANK', { expected: rank.expected, rank: shape.length });
    if (this.config.kind === 'SYNC_BATCH_NORM' && shape[1] === 0) throw bnError('BN_ERR_ZERO_CHANNELS', {});
  }

  /** §3 step 5: the kernel's size checks for an input of `channels` channels, or null. */
  sizeError(channels: number, plan: ForwardPlan) {
    const check = (name: string, tensor: Float32Array | null, needed: boolean) => {
      if (tensor !== null) {
        if (tensor.length !== channels) return bnError('BN_ERR_CHANNEL_MISMATCH', { tensor: name, channels, length: tensor.length });
      } else if (needed) {
        return bnError('BN_ERR_BUFFER_UNDEFINED', { buffer: name });
      }
      return null;
    };
    return (
      check('running_mean', plan.runningMean, !plan.bnTraining) ??
      check('running_var', plan.runningVar, !plan.bnTraining) ??
      check('weight', this.#weight, false) ??
      check('bias', this.#bias, false)
    );
  }

  /**
   * module(x) in the current mode (§4). `shape` is x's shape; x is read and, with `save`, copied
   * (or kept as it is, when the caller hands it over as `owned`).
   * The kernels run between validation and commit, so callers must not run two forwards of one
   * module at once.
   */
  async forward(x: Float32Array, shape: readonly number[], kernels: Kernels, save = false, owned = false): Promise<ForwardResult> {
    return this.#forward(this.plan(), x, shape, kernels, save, owned);
  }

  /**
   * module.eval()(x) whatever mode the module is in, changing nothing (inference beside
   * training): the running statistics where the module has them, else the batch's, as PyTorch
   * does in eval. The checks, their order and their errors are forward's. Nothing changes because
   * an eval plan moves no counter and updates no buffer, so forward's commits find nothing to do.
   */
  async evalForward(x: Float32Array, shape: readonly number[], kernels: Kernels): Promise<Float32Array> {
    return (await this.#forward(this.plan(false), x, shape, kernels, false, false)).output;
  }

  async #forward(plan: ForwardPlan, x: Float32Array, shape: readonly number[], kernels: Kernels, save: boolean, owned: boolean): Promise<ForwardResult> {
    // 1. Rank: nothing has changed yet.
    this.checkRank(shape);
    // 2–4. The counter moves now, before the checks that can still fail (PyTorch does the same).
    const commitCounter = () => {
      if (this.#nbt === plan.nbtAfter) return;
      this.#nbt = plan.nbtAfter;
      this.#generation++;
    };
    // 5. One value per channel.
    const layout = layoutOf(shape);
    if (plan.bnTraining && layout.n * layout.s === 1) {
      commitCounter();
      throw bnError('BN_ERR_ONE_VALUE_PER_CHANNEL', { size: torchSize(shape) });
    }
    // 6. Empty input: an empty output at once, buffers untouched, later checks skipped.
    if (x.length === 0) {
      commitCounter();
      const empty = new Float64Array(layout.c);
      return {
        output: new Float32Array(0),
        stats: { count: 0, mean: empty, invstd: empty },
        saved: save ? this.#saved(shape, x, empty, empty, 0, plan.bnTraining) : null,
      };
    }
    // 7. The kernel's size checks.
    const sizeError = this.sizeError(layout.c, plan);
    if (sizeError) {
      commitCounter();
      throw sizeError;
    }
    // 8. Statistics (the batch's, or the running ones), then y = (x - mean) * invstd * w + b.
    let stats: { mean: Float64Array; invstd: Float64Array; runningMean: Float32Array | null; runningVar: Float32Array | null };
    const count = layout.n * layout.s;
    let y: Float32Array;
    // Nothing reads x after the kernels when the caller owns it and nothing saves it: y may take
    // its place (one tensor less per call), unless a non-finite scale needs x afterwards.
    const disposable = owned && !save;
    if (plan.bnTraining && kernels.fused) {
      const weight = this.#affine('weight', layout.c);
      const into = disposable && finiteScaleBound(weight, this.#eps) ? x : undefined;
      const fused = await kernels.fused.trainForward(x, layout, { weight, bias: this.#affine('bias', layout.c), eps: this.#eps }, into);
      stats = this.#fromBatch(fused.stats.mean, fused.stats.m2, count, plan);
      y = fused.output;
      applyNonFiniteScale(x, y, layout, stats.mean, this.#scale(stats.invstd), this.#affine('bias', layout.c));
    } else {
      if (plan.bnTraining) {
        const batch = await kernels.stats(x, layout);
        stats = this.#fromBatch(batch.mean, batch.m2, count, plan);
      } else {
        stats = { mean: Float64Array.from(plan.runningMean!), invstd: this.runningInvstd(plan.runningVar!), runningMean: null, runningVar: null };
      }
      y = await this.normalize(x, layout, stats.mean, stats.invstd, kernels, disposable);
    }
    const saved = save ? this.#saved(shape, owned ? x : x.slice(), stats.mean, stats.invstd, count, plan.bnTraining) : null;
    // 9. Commit.
    commitCounter();
    this.#commitRunning(stats);
    return { output: y, stats: { count, mean: stats.mean, invstd: stats.invstd }, saved };
  }

  /**
   * Commits one step of a SyncBatchNorm group whose statistics were pooled: the merged count,
   * mean and sum of squared deviations of the whole group's batch. As BatchNorm over the
   * concatenated batch: the counter moves, the buffers are updated from the merged statistics, and
   * a group batch with no values (every rank empty) leaves the buffers alone. A group batch of one
   * value per channel is refused and changes nothing. Returns the statistics to normalise with.
   */
  commitGroupStep(merged: { count: number; mean: Float64Array; m2: Float64Array }, plan: ForwardPlan, size: string): { mean: Float64Array; invstd: Float64Array } {
    if (merged.count === 1) throw bnError('BN_ERR_ONE_VALUE_PER_CHANNEL', { size });
    this.#nbt = plan.nbtAfter;
    this.#generation++;
    if (merged.count === 0) return { mean: merged.mean, invstd: new Float64Array(merged.mean.length) };
    const stats = this.#fromBatch(merged.mean, merged.m2, merged.count, plan);
    this.#commitRunning(stats);
    return stats;
  }

  /** invstd from biased batch variances: 1/sqrt(var + eps), or 0 where var and eps are both 0 (§4). */
  batchInvstd(variance: Float64Array): Float64Array {
    const eps = this.#eps;
    const invstd = new Float64Array(variance.length);
    for (let ch = 0; ch < invstd.length; ch++) {
      const v = variance[ch]!;
      invstd[ch] = v === 0 && eps === 0 ? 0 : 1 / Math.sqrt(v + eps);
    }
    return invstd;
  }

  /** invstd from running variances: 1/sqrt(var + eps), with no guard (§4: rv = 0, eps = 0 gives inf). */
  runningInvstd(variance: Float32Array): Float64Array {
    const eps = this.#eps;
    const invstd = new Float64Array(variance.length);
    for (let ch = 0; ch < invstd.length; ch++) invstd[ch] = 1 / Math.sqrt(variance[ch]! + eps);
    return invstd;
  }

  /**
   * y = (x − mean) · invstd · w + b, with the weight and bias as they are now; into x itself
   * where `disposable` says nothing reads x afterwards and every scale is finite in float32.
   */
  async normalize(x: Float32Array, layout: Layout, mean: Float64Array, invstd: Float64Array, kernels: Kernels, disposable = false): Promise<Float32Array> {
    const scale = this.#scale(invstd);
    const shift = this.#affine('bias', layout.c);
    const into = disposable && allFiniteInFloat32(scale) ? x : undefined;
    const y = await kernels.normalize(x, layout, { mean, scale, shift }, into);
    applyNonFiniteScale(x, y, layout, mean, scale, shift);
    return y;
  }

  /** invstd · weight per channel. */
  #scale(invstd: Float64Array): Float64Array {
    const w = this.#weight;
    if (!w) return invstd.slice();
    const scale = new Float64Array(invstd.length);
    for (let ch = 0; ch < scale.length; ch++) scale[ch] = invstd[ch]! * w[ch]!;
    return scale;
  }

  /** The weight (1 without affine parameters) or the bias (0 without), as float64. */
  #affine(which: 'weight' | 'bias', channels: number): Float64Array {
    const values = which === 'weight' ? this.#weight : this.#bias;
    return values ? new Float64Array(values) : new Float64Array(channels).fill(which === 'weight' ? 1 : 0);
  }

  /** What backward needs; `x` must already be the module's own copy. */
  savedFor(shape: readonly number[], x: Float32Array, mean: Float64Array, invstd: Float64Array, count: number, batchStats: boolean): SavedForward {
    return this.#saved(shape, x, mean, invstd, count, batchStats);
  }

  #saved(shape: readonly number[], x: Float32Array, mean: Float64Array, invstd: Float64Array, count: number, batchStats: boolean): SavedForward {
    return { shape: [...shape], x, mean, invstd, weight: this.#weight?.slice() ?? null, count, batchStats };
  }

  /** invstd from batch statistics, with the eps = 0 guard, and the buffers' new values. */
  #fromBatch(mean: Float64Array, m2: Float64Array, count: number, plan: ForwardPlan) {
    const channels = mean.length;
    const variance = new Float64Array(channels);
    for (let ch = 0; ch < channels; ch++) variance[ch] = m2[ch]! / count;
    const invstd = this.batchInvstd(variance);
    const rm = plan.runningMean;
    const rv = plan.runningVar;
    const runningMean = rm ? new Float32Array(channels) : null;
    const runningVar = rv ? new Float32Array(channels) : null;
    const m = plan.factor;
    for (let ch = 0; ch < channels; ch++) {
      if (runningMean) runningMean[ch] = m * mean[ch]! + (1 - m) * rm![ch]!;
      if (runningVar) runningVar[ch] = m * (m2[ch]! / (count - 1)) + (1 - m) * rv![ch]!;
    }
    return { mean, invstd, runningMean, runningVar };
  }

  #commitRunning(stats: { runningMean: Float32Array | null; runningVar: Float32Array | null }): void {
    if (stats.runningMean) this.#runningMean = stats.runningMean;
    if (stats.runningVar) this.#runningVar = stats.runningVar;
    if (stats.runningMean || stats.runningVar) this.#generation++;
  }
}

/** Whether a scale stays finite once the kernels round it to float32. */
const finiteInFloat32 = (v: number): boolean => Number.isFinite(Math.fround(v));

/** Whether every value stays finite in float32 (a loop: TypedArray methods with a callback cost ~13 ns a value). */
function allFiniteInFloat32(values: Float64Array): boolean {
  for (let i = 0; i < values.length; i++) if (!finiteInFloat32(values[i]!)) return false;
  return true;
}

/**
 * PyTorch's CPU kernel computes y = x * a + b' with a = invstd * w and b' = b - mean * a. The two
 * forms agree whenever `a` is finite; when it is not (eval with running_var + eps == 0), this
 * redoes the affected channels PyTorch's way so that the same NaNs and infinities come out.
 */
function applyNonFiniteScale(
  x: Float32Array,
  y: Float32Array,
  { n, c, s }: { n: number; c: number; s: number },
  mean: Float64Array,
  scale: Float64Array,
  shift: Float64Array,
): void {
  for (let ch = 0; ch < c; ch++) {
    if (finiteInFloat32(scale[ch]!)) continue;
    const a = Math.fround(scale[ch]!);
    const b = Math.fround(shift[ch]! - Math.fround(mean[ch]!) * a);
    for (let b0 = 0; b0 < n; b0++) {
      const base = (b0 * c + ch) * s;
      for (let i = 0; i < s; i++) y[base + i] = x[base + i]! * a + b;
    }
  }
}

/**
 * Whether every scale of a training forward, invstd · weight with invstd ≤ 1/sqrt(eps), is finite
 * in float32 (applyNonFiniteScale then needs nothing of x).
 */
function finiteScaleBound(weight: Float64Array, eps: number): boolean {
  if (!(eps > 0)) return false;
  const most = 1 / Math.sqrt(eps);
  for (let ch = 0; ch < weight.length; ch++) if (!finiteInFloat32(Math.abs(weight[ch]!) * most)) return false;
  return true;
}

/** autograd's check that grad_output has the output's shape. */
export function checkGradShape(saved: SavedForward, dyShape: readonly number[]): void {
  if (dyShape.length !== saved.shape.length || dyShape.some((d, i) => d !== saved.shape[i])) {
    throw bnError('BN_ERR_GRAD_SHAPE', { given: torchSize(dyShape), expected: torchSize(saved.shape) });
  }
}

/** This shard's S1 = Σ dy and S2 = Σ dy·(x − μ); zeros for an empty shard. */
export async function localGradSums(saved: SavedForward, dy: Float32Array, kernels: Kernels): Promise<GradSums> {
  const layout = layoutOf(saved.shape);
  if (saved.x.length === 0) return { sumDy: new Float64Array(layout.c), sumDyXmu: new Float64Array(layout.c) };
  return kernels.gradSums(saved.x, dy, layout, saved.mean);
}

/**
 * The gradients of a saved forward (batchnorm-semantics.md §6). With batch statistics the
 * gradient also flows through the mean and variance:
 *   grad_input = w · invstd · (dy − S1/n − (x − μ) · invstd² · S2/n)
 * with running statistics it does not: grad_input = dy · w · invstd. In both,
 * grad_weight = S2 · invstd and grad_bias = S1, where S1 = Σ dy and S2 = Σ dy · (x − μ).
 * `options.group` replaces S1, S2 and n with a group's totals (SyncBatchNorm); `options.local`
 * passes this shard's sums when they are known already; `options.dyDisposable` lets grad_input
 * overwrite dy.
 */
export async function backward(
  saved: SavedForward,
  dy: Float32Array,
  dyShape: readonly number[],
  kernels: Kernels,
  options: { local?: GradSums; group?: GradSums & { count: number }; dyDisposable?: boolean } = {},
): Promise<Gradients & { local: GradSums }> {
  // grad_input may take dy's place when the caller will not read dy again (OUTPUT_INTO).
  const into = options.dyDisposable ? dy : undefined;
  checkGradShape(saved, dyShape);
  const layout = layoutOf(saved.shape);
  const channels = layout.c;
  const w = saved.weight;
  const parameterGrads = (values: Float64Array) => (w === null ? null : new Float32Array(values));
  // grad_weight = S2 · invstd and grad_bias = S1, from this shard's own sums.
  const answer = (gradInput: Float32Array, local: GradSums) => {
    let gradWeight: Float32Array | null = null;
    if (w !== null) {
      gradWeight = new Float32Array(channels);
      for (let ch = 0; ch < channels; ch++) gradWeight[ch] = local.sumDyXmu[ch]! * saved.invstd[ch]!;
    }
    return { gradInput, gradWeight, gradBias: parameterGrads(local.sumDy), local };
  };
  if (saved.x.length === 0) {
    const zeros = new Float64Array(channels);
    return { gradInput: new Float32Array(0), gradWeight: parameterGrads(zeros), gradBias: parameterGrads(zeros), local: { sumDy: zeros, sumDyXmu: zeros } };
  }
  if (kernels.fused && !options.local && !options.group) {
    const weight = w ? new Float64Array(w) : new Float64Array(channels).fill(1);
    const fused = await kernels.fused.backward(saved.x, dy, layout, { mean: saved.mean, invstd: saved.invstd, weight, batchStats: saved.batchStats, count: saved.count }, into);
    return answer(fused.gradInput, fused.sums);
  }
  const local = options.local ?? (await localGradSums(saved, dy, kernels));
  const group = options.group;
  const s1 = group?.sumDy ?? local.sumDy;
  const s2 = group?.sumDyXmu ?? local.sumDyXmu;
  const n = group?.count ?? saved.count;
  const a = new Float64Array(channels);
  const b = new Float64Array(channels);
  const k = new Float64Array(channels);
  for (let ch = 0; ch < channels; ch++) {
    const invstd = saved.invstd[ch]!;
    a[ch] = (w ? w[ch]! : 1) * invstd;
    if (saved.batchStats) {
      b[ch] = (-a[ch]! * invstd * invstd * s2[ch]!) / n;
      k[ch] = (-a[ch]! * s1[ch]!) / n;
    }
  }
  return answer(await kernels.gradInput(saved.x, dy, layout, { mean: saved.mean, a, b, k }, into), local);
}
