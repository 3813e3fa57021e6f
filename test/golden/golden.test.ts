/**
 * Every golden scenario from PyTorch, run twice: on the module layer (with every compute backend
 * that starts on this machine), and through a real server on an ephemeral port with the client.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import type { Kernels } from '../../src/kernels/kernels.js';
import { moduleHandle, serverHandle } from '../support/executors.js';
import { loadGolden } from '../support/fixtures.js';
import { runScenario } from '../support/run-scenario.js';
import { startTestServer, type TestServer } from '../support/server.js';
import { availableBackends } from '../support/backends.js';

// The sync group runs in test/golden/sync.test.ts: it needs a group of clients.
const all = loadGolden();
const files = all.filter((f) => f.group !== 'sync');

describe('golden fixtures', () => {
  it('cover every group and come from PyTorch 1.13', () => {
    expect(all.map((f) => f.group).sort()).toEqual(
      ['affine-eps', 'backward', 'empty', 'errors', 'flag-flip', 'momentum', 'precision', 'state-dict', 'sync', 'truth-table'].sort(),
    );
    for (const f of all) expect(f.torch_version).toMatch(/^1\.13/);
  });

  it('exercise real forwards in every group, and compare the precision group with float64', () => {
    for (const f of files) {
      const forwards = f.scenarios.flatMap((s) => s.steps).filter((s) => s.op === 'forward' && s.expect.output);
      if (f.group !== 'state-dict') expect(forwards.length, f.group).toBeGreaterThan(5);
      if (f.group === 'precision') {
        for (const s of forwards) expect(s.expect.output_f64, 'every precision forward has a float64 result').toBeDefined();
      }
    }
  });
});

for (const backend of await availableBackends()) {
  describe(`golden scenarios on the module layer, ${backend.label} kernels`, () => {
    let kernels: Kernels;
    beforeAll(async () => {
      kernels = await backend.start();
    });
    afterAll(async () => kernels?.dispose());
    for (const file of files) {
      describe(file.group, () => {
        for (const scenario of file.scenarios) {
          it(scenario.id, async () => runScenario(scenario, moduleHandle(scenario, kernels)));
        }
      });
    }
  });
}

describe('golden scenarios through a real server', () => {
  let server: TestServer;
  let client: NormserveClient;
  beforeAll(async () => {
    server = await startTestServer();
    client = new NormserveClient(server.address);
  });
  afterAll(async () => {
    client?.close();
    await server?.stop();
  });
  for (const file of files) {
    describe(file.group, () => {
      for (const scenario of file.scenarios) {
        it(scenario.id, async () => runScenario(scenario, await serverHandle(scenario, client, `golden/${scenario.id}`)));
      }
    });
  }
});
