/** The Prometheus endpoint and request ids, through a real server. */
import { credentials, Metadata, type ServiceError } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NormserveClient } from '../../src/client/client.js';
import { SharedMemoryFile } from '../../src/client/shared-memory.js';
import type { BatchNormServiceClient } from '../../src/generated/normserve/v1/BatchNormService.js';
import { grpcObject } from '../../src/wire/proto.js';
import { channelData } from '../support/data.js';
import { capturedLogger } from '../support/log-capture.js';
import { startTestServer, type TestServer } from '../support/server.js';

let server: TestServer;
let client: NormserveClient;
let logs: Record<string, unknown>[] = [];

beforeAll(async () => {
  const captured = capturedLogger('info');
  server = await startTestServer({}, captured.logger);
  logs = captured.lines;
  client = new NormserveClient(server.address);
});
afterAll(async () => {
  client?.close();
  await server?.stop();
});

async function scrape(): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${server.running.metricsPort}/metrics`);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/^text\/plain/);
  return res.text();
}

/** The value of one sample, e.g. value(text, 'normserve_modules'), or undefined. */
function value(text: string, sample: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${sample} `));
  return line === undefined ? undefined : Number(line.slice(sample.length + 1));
}

describe('metrics', () => {
  it('show stream reservations back at zero after a stream, tensors pooled for reuse, and registered regions', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'normserve-metrics-shm-'));
    const other = await startTestServer({ shmDir: dir });
    const c = new NormserveClient(other.address);
    try {
      await c.createModule('big', { kind: 'BATCH_NORM_2D', numFeatures: 8 });
      // 131072 values: over the native backend's threshold, so its tensors are pooled.
      const x = { shape: [4, 8, 64, 64], data: channelData(4, 8, 4096, 0, 1, 3) };
      await c.forward('big', x, { transport: 'stream' });
      await c.forward('big', x, { transport: 'unary' });
      const file = SharedMemoryFile.create(join(dir, 'r'), 64);
      await c.registerRegion('r', file.path, 64);
      const res = await fetch(`http://127.0.0.1:${other.running.metricsPort}/metrics`);
      const text = await res.text();
      expect(value(text, 'normserve_stream_reserved_bytes')).toBe(0);
      expect(value(text, 'normserve_pooled_tensor_bytes')).toBeGreaterThanOrEqual(x.data.byteLength);
      expect(value(text, 'normserve_shm_regions')).toBe(1);
      file.close();
    } finally {
      c.close();
      await other.stop();
    }
  });

  it('count calls by method and status, with latency, bytes, kernel time, modules, contexts and store writes', async () => {
    await client.createModule('m', { kind: 'BATCH_NORM_2D', numFeatures: 3 });
    const f = await client.forward('m', { shape: [2, 3, 2, 2], data: channelData(2, 3, 4, 0, 1) }, { saveForBackward: true });
    await expect(client.forward('m', { shape: [2, 3], data: new Float32Array(6) })).rejects.toThrow();
    let text = await scrape();
    const forward = '/normserve.v1.BatchNormService/Forward';
    expect(value(text, `normserve_grpc_calls_total{method="${forward}",code="OK"}`)).toBe(1);
    expect(value(text, `normserve_grpc_calls_total{method="${forward}",code="INVALID_ARGUMENT"}`)).toBe(1);
    expect(value(text, `normserve_grpc_call_duration_seconds_count{method="${forward}"}`)).toBe(2);
    expect(value(text, `normserve_grpc_received_bytes_total{method="${forward}"}`)).toBe(96 + 24);
    expect(value(text, `normserve_grpc_sent_bytes_total{method="${forward}"}`)).toBe(96);
    // The native backend runs a training forward as one fused pass.
    expect(value(text, 'normserve_kernel_seconds_count{backend="native",kernel="trainForward"}')).toBe(1);
    expect(value(text, 'normserve_kernel_seconds_count{backend="native",kernel="stats"}')).toBeUndefined();
    expect(value(text, 'normserve_modules')).toBe(1);
    expect(value(text, 'normserve_saved_contexts')).toBe(1);
    expect(value(text, 'normserve_saved_context_bytes')).toBe(96 + 3 * 20);
    expect(value(text, 'normserve_store_write_seconds_count')).toBeGreaterThanOrEqual(2);
    expect(text).toMatch(/^process_cpu_user_seconds_total /m);
    await client.backward('m', f.contextId, { shape: [2, 3, 2, 2], data: channelData(2, 3, 4, 0, 1, 2) });
    text = await scrape();
    expect(value(text, 'normserve_saved_contexts')).toBe(0);
    expect(value(text, 'normserve_kernel_seconds_count{backend="native",kernel="backward"}')).toBe(1);
  });

  it('time the periodic syncs of process durability, which come only after writes', async () => {
    const other = await startTestServer({ durability: 'process', checkpointMs: 20 });
    const c = new NormserveClient(other.address);
    const at = (text: string) => value(text, 'normserve_store_sync_seconds_count') ?? 0;
    const scrapeOther = async () => (await fetch(`http://127.0.0.1:${other.running.metricsPort}/metrics`)).text();
    try {
      await c.createModule('p', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
      await c.forward('p', { shape: [3, 2], data: channelData(3, 2, 1, 0, 1) });
      let text = await scrapeOther();
      expect(value(text, 'normserve_store_write_seconds_count')).toBe(2);
      const deadline = Date.now() + 5000;
      while (at(text) === 0 && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 20));
        text = await scrapeOther();
      }
      expect(at(text)).toBeGreaterThanOrEqual(1);
      // At most one more (the two writes may straddle an interval); after that, with nothing
      // written, the count stays.
      await new Promise((r) => setTimeout(r, 100));
      const synced = at(await scrapeOther());
      expect(synced).toBeLessThanOrEqual(2);
      await new Promise((r) => setTimeout(r, 150));
      expect(at(await scrapeOther())).toBe(synced);
    } finally {
      c.close();
      await other.stop();
    }
  });

  it('show pending group steps and waiting calls, back to zero when the step completes', async () => {
    await client.createModule('g', { kind: 'SYNC_BATCH_NORM', numFeatures: 2, worldSize: 2 });
    const stats = { count: 2, mean: [0, 0], var: [1, 1] };
    const first = client.gatherStats('g', { step: 0, rank: 0, worldSize: 2 }, stats);
    while (server.running.coordinator.pending().waiters === 0) await new Promise((r) => setTimeout(r, 2));
    let text = await scrape();
    expect(value(text, 'normserve_sync_pending_steps')).toBe(1);
    expect(value(text, 'normserve_sync_waiting_calls')).toBe(1);
    await Promise.all([first, client.gatherStats('g', { step: 0, rank: 1, worldSize: 2 }, stats)]);
    text = await scrape();
    expect(value(text, 'normserve_sync_pending_steps')).toBe(0);
    expect(value(text, 'normserve_sync_waiting_calls')).toBe(0);
  });

  it('answers 404 off /metrics', async () => {
    const res = await fetch(`http://127.0.0.1:${server.running.metricsPort}/`);
    expect(res.status).toBe(404);
  });
});

