/**
 * PyTorch's load_state_dict for a single BatchNorm module (nn.Module._load_from_state_dict plus
 * _NormBase's version-2 hook), as a pure function that decides what to copy. It differs from
 * PyTorch in one way: PyTorch copies the tensors that fit before it raises for the ones that
 * do not; here a load that raises copies nothing.
 */
import { bnError } from '../errors.js';

export const STATE_KEYS = ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'] as const;
export type StateKey = (typeof STATE_KEYS)[number];
type TensorKey = Exclude<StateKey, 'num_batches_tracked'>;

/** A state_dict: tensors are float32 vectors with their shapes implied; the counter is int64. */
export interface StateDict {
  weight?: Float32Array;
  bias?: Float32Array;
  running_mean?: Float32Array;
  running_var?: Float32Array;
  num_batches_tracked?: bigint;
}

/** A tensor as loaded from the wire, before its shape is checked against the module's. */
export interface LoadedTensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

export interface LoadInput {
  weight?: LoadedTensor | undefined;
  bias?: LoadedTensor | undefined;
  running_mean?: LoadedTensor | undefined;
  running_var?: LoadedTensor | undefined;
  num_batches_tracked?: bigint | undefined;
}

export interface LoadTarget {
  readonly className: string;
  /** The current value of the attribute: the version hook reads it at load time. */
  readonly trackRunningStats: boolean;
  /** The module's parameters and buffers; null is None (absent from the module's state). */
  readonly local: {
    readonly [K in TensorKey]: Float32Array | null;
  } & { readonly num_batches_tracked: bigint | null };
}

export interface LoadResult {
  readonly missingKeys: string[];
  readonly unexpectedKeys: string[];
  /** What to copy into the module: present keys only. */
  readonly values: StateDict;
}

const quoteList = (keys: readonly string[]) => keys.map((k) => `"${k}"`).join(', ');

/** Decides a load. Throws BN_ERR_LOAD_STATE with PyTorch's message when PyTorch would raise. */
export function loadStateDict(target: LoadTarget, input: LoadInput, version: number | null, strict: boolean): LoadResult {
  // _NormBase: a dict from before version 2 gets num_batches_tracked = 0 when it lacks the key.
  const state: LoadInput = { ...input };
  const present = (key: StateKey) => state[key] !== undefined;
  if ((version === null || version < 2) && target.trackRunningStats && !present('num_batches_tracked')) {
    state.num_batches_tracked = 0n;
  }

  const missingKeys: string[] = [];
  const unexpectedKeys: string[] = [];
  const errors: string[] = [];
  const values: StateDict = {};
  for (const key of STATE_KEYS) {
    const local = target.local[key];
    if (local === null) continue;
    if (!present(key)) {
      missingKeys.push(key);
      continue;
    }
    if (key === 'num_batches_tracked') {
      values.num_batches_tracked = state.num_batches_tracked!;
      continue;
    }
    const given = state[key]!;
    const localShape = [(local as Float32Array).length];
    if (given.shape.length !== 1 || given.shape[0] !== localShape[0]) {
      errors.push(
        `size mismatch for ${key}: copying a param with shape torch.Size([${given.shape.join(', ')}]) from checkpoint, the shape in current model is torch.Size([${localShape.join(', ')}]).`,
      );
      continue;
    }
    values[key] = given.data;
  }
  for (const key of STATE_KEYS) {
    if (present(key) && target.local[key] === null) unexpectedKeys.push(key);
  }

  if (strict) {
    if (unexpectedKeys.length > 0) errors.unshift(`Unexpected key(s) in state_dict: ${quoteList(unexpectedKeys)}. `);
    if (missingKeys.length > 0) errors.unshift(`Missing key(s) in state_dict: ${quoteList(missingKeys)}. `);
  }
  if (errors.length > 0) {
    throw bnError('BN_ERR_LOAD_STATE', { className: target.className, errors: errors.join('\n\t') });
  }
  return { missingKeys, unexpectedKeys, values };
}
