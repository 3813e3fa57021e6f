/** Runs one golden scenario against a ModuleHandle and checks every step against PyTorch. */
import { expect } from 'vitest';
import { Status } from '../../src/errors.js';
import { TOL, expectAtLeastAsAccurate, expectClose, type Tolerance } from './compare.js';
import type { GradResult, ModuleHandle, Observed } from './executors.js';
import { float32, values, type FixtureError, type ModuleStateFixture, type Scenario, type Step } from './fixtures.js';

/** The gRPC status normserve gives for a PyTorch exception (docs/semantics.md). */
export function expectedStatus(error: FixtureError): number {
  if (error.type === 'AttributeError') return Status.FAILED_PRECONDITION;
  if (error.type === 'RuntimeError' && / must be defined in evaluation mode$/.test(error.message)) return Status.FAILED_PRECONDITION;
  if (error.type === 'ValueError' || error.type === 'RuntimeError') return Status.INVALID_ARGUMENT;
  throw new Error(`no status mapping for PyTorch ${error.type}: ${error.message}`);
}

function checkTensor(actual: Float32Array | null, expected: ModuleStateFixture['weight'], tol: Tolerance, what: string) {
  if (expected === null) {
    expect(actual, `${what} should be None`).toBeNull();
    return;
  }
  expect(actual, `${what} should exist`).not.toBeNull();
  expectClose(actual!, values(expected), tol, what);
}

function checkState(actual: Observed, expected: ModuleStateFixture, where: string, precision: boolean) {
  expect(actual.training, `${where}: training`).toBe(expected.training);
  expect(actual.trackRunningStats, `${where}: track_running_stats`).toBe(expected.track_running_stats);
  expect(actual.numBatchesTracked, `${where}: num_batches_tracked`).toBe(
    expected.num_batches_tracked === null ? null : BigInt(expected.num_batches_tracked),
  );
  checkTensor(actual.weight, expected.weight, TOL.stats, `${where}: weight`);
  checkTensor(actual.bias, expected.bias, TOL.stats, `${where}: bias`);
  // Precision scenarios check running statistics against the float64 twin instead (below).
  const statsTol = precision ? { rtol: 1e-3, atol: 1e-6 } : TOL.stats;
  checkTensor(actual.runningMean, expected.running_mean, statsTol, `${where}: running_mean`);
  checkTensor(actual.runningVar, expected.running_var, statsTol, `${where}: running_var`);
}

async function runStep(handle: ModuleHandle, step: Step, where: string): Promise<unknown> {
  switch (step.op) {
    case 'update':
      return handle.update(step);
    case 'forward':
      return handle.forward(step.input!.shape, float32(step.input!), step.save ?? false);
    case 'backward':
      return handle.backward(step.grad_output!.shape, float32(step.grad_output!));
    case 'load_state':
      return handle.loadState(step);
    case 'reset_running_stats':
      return handle.resetRunningStats();
    case 'reset_parameters':
      return handle.resetParameters();
    case 'get_state':
      return handle.getState();
    default:
      throw new Error(`${where}: unknown op ${(step as Step).op}`);
  }
}

export async function runScenario(scenario: Scenario, handle: ModuleHandle): Promise<void> {
  const precision = scenario.steps.some((s) => s.expect.output_f64 !== undefined);
  checkState(await handle.observe(), scenario.initial, `${scenario.id} initial`, precision);
  for (const [i, step] of scenario.steps.entries()) {
    const where = `${scenario.id} step ${i} (${step.op})`;
    let result: unknown;
    let failure: unknown;
    try {
      result = await runStep(handle, step, where);
    } catch (err) {
      failure = err;
    }
    const expected = step.expect;
    if (expected.error) {
      expect(failure, `${where}: expected PyTorch's ${expected.error.type}: ${expected.error.message}`).toBeDefined();
      const f = handle.failure(failure);
      expect(f.status, `${where}: status for ${expected.error.message}`).toBe(expectedStatus(expected.error));
      expect(f.pythonType, `${where}: python type`).toBe(expected.error.type);
      if (expected.error.type === 'AttributeError') expect(f.message).toMatch(/is None/);
      else expect(f.message, where).toBe(expected.error.message);
    } else {
      if (failure) throw failure;
      if (step.op === 'forward') {
        const output = result as Float32Array;
        const want = expected.output!;
        expect(output.length, `${where}: output length`).toBe(values(want).length);
        if (expected.output_f64) {
          const exact = values(expected.output_f64);
          expectAtLeastAsAccurate(output, values(want), exact, `${where}: output vs float64`);
          expectClose(output, values(want), { rtol: 0, atol: 3e-2 }, `${where}: output vs PyTorch float32`);
        } else {
          expectClose(output, values(want), TOL.output, `${where}: output`);
        }
      }
      if (step.op === 'backward') {
        const g = result as GradResult;
        for (const [key, got] of [
          ['grad_input', g.gradInput],
          ['grad_weight', g.gradWeight],
          ['grad_bias', g.gradBias],
        ] as const) {
          const want = expected[key];
          const exact = expected[`${key}_f64`];
          if (!want) expect(got, `${where}: ${key} of a module that is not affine`).toBeNull();
          else if (exact) {
            // PyTorch's own float32 result is not exact here: be at least as close to float64.
            expectAtLeastAsAccurate(got!, values(want), values(exact), `${where}: ${key} vs float64`);
            expectClose(got!, values(want), { rtol: 1e-3, atol: 1e-4 }, `${where}: ${key} vs PyTorch float32`);
          } else expectClose(got!, values(want), TOL.gradient, `${where}: ${key}`);
        }
      }
      if (step.op === 'load_state') {
        const r = result as { missingKeys: string[]; unexpectedKeys: string[] };
        expect(r.missingKeys, `${where}: missing keys`).toEqual(expected.missing_keys ?? []);
        expect(r.unexpectedKeys, `${where}: unexpected keys`).toEqual(expected.unexpected_keys ?? []);
      }
      if (step.op === 'get_state') {
        const r = result as { keys: string[]; values: Record<string, Float32Array | bigint> };
        expect(r.keys, `${where}: state_dict keys`).toEqual(expected.state_dict_keys);
        for (const key of r.keys) {
          const want = expected.state_dict![key]!;
          if (typeof want === 'number') expect(r.values[key], `${where}: ${key}`).toBe(BigInt(want));
          else expectClose(r.values[key] as Float32Array, values(want), TOL.stats, `${where}: ${key}`);
        }
      }
    }
    const observed = await handle.observe();
    checkState(observed, step.after, where, precision);
    if (expected.after_f64) {
      for (const [key, name] of [
        ['runningMean', 'running_mean'],
        ['runningVar', 'running_var'],
      ] as const) {
        const exactT = expected.after_f64[name];
        const torchT = step.after[name];
        if (exactT && torchT) expectAtLeastAsAccurate(observed[key]!, values(torchT), values(exactT), `${where}: ${name} vs float64`);
      }
    }
  }
}
