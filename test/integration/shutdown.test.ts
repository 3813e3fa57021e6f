/** Graceful shutdown of an embedded server: calls in flight finish, new calls are refused, stragglers are cut. */
import { describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import { Status } from '../../src/errors.js';
import { startTestServer } from '../support/server.js';

async function until(condition: () => boolean) {
  while (!condition()) await new Promise((r) => setTimeout(r, 1));
}

describe('shutdown', () => {
  it('lets a call in flight finish within the grace period and refuses new ones', async () => {
    const server = await startTestServer();
    const client = new NormserveClient(server.address);
    const other = new NormserveClient(server.address);
    await client.createModule('held', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const holder = server.running.registry.exclusive('held', () => gate);
    const inflight = client.forward('held', { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) });
    await until(() => server.running.inFlight() === 1);

    const stopped = server.running.shutdown(10_000);
    await expect(other.getModule('held')).rejects.toMatchObject({ code: Status.UNAVAILABLE });
    release();
    await holder;
    const out = await inflight;
    expect(Array.from(out.data).map(Math.round)).toEqual([-1, -1, 1, 1]);
    await stopped;
    client.close();
    other.close();
  });

  it('cancels calls still running when the grace period ends', async () => {
    const server = await startTestServer();
    const client = new NormserveClient(server.address);
    await client.createModule('stuck', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    const holder = server.running.registry.exclusive('stuck', () => new Promise<void>(() => {}));
    void holder;
    const inflight = client.forward('stuck', { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) }).then(
      () => 'completed',
      (err: { code: number }) => err.code,
    );
    await until(() => server.running.inFlight() === 1);
    const started = Date.now();
    await server.running.shutdown(200);
    expect(Date.now() - started).toBeGreaterThanOrEqual(150);
    expect(await inflight).toBe(Status.CANCELLED);
    client.close();
  });
});
