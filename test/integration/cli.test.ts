/**
 * The real program as operators start it (`node dist/src/main.js`, which `npm start` runs after
 * building): configuration, the start-up log, serving, and a clean exit on SIGTERM and SIGINT
 * with a call in flight.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import { Status } from '../../src/errors.js';
import { channelData } from '../support/data.js';
import { MAIN, runNode, startMain } from '../support/main-process.js';

const run = (args: string[], env: NodeJS.ProcessEnv = {}) => runNode(MAIN, args, env);

describe('normserve command line', () => {
  it('prints its settings for --help', async () => {
    const r = await run(['--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/--port .*NORMSERVE_PORT, default 50051/);
  });

  it('exits 2 with the setting named when a value is bad', async () => {
    const r = await run([], { NORMSERVE_BACKEND: 'tpu' });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/invalid NORMSERVE_BACKEND=tpu/);
  });

  it('exits 1 naming the way out when its metrics port is taken, as by a second server on one host', async () => {
    const first = await startMain(['--port', '0', '--host', '127.0.0.1', '--metrics-port', '0', '--backend', 'native']);
    const taken = first.lines.find((l) => l.msg === 'normserve listening')!.metrics_port as number;
    const data = mkdtempSync(join(tmpdir(), 'normserve-cli-'));
    const r = await run(['--port', '0', '--host', '127.0.0.1', '--metrics-port', String(taken), '--backend', 'native', '--store', `sqlite:${data}`]);
    rmSync(data, { recursive: true, force: true });
    expect(await first.stop()).toBe(0);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`normserve: metrics port ${taken} on 127.0.0.1 is in use (another normserve on this host?): start this one with --metrics-port 0`);
  });

  it('serves on the port it logs, says which backend runs, and exits 0 on SIGTERM under load', async () => {
    const s = await startMain(['--port', '0', '--host', '127.0.0.1'], { NORMSERVE_BACKEND: 'webasm' });
    expect(s.lines.find((l) => l.msg === 'compute backend chosen')).toMatchObject({ backend: 'webasm', requested: 'webasm' });
    const client = new NormserveClient(`127.0.0.1:${s.port}`);
    expect(await client.health()).toBe('SERVING');
    await client.createModule('cli', { kind: 'BATCH_NORM_2D', numFeatures: 8 });
    // Calls keep coming while the server stops: each either completes or is refused as
    // retryable (UNAVAILABLE); none fails any other way.
    const outcomes: (number | 'ok')[] = [];
    const loop = (async () => {
      for (let i = 0; i < 400; i++) {
        try {
          await client.forward('cli', { shape: [4, 8, 4, 4], data: channelData(4, 8, 16, 0, 1, i + 1) });
          outcomes.push('ok');
        } catch (err) {
          outcomes.push((err as { code: number }).code);
          break;
        }
      }
    })();
    while (outcomes.length < 5) await new Promise((r) => setTimeout(r, 2));
    s.child.kill('SIGTERM');
    expect(await s.exit).toBe(0);
    await loop;
    expect(outcomes.filter((o) => o !== 'ok')).toEqual([Status.UNAVAILABLE]);
    expect(s.lines.map((l) => l.msg)).toEqual(expect.arrayContaining(['shutting down', 'stopped']));
    client.close();
  });

  it('exits 0 on SIGINT', async () => {
    const s = await startMain(['--port', '0', '--host', '127.0.0.1', '--backend', 'cpu']);
    s.child.kill('SIGINT');
    expect(await s.exit).toBe(0);
  });

  it('logs why each backend was passed over under auto', async () => {
    const s = await startMain(['--port', '0', '--host', '127.0.0.1']);
    const considered = s.lines.filter((l) => l.msg === 'compute backend passed over' || l.msg === 'compute backend chosen');
    expect(considered[0]!.backend).toBe('webgpu');
    for (const l of considered.slice(0, -1)) expect(typeof l.reason).toBe('string');
    expect(considered.at(-1)!.msg).toBe('compute backend chosen');
    s.child.kill('SIGTERM');
    expect(await s.exit).toBe(0);
  });
});
