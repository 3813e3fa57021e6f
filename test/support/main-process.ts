/**
 * The real program as operators start it (`node dist/src/main.js`, built by `npm test` before
 * vitest runs), in a child process: for the command-line tests and for several replicas on
 * loopback standing in for a StatefulSet's pods.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { expect } from 'vitest';

export { freePorts } from '../../bench/server-process.js';

export const MAIN = 'dist/src/main.js';

/** Each start gets its own SQLite store in a new directory unless the caller gives a store. */
function withDataDir(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  return { NORMSERVE_STORE: `sqlite:${mkdtempSync(join(tmpdir(), 'normserve-cli-'))}`, NORMSERVE_METRICS_PORT: '0', ...process.env, ...env };
}

export interface Started {
  child: ChildProcessWithoutNullStreams;
  /** The JSON log lines so far. */
  lines: Record<string, unknown>[];
  port: number;
  exit: Promise<number | null>;
  /** SIGTERM, then the exit code. */
  stop(): Promise<number | null>;
}

/** Starts `node dist/src/main.js args` and resolves once it logs that it listens. */
export async function startMain(args: string[], env: NodeJS.ProcessEnv = {}, script = MAIN): Promise<Started> {
  expect(existsSync(script), `${script} is built by npm test before vitest runs`).toBe(true);
  const child = spawn(process.execPath, [script, ...args], { env: withDataDir(env) });
  const exit = once(child, 'exit').then(([code]) => code as number | null);
  const lines: Record<string, unknown>[] = [];
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const port = await new Promise<number>((resolve, reject) => {
    createInterface({ input: child.stdout }).on('line', (line) => {
      const entry = JSON.parse(line) as Record<string, unknown>;
      lines.push(entry);
      if (entry.msg === 'normserve listening') resolve(entry.port as number);
    });
    void exit.then((code) => reject(new Error(`exited with ${code} before listening: ${stderr}`)));
    setTimeout(() => reject(new Error(`not listening after 30 s (it logs 'normserve listening' at info): ${stderr}`)), 30_000).unref();
  });
  return {
    child,
    lines,
    port,
    exit,
    stop: () => {
      child.kill('SIGTERM');
      return exit;
    },
  };
}

/** Runs a command to its end: exit code, stdout and stderr. */
export async function runCommand(command: string, args: string[], env: NodeJS.ProcessEnv = process.env) {
  const child = spawn(command, args, { env });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const [code] = await once(child, 'exit');
  return { code: code as number | null, stdout, stderr };
}

/** Runs a node script to its end, with a data directory of its own unless `env` gives one. */
export function runNode(script: string, args: string[], env: NodeJS.ProcessEnv = {}) {
  return runCommand(process.execPath, [script, ...args], withDataDir(env));
}

