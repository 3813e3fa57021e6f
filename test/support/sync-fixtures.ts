/** The golden `sync` group: its scenario shape, and the group module a scenario starts from. */
import type { NormserveClient } from '../../src/client/client.js';
import { float32, loadGolden, type FixtureTensor, type ModuleStateFixture } from './fixtures.js';

export interface SyncStep {
  op: 'step' | 'update';
  step?: number;
  training?: boolean;
  track_running_stats?: boolean;
  shards?: FixtureTensor[];
  grad_outputs?: FixtureTensor[];
  expect: {
    synced?: boolean;
    outputs?: FixtureTensor[];
    count?: number;
    mean?: FixtureTensor;
    var?: FixtureTensor;
    invstd?: FixtureTensor;
    grad_inputs?: FixtureTensor[];
    grad_weight?: FixtureTensor[];
    grad_bias?: FixtureTensor[];
    grad_weight_total?: FixtureTensor;
    grad_bias_total?: FixtureTensor;
    error?: { type: string; message: string };
  };
  after: ModuleStateFixture;
}

export interface SyncScenario {
  id: string;
  config: {
    num_features: number;
    eps: number;
    momentum: number | null;
    affine: boolean;
    track_running_stats: boolean;
    world_size: number;
    sync_rule: 'SYNC_WHEN_BATCH_STATS' | 'SYNC_WHEN_TRAINING';
  };
  initial: ModuleStateFixture;
  steps: SyncStep[];
}

export function loadSyncScenarios(): SyncScenario[] {
  return loadGolden().find((f) => f.group === 'sync')!.scenarios as unknown as SyncScenario[];
}

/** Creates the scenario's group module under `name`, with its initial weight and bias. */
export async function createGroupModule(client: NormserveClient, name: string, scenario: SyncScenario): Promise<void> {
  const c = scenario.config;
  await client.createModule(name, {
    kind: 'SYNC_BATCH_NORM',
    numFeatures: c.num_features,
    eps: c.eps,
    momentum: c.momentum,
    affine: c.affine,
    trackRunningStats: c.track_running_stats,
    worldSize: c.world_size,
    syncRule: c.sync_rule,
  });
  if (scenario.initial.weight) {
    await client.loadState(name, { weight: float32(scenario.initial.weight), bias: float32(scenario.initial.bias!) }, { strict: false });
  }
}
