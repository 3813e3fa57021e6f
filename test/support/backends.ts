/**
 * The compute backends that start on this machine, for tests that run on each of them. A backend
 * that cannot start is reported on stderr and left out, unless NORMSERVE_REQUIRE_BACKENDS (a
 * comma-separated list; .ci/run sets it) names it: then its absence fails the suite.
 */
import { BACKEND_NAMES, type BackendName, type Kernels } from '../../src/kernels/kernels.js';
import { availableParallelism } from 'node:os';
import { NativeKernels } from '../../src/kernels/native/native-kernels.js';
import { startBackend } from '../../src/kernels/select.js';

export interface TestBackend {
  readonly name: BackendName;
  /** The name in test titles (a backend can appear twice, in two configurations). */
  readonly label: string;
  start(): Promise<Kernels>;
}

let cached: Promise<TestBackend[]> | undefined;

export function requiredBackends(): BackendName[] {
  const list = (process.env.NORMSERVE_REQUIRE_BACKENDS ?? '').split(',').map((s) => s.trim()).filter(Boolean);
  for (const name of list) {
    if (!(BACKEND_NAMES as readonly string[]).includes(name)) throw new Error(`NORMSERVE_REQUIRE_BACKENDS names an unknown backend: ${name}`);
  }
  return list as BackendName[];
}

/** Probes every backend once per test file (each probe starts and disposes it). */
export function availableBackends(): Promise<TestBackend[]> {
  cached ??= (async () => {
    const required = requiredBackends();
    const found: TestBackend[] = [];
    const missing: string[] = [];
    for (const name of BACKEND_NAMES) {
      try {
        const kernels = await startBackend(name);
        await kernels.dispose();
        found.push({ name, label: name, start: () => startBackend(name) });
        if (name === 'native') {
          // Small test tensors stay on one thread by default: run everything through the workers too.
          found.push({ name, label: 'native (worker threads for every size)', start: async () => new NativeKernels({ inlineBelow: 0, threads: Math.max(2, availableParallelism()) }) });
        }
      } catch (err) {
        const reason = (err as Error).message;
        if (required.includes(name)) missing.push(`${name}: ${reason}`);
        else process.stderr.write(`[normserve tests] backend ${name} is not available here and is not tested: ${reason}\n`);
      }
    }
    if (missing.length > 0) throw new Error(`required backends did not start: ${missing.join('; ')}`);
    return found;
  })();
  return cached;
}
