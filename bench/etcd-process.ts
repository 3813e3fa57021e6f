/**
 * A real etcd (Debian's etcd-server, `etcd` on the PATH; scripts/test-all.sh installs it) on
 * loopback ports of its own, with a data directory of its own, for the benchmarks and for tests of
 * replicas that share their modules through it. It can be killed and started again on the same
 * data, as an outage.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePorts } from './server-process.js';

export interface EtcdServer {
  /** host:port of its client URL. */
  readonly endpoint: string;
  readonly dataDir: string;
  /** Kills it (SIGKILL by default) and waits for the exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Starts it again on the same ports and data, once killed; resolves when it is healthy. */
  restart(): Promise<void>;
  /** Kills it and removes its data. */
  stop(): Promise<void>;
}

const ETCD = process.env.NORMSERVE_TEST_ETCD ?? 'etcd';

async function healthy(endpoint: string, child: ChildProcess, log: () => string): Promise<void> {
  const until = Date.now() + 20_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`etcd exited with ${child.exitCode} before it was healthy:\n${log()}`);
    try {
      const res = await fetch(`http://${endpoint}/health`);
      if (res.ok && ((await res.json()) as { health?: string }).health === 'true') return;
    } catch {
      // Not listening yet.
    }
    if (Date.now() > until) throw new Error(`etcd at ${endpoint} did not become healthy in 20 s:\n${log()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Starts a one-member etcd; fails with what to install when there is no etcd binary. */
export async function startEtcd(): Promise<EtcdServer> {
  const [client, peer] = await freePorts(2);
  const dataDir = mkdtempSync(join(tmpdir(), 'normserve-etcd-'));
  const endpoint = `127.0.0.1:${client}`;
  const args = [
    '--name', 'test',
    '--data-dir', join(dataDir, 'member'),
    '--listen-client-urls', `http://${endpoint}`,
    '--advertise-client-urls', `http://${endpoint}`,
    '--listen-peer-urls', `http://127.0.0.1:${peer}`,
    '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`,
    '--initial-cluster', `test=http://127.0.0.1:${peer}`,
    '--log-level', 'warn',
  ];
  let child: ChildProcess;
  let output = '';
  const launch = async () => {
    output = '';
    child = spawn(ETCD, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout!.on('data', (d) => (output += d));
    child.stderr!.on('data', (d) => (output += d));
    const error = once(child, 'error').then(([err]) => {
      throw new Error(`cannot run ${ETCD} (${(err as Error).message}): install Debian's etcd-server (scripts/test-all.sh does)`);
    });
    await Promise.race([healthy(endpoint, child, () => output), error]);
  };
  await launch();
  const kill = async (signal: NodeJS.Signals = 'SIGKILL') => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = once(child, 'exit');
    child.kill(signal);
    await exited;
  };
  return {
    endpoint,
    dataDir,
    kill,
    restart: launch,
    stop: async () => {
      await kill();
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

