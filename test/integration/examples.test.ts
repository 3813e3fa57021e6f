/**
 * The examples in examples/ run as they are, built to dist/examples/, against a real server
 * process: an example that stops working fails here.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runNode, startMain, type Started } from '../support/main-process.js';

let server: Started;
beforeAll(async () => {
  server = await startMain(['--host', '127.0.0.1', '--port', '0', '--backend', 'native']);
});
afterAll(async () => {
  expect(await server.stop()).toBe(0);
});

const run = (name: string) => runNode(`dist/examples/${name}.js`, [], { NORMSERVE_ADDRESS: `127.0.0.1:${server.port}` });

describe('examples', () => {
  it('are all run: the TypeScript ones here, the Python ones by python-client.test.ts (which has the venv)', () => {
    const files = readdirSync('examples').sort();
    expect(files.filter((f) => !f.endsWith('.py'))).toEqual(['sync-ranks.ts', 'train-loop.ts']);
    const python = readFileSync('test/integration/python-client.test.ts', 'utf8');
    for (const f of files.filter((f) => f.endsWith('.py'))) expect(python, f).toContain(`'examples/${f}'`);
  });

  it('train-loop: the loss falls over five SGD steps, then eval leaves the counter at 5', async () => {
    const r = await run('train-loop');
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const losses = [...r.stdout.matchAll(/^step \d: loss ([\d.]+)$/gm)].map((m) => Number(m[1]));
    expect(losses).toHaveLength(5);
    for (let i = 1; i < losses.length; i++) expect(losses[i]).toBeLessThan(losses[i - 1]!);
    expect(r.stdout).toMatch(/^eval: mean output -?[\d.]+, num_batches_tracked 5$/m);
  });

  it('sync-ranks: both ranks sync every step over the 5 samples of the group', async () => {
    const r = await run('sync-ranks');
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const steps = r.stdout.trim().split('\n');
    expect(steps).toHaveLength(3);
    for (const line of steps) expect(line).toMatch(/^step \d: synced=true count=20 mean=\[.+\] grad_weight=\[.+\]$/);
  });
});
