/**
 * The Python client (clients/python) against real server processes: installs it the documented
 * way into a fresh virtual environment over Debian's PyTorch and gRPC, then runs its pytest suite,
 * which trains models with local and remote BatchNorm, runs SyncBatchNorm groups as separate
 * processes, and checks that it follows two replicas on a real etcd to each module's owner. The drift tests (tests/test_drift.py) train
 * against a server of every compute backend that starts here. Any pytest failure fails this test
 * with pytest's output.
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Etcd3 } from 'etcd3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { availableBackends } from '../support/backends.js';
import { settled, startEtcd, startReplica, type EtcdServer } from '../support/etcd.js';
import { runCommand, startMain, type Started } from '../support/main-process.js';

/** Debian's interpreter, with python3-torch, python3-grpcio and python3-protobuf (scripts/test-all.sh). */
const PYTHON = '/usr/bin/python3';
const venv = mkdtempSync(join(tmpdir(), 'normserve-pyvenv-'));
const venvPython = join(venv, 'bin', 'python');
const shmDir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'normserve-pyshm-'));

/** A command's exit code and its output, stdout then stderr. */
async function run(command: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number | null; output: string }> {
  const { code, stdout, stderr } = await runCommand(command, args, { ...process.env, PYTHONDONTWRITEBYTECODE: '1', ...env });
  return { code, output: `${stdout}${stderr}` };
}

async function succeed(command: string, args: string[]): Promise<void> {
  const { code, output } = await run(command, args);
  expect(code, `${command} ${args.join(' ')}:\n${output}`).toBe(0);
}

const servers: Started[] = [];
let address: string;
let etcd: EtcdServer;
/** Two replicas that share their modules through etcd. */
let replicas: string[];
/** "name=address" of a server per backend, native first (the single server). */
const backendServers: string[] = [];

beforeAll(async () => {
  await succeed(PYTHON, ['-m', 'venv', '--system-site-packages', venv]);
  // No index: everything the package needs comes from Debian; the build step runs protoc.
  await succeed(venvPython, ['-m', 'pip', 'install', '--no-build-isolation', '--no-deps', '--no-index', '--disable-pip-version-check', '-q', './clients/python']);
  // Messages up to 32 MiB, the client's streaming threshold, so that a larger tensor passes only streamed.
  // Its --shm-dir offers shared memory to the client on this host (test_shared_memory.py).
  const single = await startMain(['--host', '127.0.0.1', '--port', '0', '--backend', 'native', '--max-message-bytes', String(32 * 1024 * 1024), '--shm-dir', shmDir]);
  servers.push(single);
  address = `127.0.0.1:${single.port}`;
  etcd = await startEtcd();
  const cluster = [await startReplica(etcd.endpoint, 'python', 2), await startReplica(etcd.endpoint, 'python', 2)];
  servers.push(...cluster.map((r) => r.process));
  const kv = new Etcd3({ hosts: etcd.endpoint });
  await settled(kv, 'python', cluster);
  kv.close();
  replicas = cluster.map((r) => r.address);
  backendServers.push(`native=${address}`);
  const others = new Set((await availableBackends()).map((b) => b.name).filter((name) => name !== 'native'));
  for (const name of others) {
    const server = await startMain(['--host', '127.0.0.1', '--port', '0', '--backend', name]);
    servers.push(server);
    backendServers.push(`${name}=127.0.0.1:${server.port}`);
  }
}, 180_000);

afterAll(async () => {
  expect(await Promise.all(servers.map((s) => s.stop()))).toEqual(servers.map(() => 0));
  await etcd?.stop();
  rmSync(venv, { recursive: true, force: true });
  rmSync(shmDir, { recursive: true, force: true });
});

describe('the Python client', () => {
  it('passes its pytest suite with real PyTorch', async () => {
    const { code, output } = await run(venvPython, ['-m', 'pytest', 'clients/python/tests', '-q', '-p', 'no:cacheprovider'], {
      NORMSERVE_ADDRESS: address,
      NORMSERVE_REPLICAS: replicas.join(','),
      NORMSERVE_BACKENDS: backendServers.join(','),
    });
    expect(code, `pytest failed:\n${output}`).toBe(0);
    expect(output).toMatch(/\d+ passed/);
    expect(output).not.toMatch(/skipped|xfail/);
  }, 600_000);

  it('runs examples/pytorch_train.py: remote training agrees with local, then the run is deleted', async () => {
    const { code, output } = await run(venvPython, ['examples/pytorch_train.py', '--address', address, '--steps', '4']);
    expect(code, output).toBe(0);
    expect(output).toMatch(/^step 3: loss local \d\.\d{6} remote \d\.\d{6}$/m);
    expect(output).toMatch(/num_batches_tracked 4$/m);
    expect(output).toMatch(/^deleted 2 modules under examples\/pytorch-train\//m);
  }, 120_000);
});