describe('request ids', () => {
  let stub: BatchNormServiceClient;
  beforeAll(() => {
    stub = new grpcObject.normserve.v1.BatchNormService(server.address, credentials.createInsecure());
  });
  afterAll(() => stub.close());

  it("take the client's x-request-id, log it, and send it back in headers and trailers", async () => {
    const metadata = new Metadata();
    metadata.set('x-request-id', 'trainer-7.step-42');
    const headers = await new Promise<Metadata>((resolve, reject) => {
      const call = stub.GetModule({ name: 'm' }, metadata, (err) => err && reject(err));
      call.on('metadata', resolve);
    });
    expect(headers.get('x-request-id')).toEqual(['trainer-7.step-42']);
    expect(logs.find((l) => l.request_id === 'trainer-7.step-42')).toMatchObject({ method: '/normserve.v1.BatchNormService/GetModule', status: 'OK' });
  });

  it('make one up when the client sends none, and return it with errors too', async () => {
    const err = await new Promise<ServiceError>((resolve) => stub.GetModule({ name: 'missing' }, (e) => resolve(e!)));
    const [id] = err.metadata.get('x-request-id');
    expect(id).toMatch(/^[0-9a-f-]{36}$/);
    expect(logs.find((l) => l.request_id === id)).toMatchObject({ status: 'NOT_FOUND', module: 'missing' });
  });
});
