/**
 * BatchNorm.evalForward, the forward ModelInfer runs: what module.eval()(x) gives, in whatever mode
 * the module is, with forward's checks and errors, and no change to the module at all.
 */
import { describe, expect, it } from 'vitest';
import { createReferenceKernels } from '../../src/kernels/reference.js';
import { BatchNorm } from '../../src/nn/batch-norm.js';
import { resolveConfig, type ModuleConfigInput } from '../../src/nn/config.js';
import { channelData } from '../support/data.js';

const kernels = createReferenceKernels();

function module(config: Partial<ModuleConfigInput> = {}): BatchNorm {
  return new BatchNorm(resolveConfig({ kind: 'BATCH_NORM_2D', numFeatures: 3n, cumulativeAverage: false, ...config }));
}

/** A few training steps, so that running statistics and the counter are away from their defaults. */
async function trained(m: BatchNorm): Promise<BatchNorm> {
  for (let step = 1; step <= 3; step++) await m.forward(channelData(4, 3, 4, step, 2, step), [4, 3, 2, 2], kernels);
  return m;
}

/** module.eval()(x) through forward, on a copy: the oracle evalForward must equal bit for bit. */
async function evalOracle(m: BatchNorm, x: Float32Array, shape: number[]): Promise<Float32Array> {
  const copy = BatchNorm.fromSnapshot(m.snapshot());
  copy.update({ training: false });
  return (await copy.forward(x, shape, kernels)).output;
}

const x = channelData(2, 3, 4, 0.5, 3, 7);
const shape = [2, 3, 2, 2];

describe('BatchNorm.evalForward', () => {
  it('uses the running statistics of a module in training mode, and changes nothing', async () => {
    const m = await trained(module());
    expect(m.training).toBe(true);
    const before = m.snapshot();
    const generation = m.generation;
    const y = await m.evalForward(x, shape, kernels);
    expect(y).toEqual(await evalOracle(m, x, shape));
    // A training forward would normalise with the batch's statistics instead.
    expect(y).not.toEqual((await BatchNorm.fromSnapshot(before).forward(x, shape, kernels)).output);
    expect(m.snapshot()).toEqual(before);
    expect(m.generation).toBe(generation);
  });

  it('uses running statistics kept after track_running_stats was turned off, as eval does', async () => {
    const m = await trained(module());
    m.update({ trackRunningStats: false });
    const before = m.snapshot();
    expect(await m.evalForward(x, shape, kernels)).toEqual(await evalOracle(m, x, shape));
    expect(m.snapshot()).toEqual(before);
  });

  it('uses the batch statistics of a module without running statistics', async () => {
    const m = module({ trackRunningStats: false });
    const before = m.snapshot();
    const y = await m.evalForward(x, shape, kernels);
    expect(y).toEqual((await m.forward(x, shape, kernels)).output);
    expect(m.snapshot()).toEqual(before);
  });

  it('equals forward on a module in eval mode', async () => {
    const m = await trained(module({ momentum: 0.3 }));
    m.update({ training: false });
    expect(await m.evalForward(x, shape, kernels)).toEqual((await m.forward(x, shape, kernels)).output);
  });

  it("refuses what forward refuses, with forward's errors, and moves no counter", async () => {
    const m = await trained(module());
    const before = m.snapshot();
    await expect(m.evalForward(x, [2, 3, 8], kernels)).rejects.toMatchObject({ code: 'BN_ERR_INPUT_RANK', message: 'expected 4D input (got 3D input)' });
    await expect(m.evalForward(new Float32Array(8), [2, 4, 1, 1], kernels)).rejects.toMatchObject({
      code: 'BN_ERR_CHANNEL_MISMATCH',
      message: 'running_mean should contain 4 elements not 3',
    });
    m.update({ clearBuffers: ['running_var'] });
    await expect(m.evalForward(x, shape, kernels)).rejects.toMatchObject({ code: 'BN_ERR_BUFFER_UNDEFINED', message: 'running_var must be defined in evaluation mode' });
    expect(m.snapshot()).toEqual({ ...before, runningVar: null });

    // Batch statistics need more than one value per channel; a training forward would also have counted the batch.
    const untracked = module({ trackRunningStats: false });
    await expect(untracked.evalForward(Float32Array.of(1, 2, 3), [1, 3, 1, 1], kernels)).rejects.toMatchObject({ code: 'BN_ERR_ONE_VALUE_PER_CHANNEL' });
  });

  it('answers an empty input with an empty output', async () => {
    const m = await trained(module());
    expect(await m.evalForward(new Float32Array(0), [0, 3, 2, 2], kernels)).toEqual(new Float32Array(0));
  });
});

describe('BatchNorm.plan(false)', () => {
  it('needs the group for batch statistics in eval only under the SYNC_WHEN_BATCH_STATS rule', () => {
    const sync = (syncRule: 'SYNC_WHEN_BATCH_STATS' | 'SYNC_WHEN_TRAINING') =>
      module({ kind: 'SYNC_BATCH_NORM', worldSize: 2, trackRunningStats: false, syncRule });
    const pools = sync('SYNC_WHEN_BATCH_STATS');
    const local = sync('SYNC_WHEN_TRAINING');
    expect(pools.needsSync(pools.plan(false))).toBe(true);
    expect(local.needsSync(local.plan(false))).toBe(false);
    expect(local.needsSync(local.plan())).toBe(true);
  });
});
