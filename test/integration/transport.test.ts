/**
 * The HTTP/2 windows: the server advertises the configured stream window in its SETTINGS and
 * opens the connection window with a WINDOW_UPDATE (grpc-js 1.14 has no option for either).
 */
import { readFileSync } from 'node:fs';
import { connect, type ClientHttp2Session } from 'node:http2';
import { afterEach, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import type { Config } from '../../src/config.js';
import { until } from '../support/until.js';
import { startTestServer, type TestServer } from '../support/server.js';

let server: TestServer | undefined;
let session: ClientHttp2Session | undefined;
afterEach(async () => {
  session?.destroy();
  await server?.stop();
  server = undefined;
});

/** The server's SETTINGS, and the connection window it grants this client, once they arrive. */
async function windows(overrides: Partial<Config>): Promise<{ stream: number | undefined; connection: number | undefined }> {
  server = await startTestServer(overrides);
  session = connect(`http://${server.address}`);
  await new Promise<void>((resolve) => session!.once('remoteSettings', () => resolve()));
  // The WINDOW_UPDATE follows the SETTINGS; give it a round trip.
  await new Promise<void>((resolve) => session!.ping(() => resolve()));
  return { stream: session.remoteSettings.initialWindowSize, connection: session.state.remoteWindowSize };
}

describe('HTTP/2 flow control', () => {
  it('opens 16 MiB windows by default', async () => {
    const w = await windows({});
    expect(w.stream).toBe(16 * 1024 * 1024);
    expect(w.connection).toBe(16 * 1024 * 1024);
  });

  it('follows --flow-control-window', async () => {
    const w = await windows({ flowControlWindow: 4 * 1024 * 1024 });
    expect(w.stream).toBe(4 * 1024 * 1024);
    expect(w.connection).toBe(4 * 1024 * 1024);
  });

  it("keeps HTTP/2's own 65535 when asked to", async () => {
    const w = await windows({ flowControlWindow: 65_535 });
    expect(w.stream).toBe(65_535);
    expect(w.connection).toBe(65_535);
  });
});

/** Established TCP connections on this machine whose remote end is 127.0.0.1:`port` (the clients' ends). */
function clientConnections(port: number): number {
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  return readFileSync('/proc/net/tcp', 'utf8')
    .split('\n')
    .slice(1)
    .map((line) => line.trim().split(/\s+/))
    .filter((f) => f[2] === `0100007F:${hexPort}` && f[3] === '01').length;
}

describe('connections', () => {
  it('gives each NormserveClient a connection of its own (two Node.js ends with large windows deadlock on a shared one)', async () => {
    server = await startTestServer({});
    const port = server.running.port;
    const clients = [new NormserveClient(server.address), new NormserveClient(server.address), new NormserveClient(server.address)];
    try {
      await Promise.all(clients.map((c) => c.listModules()));
      expect(clientConnections(port)).toBe(3);
    } finally {
      for (const c of clients) c.close();
    }
  });

  it('runs overlapping large calls of one NormserveClient on connections of their own, which one shared connection deadlocks on', async () => {
    // 16 callers of one client, each making 8 MiB Forwards back to back: on one connection, both
    // ends reach a pending write with the other's unread (with every call on one connection this
    // test timed out in 2 of 2 runs, a script of the same in 6 of 6).
    server = await startTestServer({});
    const port = server.running.port;
    const client = new NormserveClient(server.address, { deadlineMs: 30_000, retry: false });
    const callers = 16;
    const batch = 2048; // (2048, 16, 8, 8) float32: 8 MiB
    try {
      await client.createModule('m', { kind: 'BATCH_NORM_2D', numFeatures: 16 });
      await client.eval('m');
      const input = new Float32Array(batch * 16 * 64);
      for (let i = 0; i < input.length; i++) input[i] = i % 7;
      let peak = 0;
      await Promise.all(
        Array.from({ length: callers }, async () => {
          for (let round = 0; round < 4; round++) {
            const out = await client.forward('m', { shape: [batch, 16, 8, 8], data: input });
            peak = Math.max(peak, clientConnections(port));
            // Eval with fresh running statistics: (x - 0) / sqrt(1 + eps).
            expect(out.data[6]).toBeCloseTo(6 / Math.sqrt(1 + 1e-5), 5);
          }
        }),
      );
      expect(peak).toBeGreaterThan(1);
      expect(peak).toBeLessThanOrEqual(callers);
      // Calls one after another reuse what is open.
      const open = clientConnections(port);
      for (let i = 0; i < 5; i++) await client.forward('m', { shape: [batch, 16, 8, 8], data: input });
      await client.getModule('m');
      expect(clientConnections(port)).toBe(open);
    } finally {
      await client.close();
    }
  }, 60_000);

  it("lets grpc-js close the connections of a burst once they sit idle, and opens them again", async () => {
    server = await startTestServer({});
    const port = server.running.port;
    const client = new NormserveClient(server.address, { retry: false, channelOptions: { 'grpc.client_idle_timeout_ms': 1000 } });
    const input = { shape: [64, 16, 8, 8], data: new Float32Array(64 * 16 * 64).fill(1) }; // 256 KiB
    try {
      await client.createModule('m', { kind: 'BATCH_NORM_2D', numFeatures: 16 });
      await Promise.all(Array.from({ length: 4 }, () => client.forward('m', input)));
      expect(clientConnections(port)).toBeGreaterThan(1);
      // The channel goes idle after 1 s; grpc-js's subchannel pool drops the connection within 10 s more.
      await until(() => clientConnections(port) === 0, 20_000, 'the idle connections to close');
      expect(clientConnections(port)).toBe(0);
      const out = await client.forward('m', input);
      expect(out.data.length).toBe(input.data.length);
    } finally {
      await client.close();
    }
  }, 40_000);
});
