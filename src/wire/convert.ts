/**
 * Requests to module-layer inputs and module state to replies. Checks what the proto types cannot
 * say (enum values, int64 ranges, combinations of optional fields) and nothing PyTorch checks.
 */
import type { Module } from '../generated/normserve/v1/Module.js';
import type { ModuleConfig__Output } from '../generated/normserve/v1/ModuleConfig.js';
import type { ModuleState, ModuleState__Output } from '../generated/normserve/v1/ModuleState.js';
import type { UpdateModuleRequest__Output } from '../generated/normserve/v1/UpdateModuleRequest.js';
import { bnError } from '../errors.js';
import type { BatchNorm, BufferName, ModuleUpdate } from '../nn/batch-norm.js';
import { MODULE_KINDS, resolveConfig, type ModuleConfig, type ModuleKind, type SyncRule } from '../nn/config.js';
import type { LoadInput } from '../nn/state-dict.js';
import { decodeTensor, encodeTensor } from './tensor-codec.js';

export function configFromWire(c: ModuleConfig__Output | null | undefined): ModuleConfig {
  const invalid = (detail: string) => bnError('BN_ERR_INVALID_CONFIG', { detail }, 'config');
  if (!c) throw invalid('config is missing');
  const kind = c.kind as string | number;
  if (typeof kind !== 'string' || !(MODULE_KINDS as readonly string[]).includes(kind)) {
    throw invalid(`kind must be one of ${MODULE_KINDS.join(', ')}, got ${String(kind)}`);
  }
  return resolveConfig({
    kind: kind as ModuleKind,
    numFeatures: BigInt(c.num_features),
    eps: c.eps,
    momentum: c.momentum,
    cumulativeAverage: c.cumulative_average,
    affine: c.affine,
    trackRunningStats: c.track_running_stats,
    worldSize: c.world_size,
    syncRule: syncRuleFromWire(c.sync_rule),
  });
}

export function syncRuleFromWire(rule: string | number | undefined): SyncRule {
  if (rule === undefined || rule === 'SYNC_RULE_UNSPECIFIED' || rule === 'SYNC_WHEN_BATCH_STATS') return 'SYNC_WHEN_BATCH_STATS';
  if (rule === 'SYNC_WHEN_TRAINING') return 'SYNC_WHEN_TRAINING';
  throw bnError('BN_ERR_INVALID_CONFIG', { detail: `sync_rule must be SYNC_WHEN_BATCH_STATS or SYNC_WHEN_TRAINING, got ${String(rule)}` }, 'sync_rule');
}

const BUFFER_BY_ENUM: Readonly<Record<string, BufferName>> = {
  RUNNING_MEAN: 'running_mean',
  RUNNING_VAR: 'running_var',
  NUM_BATCHES_TRACKED: 'num_batches_tracked',
};

export function updateFromWire(r: UpdateModuleRequest__Output): ModuleUpdate {
  const invalid = (detail: string) => bnError('BN_ERR_INVALID_UPDATE', { detail });
  let momentum: number | null | undefined = r.momentum;
  if (r.cumulative_average === true) {
    if (r.momentum !== undefined) throw invalid('set either momentum or cumulative_average=true, not both');
    momentum = null;
  } else if (r.cumulative_average === false && r.momentum === undefined) {
    throw invalid('cumulative_average=false needs a momentum to use instead');
  }
  const clearBuffers = r.clear_buffers.map((b) => {
    const name = BUFFER_BY_ENUM[String(b)];
    if (!name) throw invalid(`clear_buffers: unknown buffer ${String(b)}; use one of ${Object.keys(BUFFER_BY_ENUM).join(', ')}`);
    return name;
  });
  return { training: r.training, trackRunningStats: r.track_running_stats, momentum, eps: r.eps, clearBuffers };
}

/**
 * What a load puts into a module, from LoadState's `state` or from the tensors of another request
 * (Forward's weight and bias); `fieldPrefix` names the fields in errors ('state.' for LoadState).
 */
export function loadInputFromWire(
  s: Partial<ModuleState__Output> | null | undefined,
  maxElements: number,
  fieldPrefix = 'state.',
): LoadInput {
  const state = s ?? {};
  const tensor = (key: 'weight' | 'bias' | 'running_mean' | 'running_var') => {
    const t = state[key];
    return t ? decodeTensor(t, { field: `${fieldPrefix}${key}`, maxElements, accept: ['FLOAT32', 'FLOAT64'] }) : undefined;
  };
  const nbt = state.num_batches_tracked === undefined ? undefined : BigInt(state.num_batches_tracked);
  return {
    weight: tensor('weight'),
    bias: tensor('bias'),
    running_mean: tensor('running_mean'),
    running_var: tensor('running_var'),
    num_batches_tracked: nbt,
  };
}

export function moduleToWire(name: string, module: BatchNorm): Module {
  const s = module.snapshot();
  const c = s.config;
  return {
    name,
    config: {
      kind: c.kind,
      num_features: String(c.numFeatures),
      eps: s.eps,
      ...(s.momentum === null ? { cumulative_average: true } : { momentum: s.momentum, cumulative_average: false }),
      affine: c.affine,
      track_running_stats: c.trackRunningStats,
      world_size: c.worldSize,
      sync_rule: c.kind === 'SYNC_BATCH_NORM' ? c.syncRule : 'SYNC_RULE_UNSPECIFIED',
    },
    training: s.training,
    track_running_stats: s.trackRunningStats,
    ...(s.numBatchesTracked === null ? {} : { num_batches_tracked: String(s.numBatchesTracked) }),
    has_running_mean: s.runningMean !== null,
    has_running_var: s.runningVar !== null,
    repr: module.repr,
  };
}

export function stateToWire(module: BatchNorm): ModuleState {
  const dict = module.stateDict();
  const out: ModuleState = { version: 2 };
  for (const key of ['weight', 'bias', 'running_mean', 'running_var'] as const) {
    const t = dict[key];
    if (t) out[key] = encodeTensor([t.length], t);
  }
  if (dict.num_batches_tracked !== undefined) out.num_batches_tracked = String(dict.num_batches_tracked);
  return out;
}
