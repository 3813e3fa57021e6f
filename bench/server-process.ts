/**
 * The real program as a child process (`node dist/src/main.js`, after `npm run build`), on
 * 127.0.0.1 with free ports and, unless the arguments name a --store, an SQLite store in a data
 * directory of its own.
 * Resolves once it listens. Used by the benchmarks and by tests that kill and restart it.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer } from 'node:net';
import { once } from 'node:events';
import { createInterface } from 'node:readline';

export interface ServerProcess {
  readonly child: ChildProcessWithoutNullStreams;
  readonly address: string;
  /** The Prometheus endpoint's port (0: none). */
  readonly metricsPort: number;
  readonly dataDir: string;
}

export async function startServerProcess(args: readonly string[] = [], dataDir = mkdtempSync(join(tmpdir(), 'normserve-'))): Promise<ServerProcess> {
  const store = args.includes('--store') ? [] : ['--store', `sqlite:${dataDir}`];
  const child = spawn(process.execPath, ['dist/src/main.js', '--host', '127.0.0.1', '--port', '0', '--metrics-port', '0', ...store, ...args]);
  child.stderr.resume();
  const [port, metricsPort] = await new Promise<[number, number]>((resolve, reject) => {
    // Every line is read: the per-call log goes to this pipe, and an unread pipe would block it.
    createInterface({ input: child.stdout }).on('line', (line) => {
      const entry = JSON.parse(line) as { msg?: string; port?: number; metrics_port?: number };
      if (entry.msg === 'normserve listening') resolve([entry.port!, entry.metrics_port ?? 0]);
    });
    child.once('exit', (code) => reject(new Error(`normserve exited with ${code} before listening`)));
    // 'normserve listening' is logged at info: a --log-level above it would leave this waiting.
    setTimeout(() => reject(new Error("normserve did not log 'normserve listening' within 30 s")), 30_000).unref();
  });
  return { child, address: `127.0.0.1:${port}`, metricsPort, dataDir };
}

/** `n` loopback ports that were free a moment ago (for replicas that must know each other's address before they start). */
export async function freePorts(n: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from({ length: n }, async () => {
      const s = createServer();
      s.listen(0, '127.0.0.1');
      await once(s, 'listening');
      return s;
    }),
  );
  const ports = servers.map((s) => (s.address() as { port: number }).port);
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}
