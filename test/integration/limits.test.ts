/** Concurrency limits and cancelled calls, through a real server. */
import { afterEach, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import { Status } from '../../src/errors.js';
import { startTestServer, type TestServer } from '../support/server.js';

let server: TestServer | undefined;
const clients: NormserveClient[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await server?.stop();
  server = undefined;
});

async function until(condition: () => boolean) {
  while (!condition()) await new Promise((r) => setTimeout(r, 1));
}

const x = { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) };

describe('limits', () => {
  it('refuses calls past max_calls_per_module with RESOURCE_EXHAUSTED naming the limit', async () => {
    server = await startTestServer({ maxCallsPerModule: 2 });
    const c = new NormserveClient(server.address);
    clients.push(c);
    await c.createModule('busy', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    await c.createModule('free', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    let release!: () => void;
    const held = server.running.registry.exclusive('busy', () => new Promise<void>((r) => (release = r)));
    const queued = c.forward('busy', x);
    await until(() => server!.running.inFlight() === 1);
    await expect(c.forward('busy', x)).rejects.toMatchObject({
      code: Status.RESOURCE_EXHAUSTED,
      message: "2 calls are queued on module 'busy' already, the limit max_calls_per_module=2; retry later",
    });
    // Other modules are not limited by this one.
    await expect(c.forward('free', x)).resolves.toBeDefined();
    release();
    await held;
    await expect(queued).resolves.toBeDefined();
  });

  it('refuses calls past max_calls with RESOURCE_EXHAUSTED naming the limit', async () => {
    server = await startTestServer({ maxCalls: 2 });
    const c = new NormserveClient(server.address);
    clients.push(c);
    for (const name of ['a', 'b', 'c']) await c.createModule(name, { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    const releases: (() => void)[] = [];
    const held = ['a', 'b'].map((name) => server!.running.registry.exclusive(name, () => new Promise<void>((r) => releases.push(r))));
    const waiting = [c.forward('a', x), c.forward('b', x)];
    await until(() => server!.running.inFlight() === 2);
    await expect(c.forward('c', x)).rejects.toMatchObject({
      code: Status.RESOURCE_EXHAUSTED,
      message: '2 calls are being handled already, the limit max_calls=2; retry later',
    });
    for (const r of releases) r();
    await Promise.all([...held, ...waiting]);
  });

  it('does not run a forward whose deadline passed while it waited for its module', async () => {
    server = await startTestServer();
    const c = new NormserveClient(server.address);
    const hasty = new NormserveClient(server.address, { deadlineMs: 50 });
    clients.push(c, hasty);
    await c.createModule('slow', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    let release!: () => void;
    const held = server.running.registry.exclusive('slow', () => new Promise<void>((r) => (release = r)));
    await expect(hasty.forward('slow', x)).rejects.toMatchObject({ code: Status.DEADLINE_EXCEEDED });
    // The server learns of it from the client's reset of the stream, or from its own deadline timer.
    await new Promise((r) => setTimeout(r, 100));
    release();
    await held;
    await until(() => server!.running.inFlight() === 0);
    // The abandoned forward did not move the counter.
    expect((await c.getModule('slow')).numBatchesTracked).toBe(0n);
  });
});
