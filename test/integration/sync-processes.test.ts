/**
 * A SyncBatchNorm group whose ranks are separate processes, as in a data-parallel job: each child
 * process runs its rank of golden sync scenarios with the built client (dist/), forward and
 * backward, against a real server started by the test; the parent checks every rank's results
 * against PyTorch's BatchNorm over the concatenated batch.
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import { TOL, expectClose } from '../support/compare.js';
import { values } from '../support/fixtures.js';
import { startTestServer, type TestServer } from '../support/server.js';
import { createGroupModule, loadSyncScenarios } from '../support/sync-fixtures.js';

const RANK_SCRIPT = `
import { readFileSync } from 'node:fs';
const [clientModule, address, name, rank, stepsFile] = process.argv.slice(2);
const { NormserveClient } = await import(clientModule);
const steps = JSON.parse(readFileSync(stepsFile, 'utf8'));
const client = new NormserveClient(address);
const b64 = (a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('base64');
const f32 = (t) => { const b = Buffer.from(t.b64, 'base64'); const a = new Float32Array(b.length / 4); new Uint8Array(a.buffer).set(b); return a; };
const results = [];
const world = Number(process.env.WORLD);
for (const s of steps) {
  const ref = { step: s.step, rank: Number(rank), worldSize: world };
  const shard = s.shards[rank];
  const f = await client.syncForward(name, ref, { shape: shard.shape, data: f32(shard) }, { saveForBackward: !!s.grad_outputs });
  const out = { output: b64(f.output.data) };
  if (s.grad_outputs) {
    const g = s.grad_outputs[rank];
    const grads = await client.syncBackward(name, ref, f.contextId, { shape: g.shape, data: f32(g) });
    out.gradInput = b64(grads.gradInput.data);
  }
  results.push(out);
}
client.close();
process.stdout.write(JSON.stringify(results));
`;

const decode = (b64: string) => {
  const b = Buffer.from(b64, 'base64');
  const a = new Float32Array(b.length / 4);
  new Uint8Array(a.buffer).set(b);
  return a;
};

const scenarios = loadSyncScenarios().filter(
  (s) => s.config.world_size >= 2 && s.steps.every((st) => !st.expect.error),
);

let server: TestServer;
let admin: NormserveClient;
const dir = mkdtempSync(join(tmpdir(), 'normserve-ranks-'));
const script = join(dir, 'rank.mjs');

beforeAll(async () => {
  writeFileSync(script, RANK_SCRIPT);
  server = await startTestServer({ stepTimeoutMs: 30_000 });
  admin = new NormserveClient(server.address);
});
afterAll(async () => {
  admin?.close();
  await server?.stop();
});

describe('ranks in separate processes', () => {
  it.each(scenarios.slice(0, 4).map((s) => [s.id, s] as const))('%s', async (id, scenario) => {
    const name = `processes/${id}`;
    const c = scenario.config;
    await createGroupModule(admin, name, scenario);
    // The training steps before the first update (the children run the group's steps in order).
    const firstUpdate = scenario.steps.findIndex((s) => s.op !== 'step');
    const steps = firstUpdate === -1 ? scenario.steps : scenario.steps.slice(0, firstUpdate);
    const stepsFile = join(dir, `${id}.json`);
    writeFileSync(stepsFile, JSON.stringify(steps));
    const clientModule = resolve('dist/src/index.js');
    const children = Array.from({ length: c.world_size }, (_, rank) => {
      const child = spawn(process.execPath, [script, clientModule, server.address, name, String(rank), stepsFile], {
        env: { ...process.env, WORLD: String(c.world_size) },
      });
      let out = '';
      let err = '';
      child.stdout.on('data', (d) => (out += d));
      child.stderr.on('data', (d) => (err += d));
      return once(child, 'exit').then(([code]) => {
        expect(code, `rank ${rank}: ${err}`).toBe(0);
        return JSON.parse(out) as { output: string; gradInput?: string }[];
      });
    });
    const results = await Promise.all(children);
    expect(steps.length).toBeGreaterThan(0);
    for (const [i, step] of steps.entries()) {
      for (let rank = 0; rank < c.world_size; rank++) {
        const r = results[rank]![i]!;
        expectClose(decode(r.output), values(step.expect.outputs![rank]!), TOL.output, `${id} step ${i} rank ${rank} output`);
        if (step.expect.grad_inputs) expectClose(decode(r.gradInput!), values(step.expect.grad_inputs[rank]!), TOL.gradient, `${id} step ${i} rank ${rank} grad_input`);
      }
    }
    expect(server.running.coordinator.pending()).toEqual({ steps: 0, waiters: 0 });
  });
});
