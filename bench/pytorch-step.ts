/**
 * `npm run bench` (fifth part): what a PyTorch user pays per training step (issue 15).
 * torchvision's resnet18 (weights=None, 16 x 3 x 64 x 64, SGD with momentum) trained with
 * PyTorch's BatchNorm and, on deep copies, after `convert_remote_batchnorm` with a client over
 * the wire and one over shared memory, steps alternating, against the real server
 * (`dist/src/main.js --backend native --shm-dir <a fresh directory>`) on this machine; medians,
 * the ratios, and the calls and message bytes of one remote step (bench/pytorch_step.py does the
 * training); then resnet18 on 2 rank processes with statistics-only RemoteSyncBatchNorm against
 * local BatchNorm on the joined batch (bench/pytorch_sync_step.py). The Python client is installed the documented way into a fresh virtual environment
 * over Debian's PyTorch, torchvision and gRPC (python3-torch, python3-torchvision, python3-grpcio).
 */
import { spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { startServerProcess } from './server-process.js';

const QUICK = process.argv.includes('--quick');
const log = (text: string) => process.stderr.write(`${text}\n`);

function run(command: string, args: string[]): string {
  const r = spawnSync(command, args, { encoding: 'utf8', env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' }, maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`${command} ${args.join(' ')} exited with ${r.status}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

interface Remote {
  ms: number;
  ratio: number;
  calls_per_step: number;
  message_bytes_per_step: number;
  shared_memory: string | null;
}

interface SyncStep {
  ranks: number;
  local_joined_ms: number;
  local_shard_ms: number;
  group_ms: number;
  ratio_to_joined: number;
  calls_per_rank_step: number;
  message_bytes_per_rank_step: number;
  torch_threads_local: number;
}

interface Step {
  local_ms: number;
  remote: { wire: Remote; shm: Remote };
  batch_norms: number;
  torch_threads: number;
}

async function main() {
  const venv = mkdtempSync(join(tmpdir(), 'normserve-bench-venv-'));
  const shmDir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'normserve-bench-shm-'));
  const server = await startServerProcess(['--backend', 'native', '--shm-dir', shmDir]);
  try {
    log('pytorch-step: installing the Python client into a virtual environment');
    run('/usr/bin/python3', ['-m', 'venv', '--system-site-packages', venv]);
    run(join(venv, 'bin', 'python'), ['-m', 'pip', 'install', '--no-build-isolation', '--no-deps', '--no-index', '--disable-pip-version-check', '-q', './clients/python']);
    log(`pytorch-step: resnet18, local and remote steps alternating, against ${server.address}`);
    const steps = QUICK ? 3 : 12;
    const out = run(join(venv, 'bin', 'python'), ['bench/pytorch_step.py', '--address', server.address, '--metrics', `http://127.0.0.1:${server.metricsPort}/metrics`, '--steps', String(steps)]);

    const r = JSON.parse(out) as Step;
    const machine = `${cpus().length} x ${cpus()[0]?.model ?? 'cpu'}, Node ${process.version}`;
    if (r.remote.shm.shared_memory === null) throw new Error('the shared-memory client fell back to the wire: the server offered no region it could use');
    console.log(`\nA PyTorch training step, resnet18 (16,3,64,64) with ${r.batch_norms} BatchNorm2d, local BatchNorm vs normserve (native backend), medians of ${steps}; ${machine}, torch threads ${r.torch_threads}`);
    console.log('| step | ms | ÷ local | calls per step | tensor MB in messages per step |');
    console.log('|------|----|---------|----------------|--------------------------------|');
    console.log(`| local BatchNorm | ${r.local_ms.toFixed(1)} | 1.00 | 0 | 0 |`);
    for (const [label, x] of [['remote, over gRPC messages', r.remote.wire], ['remote, over shared memory', r.remote.shm]] as const) {
      console.log(`| ${label} | ${x.ms.toFixed(1)} | ${x.ratio.toFixed(2)} | ${x.calls_per_step.toFixed(0)} | ${(x.message_bytes_per_step / 1e6).toFixed(1)} |`);
    }
    log('pytorch-step: resnet18 on 2 rank processes, statistics-only RemoteSyncBatchNorm, against local BatchNorm');
    const metrics = `http://127.0.0.1:${server.metricsPort}/metrics`;
    const sync = JSON.parse(run(join(venv, 'bin', 'python'), ['bench/pytorch_sync_step.py', '--address', server.address, '--metrics', metrics, '--ranks', '2', '--steps', String(steps)])) as SyncStep;
    console.log(`\nData parallel: resnet18, ${sync.ranks} rank processes of 16 samples each (1 torch thread each), statistics-only RemoteSyncBatchNorm, against local BatchNorm in one process (${sync.torch_threads_local} torch thread(s)), medians of ${steps}`);
    console.log('| step | ms | ÷ local, joined batch | calls per rank step | tensor KB in messages per rank step |');
    console.log('|------|----|-----------------------|---------------------|--------------------------------------|');
    console.log(`| local BatchNorm, joined batch of ${16 * sync.ranks} | ${sync.local_joined_ms.toFixed(1)} | 1.00 | 0 | 0 |`);
    console.log(`| local BatchNorm, one shard of 16 | ${sync.local_shard_ms.toFixed(1)} | ${(sync.local_shard_ms / sync.local_joined_ms).toFixed(2)} | 0 | 0 |`);
    console.log(`| ${sync.ranks} ranks, statistics only (the slowest rank per step) | ${sync.group_ms.toFixed(1)} | ${sync.ratio_to_joined.toFixed(2)} | ${sync.calls_per_rank_step.toFixed(0)} | ${(sync.message_bytes_per_rank_step / 1e3).toFixed(1)} |`);
    mkdirSync('bench-results', { recursive: true });
    writeFileSync('bench-results/pytorch-step.json', `${JSON.stringify({ machine, date: new Date().toISOString(), quick: QUICK, steps, resnet18: r, sync }, null, 2)}\n`);
  } finally {
    server.child.kill('SIGTERM');
    await once(server.child, 'exit');
    rmSync(venv, { recursive: true, force: true });
    rmSync(shmDir, { recursive: true, force: true });
  }
}

await main();
