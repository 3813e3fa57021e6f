/**
 * Two ways to run a golden scenario: on the module layer directly, and through a real server with
 * the TypeScript client. Both expose the same small interface, so one test body drives both.
 */
import { NormserveClient, NormserveClientError, type StateDict as ClientStateDict } from '../../src/client/client.js';
import { NormserveError } from '../../src/errors.js';
import type { Kernels } from '../../src/kernels/kernels.js';
import { backward, BatchNorm, type SavedForward } from '../../src/nn/batch-norm.js';
import { resolveConfig } from '../../src/nn/config.js';
import type { LoadInput } from '../../src/nn/state-dict.js';
import { float32, type FixtureTensor, type Scenario, type Step } from './fixtures.js';

export interface Observed {
  training: boolean;
  trackRunningStats: boolean;
  weight: Float32Array | null;
  bias: Float32Array | null;
  runningMean: Float32Array | null;
  runningVar: Float32Array | null;
  numBatchesTracked: bigint | null;
}

export interface Failure {
  status: number;
  message: string;
  pythonType: string | undefined;
}

export interface GradResult {
  gradInput: Float32Array;
  gradWeight: Float32Array | null;
  gradBias: Float32Array | null;
}

export interface ModuleHandle {
  update(step: Step): Promise<void>;
  /** With `save`, the handle keeps the context for the next backward. */
  forward(shape: number[], data: Float32Array, save?: boolean): Promise<Float32Array>;
  /** The gradients of the last saved forward. */
  backward(shape: number[], gradOutput: Float32Array): Promise<GradResult>;
  loadState(step: Step): Promise<{ missingKeys: string[]; unexpectedKeys: string[] }>;
  resetRunningStats(): Promise<void>;
  resetParameters(): Promise<void>;
  /** state_dict(): ordered keys and values. */
  getState(): Promise<{ keys: string[]; values: Record<string, Float32Array | bigint> }>;
  observe(): Promise<Observed>;
  /** The failure a rejected operation carries, as status, message and Python type. */
  failure(err: unknown): Failure;
}

function loadInput(step: Step): LoadInput {
  const s = step.state ?? {};
  const tensor = (t: FixtureTensor | undefined) => (t ? { shape: t.shape, data: float32(t) } : undefined);
  return {
    weight: tensor(s.weight),
    bias: tensor(s.bias),
    running_mean: tensor(s.running_mean),
    running_var: tensor(s.running_var),
    num_batches_tracked: s.num_batches_tracked === undefined ? undefined : BigInt(s.num_batches_tracked),
  };
}

function configOf(scenario: Scenario) {
  return resolveConfig({
    kind: scenario.kind,
    numFeatures: BigInt(scenario.config.num_features),
    eps: scenario.config.eps,
    momentum: scenario.config.momentum ?? undefined,
    cumulativeAverage: scenario.config.momentum === null,
    affine: scenario.config.affine,
    trackRunningStats: scenario.config.track_running_stats,
  });
}

/** The module layer with the given kernels. */
export function moduleHandle(scenario: Scenario, kernels: Kernels): ModuleHandle {
  const module = new BatchNorm(configOf(scenario));
  let saved: SavedForward | null = null;
  return {
    async update(step) {
      module.update({ training: step.training, trackRunningStats: step.track_running_stats, clearBuffers: step.clear_buffers });
    },
    async forward(shape, data, save = false) {
      const r = await module.forward(data, shape, kernels, save);
      if (save) saved = r.saved;
      return r.output;
    },
    async backward(shape, gradOutput) {
      if (!saved) throw new Error('backward without a saved forward');
      const { gradInput, gradWeight, gradBias } = await backward(saved, gradOutput, shape, kernels);
      return { gradInput, gradWeight, gradBias };
    },
    async loadState(step) {
      const r = module.loadStateDict(loadInput(step), step.version ?? null, step.strict ?? true);
      return { missingKeys: r.missingKeys, unexpectedKeys: r.unexpectedKeys };
    },
    async resetRunningStats() {
      module.resetRunningStats();
    },
    async resetParameters() {
      module.resetParameters();
    },
    async getState() {
      const dict = module.stateDict();
      return { keys: Object.keys(dict), values: dict as Record<string, Float32Array | bigint> };
    },
    async observe() {
      const s = module.snapshot();
      return {
        training: s.training,
        trackRunningStats: s.trackRunningStats,
        weight: s.weight,
        bias: s.bias,
        runningMean: s.runningMean,
        runningVar: s.runningVar,
        numBatchesTracked: s.numBatchesTracked,
      };
    },
    failure(err) {
      if (!(err instanceof NormserveError)) throw err;
      return { status: err.status, message: err.message, pythonType: err.pythonType };
    },
  };
}

/** A module on a real server, through the client. */
export async function serverHandle(scenario: Scenario, client: NormserveClient, name: string): Promise<ModuleHandle> {
  const c = scenario.config;
  await client.createModule(name, {
    kind: scenario.kind,
    numFeatures: c.num_features,
    eps: c.eps,
    momentum: c.momentum,
    affine: c.affine,
    trackRunningStats: c.track_running_stats,
  });
  let contextId = '';
  return {
    async update(step) {
      await client.updateModule(name, {
        ...(step.training === undefined ? {} : { training: step.training }),
        ...(step.track_running_stats === undefined ? {} : { trackRunningStats: step.track_running_stats }),
        clearBuffers: step.clear_buffers ?? [],
      });
    },
    async forward(shape, data, save = false) {
      const r = await client.forward(name, { shape, data }, { saveForBackward: save });
      if (save) contextId = r.contextId;
      return r.data;
    },
    async backward(shape, gradOutput) {
      const g = await client.backward(name, contextId, { shape, data: gradOutput });
      return { gradInput: g.gradInput.data, gradWeight: g.gradWeight, gradBias: g.gradBias };
    },
    async loadState(step) {
      const input = loadInput(step);
      const state: ClientStateDict = {};
      for (const key of ['weight', 'bias', 'running_mean', 'running_var'] as const) {
        const t = input[key];
        if (t) {
          if (t.shape.length !== 1) throw new Error('the client sends state tensors as vectors');
          state[key] = t.data;
        }
      }
      if (input.num_batches_tracked !== undefined) state.num_batches_tracked = input.num_batches_tracked;
      const r = await client.loadState(name, state, { strict: step.strict ?? true, version: step.version ?? null });
      return { missingKeys: r.missingKeys, unexpectedKeys: r.unexpectedKeys };
    },
    async resetRunningStats() {
      await client.resetRunningStats(name);
    },
    async resetParameters() {
      await client.resetParameters(name);
    },
    async getState() {
      const dict = await client.getState(name);
      return { keys: Object.keys(dict), values: dict as Record<string, Float32Array | bigint> };
    },
    async observe() {
      const [m, dict] = await Promise.all([client.getModule(name), client.getState(name)]);
      // A buffer that is None is absent from the state_dict; so is a parameter of a non-affine module.
      return {
        training: m.training,
        trackRunningStats: m.trackRunningStats,
        weight: dict.weight ?? null,
        bias: dict.bias ?? null,
        runningMean: m.hasRunningMean ? dict.running_mean! : null,
        runningVar: m.hasRunningVar ? dict.running_var! : null,
        numBatchesTracked: m.numBatchesTracked,
      };
    },
    failure(err) {
      if (!(err instanceof NormserveClientError)) throw err;
      return { status: err.code, message: err.message, pythonType: err.pythonType };
    },
  };
}
