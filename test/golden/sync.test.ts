/**
 * SyncBatchNorm groups against PyTorch: every golden sync scenario runs through a real server with
 * one client per rank, in both modes. Full-shard mode sends the shards (SyncForward, SyncBackward);
 * statistics-only mode sends 2C+1 numbers (GatherStats, ReduceGrads) and normalises and
 * differentiates on the client, as a client without a GPU would. Both must equal BatchNorm over
 * the concatenated batch, and the module must end each step as PyTorch's does.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient, NormserveClientError } from '../../src/client/client.js';
import { layoutOf } from '../../src/kernels/kernels.js';
import { referenceGradInput, referenceGradSums, referenceNormalize, referenceStats } from '../../src/kernels/reference.js';
import { TOL, expectClose } from '../support/compare.js';
import { float32, values, type ModuleStateFixture } from '../support/fixtures.js';
import { expectedStatus } from '../support/run-scenario.js';
import { startTestServer, type TestServer } from '../support/server.js';
import { createGroupModule, loadSyncScenarios, type SyncStep } from '../support/sync-fixtures.js';

const scenarios = loadSyncScenarios();

let server: TestServer;
const clients: NormserveClient[] = [];

beforeAll(async () => {
  server = await startTestServer({ stepTimeoutMs: 20_000 });
  for (let r = 0; r < 4; r++) clients.push(new NormserveClient(server.address));
});
afterAll(async () => {
  for (const c of clients) c.close();
  await server?.stop();
});

async function checkState(name: string, expected: ModuleStateFixture, where: string) {
  const admin = clients[0]!;
  const [m, state] = await Promise.all([admin.getModule(name), admin.getState(name)]);
  expect(m.training, `${where}: training`).toBe(expected.training);
  expect(m.numBatchesTracked, `${where}: num_batches_tracked`).toBe(expected.num_batches_tracked === null ? null : BigInt(expected.num_batches_tracked));
  for (const key of ['running_mean', 'running_var'] as const) {
    const want = expected[key];
    if (want) expectClose(state[key]!, values(want), TOL.stats, `${where}: ${key}`);
    else expect(state[key], `${where}: ${key}`).toBeUndefined();
  }
}

function checkFailure(results: PromiseSettledResult<unknown>[], error: { type: string; message: string }, where: string) {
  for (const r of results) {
    expect(r.status, `${where}: every rank fails`).toBe('rejected');
    const err = (r as PromiseRejectedResult).reason as NormserveClientError;
    expect(err.code, where).toBe(expectedStatus(error));
    expect(err.message, where).toBe(error.message);
  }
}

function checkStep(step: SyncStep, rank: number, got: { output: Float32Array; gradInput?: Float32Array; gradWeight?: Float32Array | null; gradBias?: Float32Array | null }, where: string) {
  const e = step.expect;
  expectClose(got.output, values(e.outputs![rank]!), TOL.output, `${where}: rank ${rank} output`);
  if (e.grad_inputs) expectClose(got.gradInput!, values(e.grad_inputs[rank]!), TOL.gradient, `${where}: rank ${rank} grad_input`);
  if (e.grad_weight) {
    expectClose(got.gradWeight!, values(e.grad_weight[rank]!), TOL.gradient, `${where}: rank ${rank} grad_weight partial`);
    expectClose(got.gradBias!, values(e.grad_bias![rank]!), TOL.gradient, `${where}: rank ${rank} grad_bias partial`);
  } else if (step.grad_outputs) {
    expect(got.gradWeight ?? null, `${where}: no parameter gradients without affine`).toBeNull();
  }
}

describe.each(scenarios.map((s) => [s.id, s] as const))('%s', (id, scenario) => {
  it('in full-shard mode (SyncForward, SyncBackward)', async () => {
    const name = `sync-shard/${id}`;
    await createGroupModule(clients[0]!, name, scenario);
    const world = scenario.config.world_size;
    for (const [i, step] of scenario.steps.entries()) {
      const where = `${id} step ${i}`;
      if (step.op === 'update') {
        await clients[0]!.updateModule(name, { training: step.training, trackRunningStats: step.track_running_stats });
        continue;
      }
      const ref = (rank: number) => ({ step: step.step!, rank, worldSize: world });
      const save = step.grad_outputs !== undefined;
      const forwards = await Promise.allSettled(
        step.shards!.map((t, rank) => clients[rank]!.syncForward(name, ref(rank), { shape: t.shape, data: float32(t) }, { saveForBackward: save })),
      );
      if (step.expect.error) {
        checkFailure(forwards, step.expect.error, where);
        await checkState(name, step.after, where);
        continue;
      }
      const outs = forwards.map((r) => (r.status === 'fulfilled' ? r.value : Promise.reject(r.reason)));
      const results = await Promise.all(outs);
      for (const r of results) {
        expect(r.synced, `${where}: synced`).toBe(step.expect.synced);
        if (step.expect.synced) {
          expect(r.count, `${where}: group count`).toBe(step.expect.count);
          if (step.expect.mean) {
            expectClose(r.mean, values(step.expect.mean), { rtol: 1e-6, atol: 1e-7 }, `${where}: group mean`);
            expectClose(r.invstd, values(step.expect.invstd!), { rtol: 1e-6, atol: 0 }, `${where}: group invstd`);
          }
        }
      }
      const grads = save
        ? await Promise.all(
            step.grad_outputs!.map((t, rank) => clients[rank]!.syncBackward(name, ref(rank), results[rank]!.contextId, { shape: t.shape, data: float32(t) })),
          )
        : [];
      for (let rank = 0; rank < world; rank++) {
        const g = grads[rank];
        checkStep(step, rank, { output: results[rank]!.output.data, gradInput: g?.gradInput.data, gradWeight: g?.gradWeight, gradBias: g?.gradBias }, where);
        if (g && step.expect.grad_weight_total) {
          expectClose(g.gradWeightTotal!, values(step.expect.grad_weight_total), TOL.gradient, `${where}: grad_weight total`);
          expectClose(g.gradBiasTotal!, values(step.expect.grad_bias_total!), TOL.gradient, `${where}: grad_bias total`);
        }
      }
      await checkState(name, step.after, where);
    }
    expect(server.running.coordinator.pending()).toEqual({ steps: 0, waiters: 0 });
  });

  it('in statistics-only mode (GatherStats, ReduceGrads), normalising on the client', async () => {
    const name = `sync-stats/${id}`;
    await createGroupModule(clients[0]!, name, scenario);
    const world = scenario.config.world_size;
    const admin = clients[0]!;
    for (const [i, step] of scenario.steps.entries()) {
      const where = `${id} step ${i}`;
      if (step.op === 'update') {
        await admin.updateModule(name, { training: step.training, trackRunningStats: step.track_running_stats });
        continue;
      }
      const shards = step.shards!.map((t) => ({ shape: t.shape, data: float32(t), layout: layoutOf(t.shape) }));
      const state = await admin.getState(name);
      const ref = (rank: number) => ({ step: step.step!, rank, worldSize: world });
      const local = shards.map((s) => {
        const count = s.layout.n * s.layout.s;
        const st = count > 0 ? referenceStats(s.data, s.layout) : { mean: new Float64Array(s.layout.c), m2: new Float64Array(s.layout.c) };
        return { count, mean: st.mean, var: st.m2.map((m) => (count > 0 ? m / count : 0)) };
      });
      const gathered = await Promise.allSettled(local.map((l, rank) => clients[rank]!.gatherStats(name, ref(rank), l)));
      if (step.expect.error) {
        checkFailure(gathered, step.expect.error, where);
        await checkState(name, step.after, where);
        continue;
      }
      const stats = await Promise.all(gathered.map((r) => (r.status === 'fulfilled' ? r.value : Promise.reject(r.reason))));
      for (const [rank, s] of shards.entries()) {
        const st = stats[rank]!;
        expect(st.synced, `${where}: synced`).toBe(step.expect.synced);
        if (st.synced) expect(st.count).toBe(step.expect.count);
        if (s.data.length === 0) {
          // An empty shard: nothing to normalise, and zero partial gradients.
          const zeros = scenario.config.affine ? new Float32Array(s.layout.c) : null;
          checkStep(step, rank, { output: new Float32Array(0), gradInput: new Float32Array(0), gradWeight: zeros, gradBias: zeros }, where);
          continue;
        }
        // The client's own normalisation with the statistics it was given.
        const w = state.weight ?? new Float32Array(s.layout.c).fill(1);
        const b = state.bias ?? new Float32Array(s.layout.c);
        const output = referenceNormalize(s.data, s.layout, {
          mean: st.mean,
          scale: st.invstd.map((v, ch) => v * w[ch]!),
          shift: Float64Array.from(b),
        });
        expectClose(output, values(step.expect.outputs![rank]!), TOL.output, `${where}: rank ${rank} output`);
      }
      if (!step.grad_outputs) {
        await checkState(name, step.after, where);
        continue;
      }
      // Backward: each rank's sums about the group mean, the group's sums, then the input gradient.
      const sums = shards.map((s, rank) =>
        s.data.length > 0
          ? referenceGradSums(s.data, float32(step.grad_outputs![rank]!), s.layout, stats[rank]!.mean)
          : { sumDy: new Float64Array(s.layout.c), sumDyXmu: new Float64Array(s.layout.c) },
      );
      if (step.expect.synced) {
        const reduced = await Promise.all(sums.map((s, rank) => clients[rank]!.reduceGrads(name, ref(rank), s)));
        for (const [rank, s] of shards.entries()) {
          if (s.data.length === 0) continue;
          const st = stats[rank]!;
          const total = reduced[rank]!;
          expect(total.count).toBe(step.expect.count);
          const w = state.weight ?? new Float32Array(s.layout.c).fill(1);
          const n = total.count;
          const a = st.invstd.map((v, ch) => v * w[ch]!);
          const gi = referenceGradInput(s.data, float32(step.grad_outputs[rank]!), s.layout, {
            mean: st.mean,
            a,
            b: a.map((v, ch) => (-v * st.invstd[ch]! * st.invstd[ch]! * total.sumDyXmu[ch]!) / n),
            k: a.map((v, ch) => (-v * total.sumDy[ch]!) / n),
          });
          expectClose(gi, values(step.expect.grad_inputs![rank]!), TOL.gradient, `${where}: rank ${rank} grad_input`);
          if (step.expect.grad_weight) {
            const pw = sums[rank]!.sumDyXmu.map((v, ch) => v * st.invstd[ch]!);
            expectClose(pw, values(step.expect.grad_weight[rank]!), TOL.gradient, `${where}: rank ${rank} grad_weight partial`);
            expectClose(sums[rank]!.sumDy, values(step.expect.grad_bias![rank]!), TOL.gradient, `${where}: rank ${rank} grad_bias partial`);
            const totalWeight = total.sumDyXmu.map((v, ch) => v * st.invstd[ch]!);
            expectClose(totalWeight, values(step.expect.grad_weight_total!), TOL.gradient, `${where}: grad_weight total`);
          }
        }
      }
      await checkState(name, step.after, where);
    }
    expect(server.running.coordinator.pending()).toEqual({ steps: 0, waiters: 0 });
  });
});
