/**
 * `npm run bench`: BatchNorm forward, training and eval mode, on every compute backend that starts
 * here, beside the float64 reference. One module forward per run (statistics, running-stat update
 * and normalisation, as a server call does minus the transport). Prints a table of medians to
 * stdout and writes the same as JSON to bench-results/forward.json; progress goes to stderr.
 *
 * GB/s counts the bytes a forward must move at least: training reads the input twice (statistics,
 * then normalisation) and writes the output once (12 bytes per element); eval reads once and
 * writes once (8 bytes per element).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { BACKEND_NAMES, type Kernels } from '../src/kernels/kernels.js';
import { startBackend } from '../src/kernels/select.js';
import { BatchNorm } from '../src/nn/batch-norm.js';
import { resolveConfig } from '../src/nn/config.js';

const SHAPES: { label: string; shape: number[]; kind: 'BATCH_NORM_1D' | 'BATCH_NORM_2D' }[] = [
  { label: '(32,64,56,56)', shape: [32, 64, 56, 56], kind: 'BATCH_NORM_2D' },
  { label: '(8,256,14,14)', shape: [8, 256, 14, 14], kind: 'BATCH_NORM_2D' },
  { label: '(256,1024)', shape: [256, 1024], kind: 'BATCH_NORM_1D' },
];
const WARMUP = 3;
const MIN_RUNS = 10;
const MAX_RUNS = 40;
const MIN_MS = 1500;

interface Row {
  backend: string;
  shape: string;
  mode: 'train' | 'eval';
  runs: number;
  median_ms: number;
  gb_per_s: number;
  first_call_ms: number;
}

const log = (text: string) => process.stderr.write(`${text}\n`);

function input(shape: number[]): Float32Array {
  const n = shape.reduce((a, b) => a * b, 1);
  const x = new Float32Array(n);
  let s = 12345;
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    x[i] = 3 + 2 * ((s / 4294967296) * 2 - 1);
  }
  return x;
}

async function measure(kernels: Kernels, spec: (typeof SHAPES)[number], mode: 'train' | 'eval', x: Float32Array): Promise<Row> {
  const module = new BatchNorm(resolveConfig({ kind: spec.kind, numFeatures: BigInt(spec.shape[1]!), cumulativeAverage: false }));
  module.update({ training: mode === 'train' });
  let t = performance.now();
  await module.forward(x, spec.shape, kernels);
  const first = performance.now() - t;
  for (let i = 1; i < WARMUP; i++) await module.forward(x, spec.shape, kernels);
  const times: number[] = [];
  const start = performance.now();
  while (times.length < MAX_RUNS && (times.length < MIN_RUNS || performance.now() - start < MIN_MS)) {
    t = performance.now();
    await module.forward(x, spec.shape, kernels);
    times.push(performance.now() - t);
  }
  times.sort((a, b) => a - b);
  const median = times[times.length >> 1]!;
  const bytes = x.length * (mode === 'train' ? 12 : 8);
  return {
    backend: kernels.backend,
    shape: spec.label,
    mode,
    runs: times.length,
    median_ms: Math.round(median * 1000) / 1000,
    gb_per_s: Math.round((bytes / (median / 1000) / 1e9) * 100) / 100,
    first_call_ms: Math.round(first * 10) / 10,
  };
}

async function main() {
  const rows: Row[] = [];
  const skipped: { backend: string; reason: string }[] = [];
  const inputs = new Map(SHAPES.map((s) => [s.label, input(s.shape)]));
  for (const name of BACKEND_NAMES) {
    let kernels: Kernels;
    try {
      kernels = await startBackend(name);
    } catch (err) {
      skipped.push({ backend: name, reason: (err as Error).message });
      log(`${name}: not available here: ${(err as Error).message}`);
      continue;
    }
    log(`${name}: ${kernels.description}`);
    for (const spec of SHAPES) {
      for (const mode of ['train', 'eval'] as const) {
        const row = await measure(kernels, spec, mode, inputs.get(spec.label)!);
        log(`  ${spec.label} ${mode}: ${row.median_ms} ms (${row.runs} runs)`);
        rows.push(row);
      }
    }
    await kernels.dispose();
  }

  const reference = new Map(rows.filter((r) => r.backend === 'reference').map((r) => [`${r.shape} ${r.mode}`, r.median_ms]));
  const header = ['backend', 'shape', 'mode', 'median ms', 'GB/s', 'x reference', 'first call ms'];
  const body = rows.map((r) => [
    r.backend,
    r.shape,
    r.mode,
    r.median_ms.toFixed(2),
    r.gb_per_s.toFixed(2),
    (r.median_ms / reference.get(`${r.shape} ${r.mode}`)!).toFixed(2),
    r.first_call_ms.toFixed(1),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
  const machine = `${cpus().length} x ${cpus()[0]?.model ?? 'cpu'}, Node ${process.version}`;
  console.log(`BatchNorm forward, one module call, median of ${MIN_RUNS}-${MAX_RUNS} runs; ${machine}`);
  console.log(line(header));
  console.log(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
  for (const b of body) console.log(line(b));
  for (const s of skipped) console.log(`not run: ${s.backend}: ${s.reason}`);

  mkdirSync('bench-results', { recursive: true });
  writeFileSync('bench-results/forward.json', `${JSON.stringify({ machine, date: new Date().toISOString(), rows, skipped }, null, 2)}\n`);
  log('wrote bench-results/forward.json');
}

await main();
