/** A real normserve server on an ephemeral loopback port, for integration tests. */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino, type Logger } from 'pino';
import { defaultConfig, type Config } from '../../src/config.js';
import { selectKernels } from '../../src/kernels/select.js';
import { startServer, type RunningServer } from '../../src/server/server.js';

export interface TestServer {
  readonly address: string;
  readonly running: RunningServer;
  stop(): Promise<void>;
}

/** `overrides.store` defaults to a database in a new temporary directory. */
export async function startTestServer(overrides: Partial<Config> = {}, logger: Logger = pino({ level: 'silent' })): Promise<TestServer> {
  const store = overrides.store ?? `sqlite:${mkdtempSync(join(tmpdir(), 'normserve-test-'))}`;
  const config = defaultConfig({ host: '127.0.0.1', port: 0, metricsPort: 0, backend: 'native', ...overrides, store });
  const { kernels } = await selectKernels(config.backend);
  const running = await startServer(config, { kernels, logger });
  return {
    address: `127.0.0.1:${running.port}`,
    running,
    stop: () => running.shutdown(1000),
  };
}
