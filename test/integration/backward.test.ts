/**
 * Backward through a real server: saved contexts, their lifetime and budget, and the errors that
 * say why a context is gone. (Gradient values are checked against PyTorch by the golden tests.)
 */
import { afterEach, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import type { Config } from '../../src/config.js';
import { Status } from '../../src/errors.js';
import { channelData } from '../support/data.js';
import { capturedLogger } from '../support/log-capture.js';
import { startTestServer, type TestServer } from '../support/server.js';

let server: TestServer | undefined;
let client: NormserveClient | undefined;
let logs: Record<string, unknown>[] = [];

async function start(overrides: Partial<Config> = {}) {
  const captured = capturedLogger('warn');
  server = await startTestServer(overrides, captured.logger);
  logs = captured.lines;
  client = new NormserveClient(server.address);
  await client.createModule('bn', { kind: 'BATCH_NORM_2D', numFeatures: 4 });
  return client;
}

afterEach(async () => {
  client?.close();
  await server?.stop();
  client = undefined;
  server = undefined;
  logs.length = 0;
});

const x = (seed = 1) => ({ shape: [2, 4, 3, 3], data: channelData(2, 4, 9, 1, 2, seed) });

describe('Backward', () => {
  it('answers a context only when asked to save, and uses it once by default', async () => {
    const c = await start();
    expect((await c.forward('bn', x())).contextId).toBe('');
    const { contextId } = await c.forward('bn', x(), { saveForBackward: true });
    expect(contextId).toMatch(/^[0-9a-f-]{36}$/);
    const g = await c.backward('bn', contextId, x(2));
    expect(g.gradInput.shape).toEqual([2, 4, 3, 3]);
    expect(g.gradWeight).toHaveLength(4);
    expect(g.gradBias).toHaveLength(4);
    await expect(c.backward('bn', contextId, x(2))).rejects.toMatchObject({
      code: Status.NOT_FOUND,
      reason: 'BN_ERR_CONTEXT_NOT_FOUND',
      message: expect.stringMatching(/a Backward already used it \(set retain_context/),
    });
  });

  it('keeps a context with retain_context, and gives the same gradients again', async () => {
    const c = await start();
    const { contextId } = await c.forward('bn', x(), { saveForBackward: true });
    const first = await c.backward('bn', contextId, x(3), { retainContext: true });
    const second = await c.backward('bn', contextId, x(3));
    expect(second).toEqual(first);
  });

  it('uses the weight as it was at the forward, as autograd does', async () => {
    const c = await start();
    const { contextId } = await c.forward('bn', x(), { saveForBackward: true });
    const before = await c.backward('bn', contextId, x(3), { retainContext: true });
    await c.loadState('bn', { weight: Float32Array.of(9, 9, 9, 9) }, { strict: false });
    expect(await c.backward('bn', contextId, x(3))).toEqual(before);
  });

  it('says why a context is not there', async () => {
    const c = await start();
    await c.createModule('other', { kind: 'BATCH_NORM_2D', numFeatures: 4 });
    await expect(c.backward('bn', 'f00dfeed', x())).rejects.toThrow(/context f00dfeed: no forward saved this context/);
    const { contextId } = await c.forward('other', x(), { saveForBackward: true });
    await expect(c.backward('bn', contextId, x())).rejects.toThrow(/it belongs to module 'other', not 'bn'/);
    await c.deleteModule('other');
    await c.createModule('other', { kind: 'BATCH_NORM_2D', numFeatures: 4 });
    await expect(c.backward('other', contextId, x())).rejects.toThrow(/module 'other' was deleted/);
  });

  it('refuses a grad_output of the wrong shape and keeps the context', async () => {
    const c = await start();
    const { contextId } = await c.forward('bn', x(), { saveForBackward: true });
    await expect(c.backward('bn', contextId, { shape: [2, 4, 3, 2], data: new Float32Array(48) })).rejects.toMatchObject({
      code: Status.INVALID_ARGUMENT,
      pythonType: 'RuntimeError',
      message:
        'Mismatch in shape: grad_output[0] has a shape of torch.Size([2, 4, 3, 2]) and output[0] has a shape of torch.Size([2, 4, 3, 3]).',
    });
    await expect(c.backward('bn', contextId, x(2))).resolves.toBeDefined();
  });

  it('evicts the oldest contexts past the byte budget, reports it, and says so', async () => {
    // Each context holds 72 floats of input plus 80 bytes of statistics: 368 bytes.
    const c = await start({ contextBudgetBytes: 800 });
    const first = await c.forward('bn', x(1), { saveForBackward: true });
    const second = await c.forward('bn', x(2), { saveForBackward: true });
    const third = await c.forward('bn', x(3), { saveForBackward: true });
    expect(server!.running.contexts.bytes).toBeLessThanOrEqual(800);
    await expect(c.backward('bn', first.contextId, x())).rejects.toThrow(/evicted to keep saved contexts within context_budget_bytes=800/);
    await c.backward('bn', second.contextId, x());
    await c.backward('bn', third.contextId, x());
    expect(logs.find((l) => l.msg === 'saved context dropped before its backward')).toMatchObject({
      module: 'bn',
      context_id: first.contextId,
      reason: 'evicted',
    });
  });

  it('refuses, before any work, a context larger than the whole budget', async () => {
    const c = await start({ contextBudgetBytes: 100 });
    const before = await c.getModule('bn');
    await expect(c.forward('bn', x(), { saveForBackward: true })).rejects.toMatchObject({
      code: Status.RESOURCE_EXHAUSTED,
      message: expect.stringMatching(/over the limit context_budget_bytes=100/),
    });
    expect(await c.getModule('bn')).toEqual(before);
  });

  it('expires contexts after their time-to-live', async () => {
    const c = await start({ contextTtlMs: 50 });
    const { contextId } = await c.forward('bn', x(), { saveForBackward: true });
    await new Promise((r) => setTimeout(r, 120));
    await expect(c.backward('bn', contextId, x())).rejects.toThrow(/it expired: contexts live context_ttl_ms=50 ms/);
    expect(server!.running.contexts.size).toBe(0);
  });

  it('gives no parameter gradients for a module that is not affine', async () => {
    const c = await start();
    await c.createModule('plain', { kind: 'BATCH_NORM_1D', numFeatures: 2, affine: false });
    const { contextId } = await c.forward('plain', { shape: [3, 2], data: Float32Array.of(1, 2, 3, 5, 8, 13) }, { saveForBackward: true });
    const g = await c.backward('plain', contextId, { shape: [3, 2], data: Float32Array.of(1, 0, 0, 1, -1, 1) });
    expect(g.gradWeight).toBeNull();
    expect(g.gradBias).toBeNull();
  });
});
