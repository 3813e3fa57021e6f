/** Graceful shutdown of an embedded server: calls in flight finish, new calls are refused, stragglers are cut. */
import { credentials, makeGenericClientConstructor, type ClientReadableStream } from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
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

  it('turns health to NOT_SERVING for watchers as soon as it begins', async () => {
    const server = await startTestServer();
    const Health = makeGenericClientConstructor(healthService as never, 'Health');
    const health = new Health(server.address, credentials.createInsecure()) as unknown as {
      Watch(request: { service: string }): ClientReadableStream<{ status: string }>;
      close(): void;
    };
    const watch = health.Watch({ service: 'normserve.v1.BatchNormService' });
    const seen: string[] = [];
    const notServing = new Promise<void>((resolve) => {
      watch.on('data', (r) => {
        seen.push(r.status);
        if (r.status === 'NOT_SERVING') resolve();
      });
    });
    watch.on('error', () => {});
    while (seen.length === 0) await new Promise((r) => setTimeout(r, 2));
    const stopped = server.running.shutdown(2000);
    await notServing;
    expect(seen).toEqual(['SERVING', 'NOT_SERVING']);
    watch.cancel();
    health.close();
    await stopped;
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
