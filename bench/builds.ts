/**
 * Two builds of the native backend side by side: this one and another checkout's `dist/`, each
 * with its own NativeKernels (and threads), the module's training forward and backward
 * (batch-norm.ts over the fused passes, as the server runs them) alternating between the builds
 * in blocks of calls, so that both see the same stretch of this VM's drift. Medians per build and
 * their ratio. A change to the kernels or the module is measured this way before it lands
 * (docs/benchmarks.md, issue 15's seventh part); between runs this VM moves more than most
 * changes do.
 *
 *   git worktree add /tmp/before <commit> && (cd /tmp/before && npm ci && npm run build)
 *   node dist/bench/builds.js --against /tmp/before/dist [--shapes 256x1024,8x256x14x14] [--rounds 60]
 *
 * A round is a block of 20 forwards and 20 backwards on each build; the first SETTLE rounds are
 * not counted.
 */
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { fill } from './fill.js';
import { median } from './median.js';

const { values: args } = parseArgs({
  options: { against: { type: 'string' }, shapes: { type: 'string', default: '256x1024,8x256x14x14' }, rounds: { type: 'string', default: '60' } },
  strict: true,
});
if (!args.against) {
  process.stderr.write('usage: node dist/bench/builds.js --against OTHER/dist [--shapes 256x1024,...] [--rounds 60]\n');
  process.exit(2);
}
const ROUNDS = Number(args.rounds);
const BLOCK = 20;
const SETTLE = 5;
const SHAPES = args.shapes!.split(',').map((s) => s.split('x').map(Number));

/** What this program needs of a build: loaded from its dist/ by path, so two builds can coexist. */
interface Build {
  NativeKernels: new () => {
    ready: Promise<void>;
    allocate(length: number): Float32Array;
    release(t: Float32Array): void;
    dispose(): Promise<void>;
  };
  BatchNorm: new (config: unknown) => {
    update(u: { training: boolean }): void;
    forward(x: Float32Array, shape: number[], kernels: unknown, save?: boolean, owned?: boolean): Promise<{ output: Float32Array; saved: unknown }>;
  };
  backward: (saved: unknown, dy: Float32Array, shape: number[], kernels: unknown) => Promise<{ gradInput: Float32Array }>;
  resolveConfig: (c: object) => unknown;
}

async function load(dist: string): Promise<Build> {
  const at = (file: string) => import(pathToFileURL(resolve(dist, file)).href);
  const [native, bn, config] = await Promise.all([at('src/kernels/native/native-kernels.js'), at('src/nn/batch-norm.js'), at('src/nn/config.js')]);
  return { NativeKernels: native.NativeKernels, BatchNorm: bn.BatchNorm, backward: bn.backward, resolveConfig: config.resolveConfig };
}

const builds = { other: await load(args.against), this: await load(resolve(import.meta.dirname, '..')) };
console.log(`| shape | work | ${args.against} ms | this build ms | this ÷ other |`);
console.log('|-------|------|------|------|------|');
for (const shape of SHAPES) {
  const n = shape.reduce((a, b) => a * b, 1);
  const c = shape[1]!;
  const runners = await Promise.all(
    Object.values(builds).map(async (b) => {
      const kernels = new b.NativeKernels();
      await kernels.ready;
      const x = fill(kernels.allocate(n), 12345, 3, 2);
      const dy = fill(kernels.allocate(n), 777, 0, 1);
      const module = new b.BatchNorm(b.resolveConfig({ kind: shape.length === 2 ? 'BATCH_NORM_1D' : 'BATCH_NORM_2D', numFeatures: BigInt(c), cumulativeAverage: false }));
      module.update({ training: true });
      const { saved } = await module.forward(x, shape, kernels, true, true);
      return {
        kernels,
        forward: async () => kernels.release((await module.forward(x, shape, kernels)).output),
        backward: async () => kernels.release((await b.backward(saved, dy, shape, kernels)).gradInput),
        times: { forward: [] as number[], backward: [] as number[] },
      };
    }),
  );
  for (let round = 0; round < ROUNDS + SETTLE; round++) {
    for (const r of round % 2 === 0 ? runners : [...runners].reverse()) {
      for (const work of ['forward', 'backward'] as const) {
        for (let i = 0; i < BLOCK; i++) {
          const t0 = performance.now();
          await r[work]();
          if (round >= SETTLE) r.times[work].push(performance.now() - t0);
        }
      }
    }
  }
  for (const work of ['forward', 'backward'] as const) {
    const [other, mine] = runners.map((r) => median(r.times[work])) as [number, number];
    console.log(`| (${shape.join(',')}) | ${work} | ${other.toFixed(3)} | ${mine.toFixed(3)} | ${(mine / other).toFixed(2)} |`);
  }
  await Promise.all(runners.map((r) => r.kernels.dispose()));
}
