/**
 * A module's constructor arguments with PyTorch's defaults filled in, their validation, and
 * PyTorch's repr. Pure: no I/O, no wire types.
 */
import { bnError } from '../errors.js';

export const MODULE_KINDS = ['BATCH_NORM_1D', 'BATCH_NORM_2D', 'BATCH_NORM_3D', 'SYNC_BATCH_NORM'] as const;
export type ModuleKind = (typeof MODULE_KINDS)[number];

/** PyTorch's class name for each kind: it appears in reprs and in load_state_dict errors. */
export const CLASS_NAMES: Readonly<Record<ModuleKind, string>> = {
  BATCH_NORM_1D: 'BatchNorm1d',
  BATCH_NORM_2D: 'BatchNorm2d',
  BATCH_NORM_3D: 'BatchNorm3d',
  SYNC_BATCH_NORM: 'SyncBatchNorm',
};

export const DEFAULT_EPS = 1e-5;
export const DEFAULT_MOMENTUM = 0.1;
/** Channels per module; far above any real network, low enough to bound per-module memory. */
export const MAX_NUM_FEATURES = 1 << 20;

export const SYNC_RULES = ['SYNC_WHEN_BATCH_STATS', 'SYNC_WHEN_TRAINING'] as const;
/** When a SyncBatchNorm group pools statistics: PR #44445's rule, or PyTorch 1.9's. */
export type SyncRule = (typeof SYNC_RULES)[number];

/** Ranks in one SyncBatchNorm group, at most. */
export const MAX_WORLD_SIZE = 4096;

/** What the PyTorch constructor takes. `momentum: null` is PyTorch's `momentum=None`. */
export interface ModuleConfig {
  readonly kind: ModuleKind;
  readonly numFeatures: number;
  readonly eps: number;
  readonly momentum: number | null;
  readonly affine: boolean;
  readonly trackRunningStats: boolean;
  /** The group's size (SyncBatchNorm's process group); 1 for every other kind. */
  readonly worldSize: number;
  readonly syncRule: SyncRule;
}

/** A config as a client states it: unset fields are undefined. */
export interface ModuleConfigInput {
  kind: ModuleKind;
  numFeatures: bigint;
  eps?: number | undefined;
  momentum?: number | undefined;
  cumulativeAverage: boolean;
  affine?: boolean | undefined;
  trackRunningStats?: boolean | undefined;
  /** 0 or undefined: 1. */
  worldSize?: number | undefined;
  syncRule?: SyncRule | undefined;
}

/** Checks a group's size and rule for a module of `kind`. */
export function checkGroup(kind: ModuleKind, worldSize: number, detail: (text: string) => Error): number {
  if (!Number.isInteger(worldSize) || worldSize < 1 || worldSize > MAX_WORLD_SIZE) {
    throw detail(`world_size must be between 1 and ${MAX_WORLD_SIZE}, got ${worldSize}`);
  }
  if (kind !== 'SYNC_BATCH_NORM' && worldSize !== 1) throw detail(`world_size is for SYNC_BATCH_NORM modules; a ${kind} has one rank`);
  return worldSize;
}

export function checkEps(eps: number, detail: (text: string) => Error): number {
  if (!Number.isFinite(eps) || eps < 0) throw detail(`eps must be a finite number >= 0, got ${eps}`);
  return eps;
}

export function checkMomentum(momentum: number, detail: (text: string) => Error): number {
  if (!Number.isFinite(momentum)) throw detail(`momentum must be a finite number, got ${momentum}`);
  return momentum;
}

const configError = (detail: string) => bnError('BN_ERR_INVALID_CONFIG', { detail });

/** Validates a client's config and fills in PyTorch's defaults. */
export function resolveConfig(input: ModuleConfigInput): ModuleConfig {
  if (!MODULE_KINDS.includes(input.kind)) throw configError(`kind must be one of ${MODULE_KINDS.join(', ')}`);
  if (input.numFeatures < 1n || input.numFeatures > BigInt(MAX_NUM_FEATURES)) {
    throw configError(`num_features must be between 1 and ${MAX_NUM_FEATURES}, got ${input.numFeatures}`);
  }
  if (input.cumulativeAverage && input.momentum !== undefined) {
    throw configError('momentum must be unset when cumulative_average is true (that is momentum=None)');
  }
  return {
    kind: input.kind,
    numFeatures: Number(input.numFeatures),
    eps: input.eps === undefined ? DEFAULT_EPS : checkEps(input.eps, configError),
    momentum: input.cumulativeAverage
      ? null
      : input.momentum === undefined
        ? DEFAULT_MOMENTUM
        : checkMomentum(input.momentum, configError),
    affine: input.affine ?? true,
    trackRunningStats: input.trackRunningStats ?? true,
    worldSize: checkGroup(input.kind, input.worldSize || 1, configError),
    syncRule: input.syncRule ?? 'SYNC_WHEN_BATCH_STATS',
  };
}

/** Python's repr of a float: shortest round-trip digits, exponent form below 1e-4 and from 1e16. */
export function pythonFloatRepr(value: number): string {
  if (Number.isNaN(value)) return 'nan';
  if (!Number.isFinite(value)) return value > 0 ? 'inf' : '-inf';
  if (value === 0) return Object.is(value, -0) ? '-0.0' : '0.0';
  const [mantissa, expText] = value.toExponential().split('e') as [string, string];
  const exponent = Number(expText);
  if (exponent < -4 || exponent >= 16) {
    const sign = exponent < 0 ? '-' : '+';
    return `${mantissa}e${sign}${String(Math.abs(exponent)).padStart(2, '0')}`;
  }
  const negative = mantissa.startsWith('-');
  const digits = mantissa.replace('-', '').replace('.', '');
  const point = exponent + 1; // digits before the decimal point
  let text: string;
  if (point <= 0) text = `0.${'0'.repeat(-point)}${digits}`;
  else if (point >= digits.length) text = `${digits}${'0'.repeat(point - digits.length)}.0`;
  else text = `${digits.slice(0, point)}.${digits.slice(point)}`;
  return negative ? `-${text}` : text;
}

const pyBool = (b: boolean) => (b ? 'True' : 'False');

/** PyTorch's repr, e.g. `BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)`. */
export function moduleRepr(kind: ModuleKind, numFeatures: number, eps: number, momentum: number | null, affine: boolean, track: boolean): string {
  const m = momentum === null ? 'None' : pythonFloatRepr(momentum);
  return `${CLASS_NAMES[kind]}(${numFeatures}, eps=${pythonFloatRepr(eps)}, momentum=${m}, affine=${pyBool(affine)}, track_running_stats=${pyBool(track)})`;
}
