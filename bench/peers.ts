/**
 * `npm run bench` (first part): normserve beside its peers, on the same shapes and the same
 * machine, so that every figure comes with a yardstick (docs/benchmarks.md explains each one).
 *
 * Work, for (32,64,56,56), (8,256,14,14), (256,1024) and (4,16,8,8): a training forward (batch
 * statistics, running-statistic update, normalisation), an eval forward (running statistics), and
 * the backward of a training forward (gradients through the batch statistics).
 *
 * Runners:
 *  - every normserve backend of BACKEND_NAMES that starts here (`startBackend` self-tests it; the
 *    others are reported with the reason), the float64 reference included. The timed unit is a
 *    module call as the server makes it, minus the transport: `BatchNorm.forward` with the kernels,
 *    and `backward()` of a forward saved once. Inputs live in the memory the backend allocates
 *    (`kernels.allocate`, as the wire decodes into it) and outputs are given back
 *    (`kernels.release`) after each timed call, where the backend has those.
 *  - onnxruntime-node on its CPU execution provider, all cores: ONNX models written by
 *    bench/onnx-model.ts (BatchNormalization in training and in eval mode; the backward as a graph
 *    of primitive operators). Each model is checked once against the float64 reference before it
 *    is timed; an error above 1e-3 aborts the run. ONNX's BatchNormalization differs from PyTorch's
 *    (momentum reversed, biased running variance): it is a speed anchor, not a peer in semantics.
 *  - the copy floor: `y.set(x)` into a preallocated array, the least any forward can do (read x
 *    once, write y once).
 * Then end to end: the real server (`dist/src/main.js`, with the fastest backend that started)
 * and an echo server built on the same transport (bench/echo-server.ts), both as child processes,
 * called with the same channel options and the same message, interleaved; Forward ÷ echo is what
 * normserve adds to the wire's own cost. Last, the server's peak memory per in-flight Forward of
 * the largest shape.
 *
 * Each cell: 3 warm-up runs (the first is reported as the first call), then 10 to 40 timed runs
 * or until 1.5 s have passed (3 s for a shape's Forward/Echo pairs); medians. `--quick` runs 1 warm-up and 3 to 5 runs (a smoke test);
 * `--shapes 256x1024,4x16x8x8` keeps some shapes. Tables go to stdout, progress and the
 * correctness checks to stderr, everything to bench-results/peers.json.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism, cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { credentials, type Client, type ClientDuplexStream, type ServiceError } from '@grpc/grpc-js';
import * as ort from 'onnxruntime-node';
import { NormserveClient } from '../src/client/client.js';
import { SharedMemoryFile } from '../src/client/shared-memory.js';
import { BACKEND_NAMES, layoutOf, type Kernels, type Layout } from '../src/kernels/kernels.js';
import { referenceGradInput, referenceGradSums, referenceNormalize, referenceStats } from '../src/kernels/reference.js';
import { startBackend } from '../src/kernels/select.js';
import { backward, BatchNorm } from '../src/nn/batch-norm.js';
import { resolveConfig } from '../src/nn/config.js';
import { grpcObject } from '../src/wire/proto.js';
import { encodeTensor } from '../src/wire/tensor-codec.js';
import { clientChannelOptions } from '../src/wire/transport.js';
import { loadEchoService } from './echo-server.js';
import { fill } from './fill.js';
import { batchNormBackwardModel, batchNormForwardModel, channelShape } from './onnx-model.js';
import { startServerProcess } from './server-process.js';
import { median } from './median.js';

// ---- What runs ----------------------------------------------------------------------------

interface ShapeSpec {
  readonly label: string;
  readonly shape: readonly number[];
  readonly kind: 'BATCH_NORM_1D' | 'BATCH_NORM_2D';
}

const ALL_SHAPES: readonly ShapeSpec[] = [
  { label: '(32,64,56,56)', shape: [32, 64, 56, 56], kind: 'BATCH_NORM_2D' },
  { label: '(8,256,14,14)', shape: [8, 256, 14, 14], kind: 'BATCH_NORM_2D' },
  { label: '(256,1024)', shape: [256, 1024], kind: 'BATCH_NORM_1D' },
  { label: '(4,16,8,8)', shape: [4, 16, 8, 8], kind: 'BATCH_NORM_2D' },
];

const WORKS = ['forward-train', 'forward-eval', 'backward'] as const;
type Work = (typeof WORKS)[number];
const WORK_TITLES: Readonly<Record<Work, string>> = {
  'forward-train': 'Forward, training mode (batch statistics, running-statistic update)',
  'forward-eval': 'Forward, eval mode (running statistics)',
  backward: 'Backward of a training forward (gradients through the batch statistics)',
};

const { values: args } = parseArgs({
  options: { quick: { type: 'boolean', default: false }, shapes: { type: 'string' }, only: { type: 'string' }, backend: { type: 'string' }, durability: { type: 'string' } },
  strict: true,
});
const QUICK = args.quick === true;
/** `--only kernels,e2e,memory` runs a subset of the parts (all by default). */
const ONLY = new Set((typeof args.only === 'string' ? args.only : 'kernels,e2e,transport,memory').split(',').map((p) => p.trim()));
const want = (part: 'kernels' | 'e2e' | 'transport' | 'memory') => ONLY.has(part);
const TIMING = QUICK ? { warmup: 1, minRuns: 3, maxRuns: 5, minMs: 200 } : { warmup: 3, minRuns: 10, maxRuns: 40, minMs: 1500 };
/**
 * End to end, pairs are bounded by time rather than count: a small call takes a millisecond or
 * two, and 40 pairs after 3 warm-up calls timed a server whose JIT had not settled yet (a training
 * loop makes thousands of calls). Warm-up runs for `warmupMs` too.
 */
const E2E_TIMING = QUICK ? { ...TIMING, warmupMs: 0 } : { ...TIMING, maxRuns: 2000, warmupMs: 500 };
const SHAPES = selectShapes(args.shapes);
/** onnxruntime's and PyTorch's default eps; ONNX momentum 0.9 is PyTorch momentum 0.1. */
const EPS = 1e-5;
const ONNX_MOMENTUM = 0.9;
/** Largest error a model may show against the float64 reference before the run aborts. */
const TOLERANCE = 1e-3;
/** Concurrent Forward calls for the memory figure. */
const MEMORY_CONCURRENCY = [1, 4];
const MEMORY_REPEATS = QUICK ? 1 : 3;

function selectShapes(filter: string | undefined): ShapeSpec[] {
  if (filter === undefined) return [...ALL_SHAPES];
  const wanted = filter.split(',').map((s) => s.trim().replace(/[()\s]/g, ''));
  const unknown = wanted.filter((w) => !ALL_SHAPES.some((s) => s.shape.join('x') === w));
  if (unknown.length > 0) throw new Error(`--shapes: unknown ${unknown.join(', ')}; known: ${ALL_SHAPES.map((s) => s.shape.join('x')).join(', ')}`);
  return ALL_SHAPES.filter((s) => wanted.includes(s.shape.join('x')));
}

// ---- Helpers ------------------------------------------------------------------------------

const log = (text: string) => process.stderr.write(`${text}\n`);
const elements = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);
const round = (value: number, digits: number) => Math.round(value * 10 ** digits) / 10 ** digits;

/** The input of every runner: 3 ± 2 (a mean well away from 0, as in real activations). */
const inputInto = (target: Float32Array) => fill(target, 12345, 3, 2);
/** The output gradient of every backward: ± 1. */
const gradInto = (target: Float32Array) => fill(target, 777, 0, 1);

interface Timing {
  runs: number;
  median_ms: number;
  first_call_ms: number;
}

/**
 * Times `run`: warm-up calls (the first timed on its own), then MIN_RUNS to MAX_RUNS timed calls
 * or until MIN_MS have passed. `after` sees each result outside the timed span (to give buffers
 * back). Synchronous work is timed without an await, so that tiny cells are not a microtask.
 */
async function time<T>(run: () => T | Promise<T>, after: (result: T) => void = () => {}): Promise<Timing> {
  const once = async () => {
    const t = performance.now();
    const pending = run();
    const result = pending instanceof Promise ? await pending : pending;
    const ms = performance.now() - t;
    after(result);
    return ms;
  };
  const first = await once();
  for (let i = 1; i < TIMING.warmup; i++) await once();
  const times: number[] = [];
  const start = performance.now();
  while (times.length < TIMING.maxRuns && (times.length < TIMING.minRuns || performance.now() - start < TIMING.minMs)) {
    times.push(await once());
  }
  return { runs: times.length, median_ms: round(median(times), 4), first_call_ms: round(first, 3) };
}

/** Milliseconds with three significant digits (at least two decimals above 1). */
function ms(value: number): string {
  if (value >= 100) return value.toFixed(1);
  if (value >= 1) return value.toFixed(2);
  return value.toPrecision(3);
}
const ratioText = (ratio: number) => `${ratio >= 10 ? ratio.toFixed(1) : ratio.toFixed(2)}×`;

function table(header: readonly string[], body: readonly (readonly string[])[]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: readonly string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
  return [line(header), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...body.map(line)].join('\n');
}

// ---- Kernel-level runners -----------------------------------------------------------------

interface Cell extends Timing {
  runner: string;
  work: Work | 'copy';
  shape: string;
}

/** `release` is optional in the Kernels interface; typed here so this file does not depend on it. */
type ReleasingKernels = Kernels & { release?: (tensor: Float32Array) => void };

function newModule(spec: ShapeSpec, training: boolean): BatchNorm {
  const module = new BatchNorm(resolveConfig({ kind: spec.kind, numFeatures: BigInt(spec.shape[1]!), cumulativeAverage: false }));
  module.update({ training });
  return module;
}

async function runNormserve(kernels: ReleasingKernels, cells: Cell[]): Promise<void> {
  const give = (t: Float32Array) => kernels.release?.(t);
  for (const spec of SHAPES) {
    const n = elements(spec.shape);
    // The wire decodes a request into the backend's own memory; so does this.
    const x = inputInto(kernels.allocate?.(n) ?? new Float32Array(n));
    const dy = gradInto(kernels.allocate?.(n) ?? new Float32Array(n));
    const train = newModule(spec, true);
    const evalModule = newModule(spec, false);
    const saving = newModule(spec, true);
    const forward = await saving.forward(x, spec.shape, kernels, true);
    give(forward.output);
    // The server hands the decoded input itself to the saved forward (no copy), so backward reads
    // x from the backend's memory; the module's own copy here is plain memory.
    const savedX = kernels.allocate?.(n) ?? new Float32Array(n);
    savedX.set(x);
    const saved = { ...forward.saved!, x: savedX };
    const units: Record<Work, () => Promise<Timing>> = {
      'forward-train': () => time(() => train.forward(x, spec.shape, kernels), (r) => give(r.output)),
      'forward-eval': () => time(() => evalModule.forward(x, spec.shape, kernels), (r) => give(r.output)),
      backward: () => time(() => backward(saved, dy, spec.shape, kernels), (g) => give(g.gradInput)),
    };
    for (const work of WORKS) {
      const timing = await units[work]();
      cells.push({ runner: kernels.backend, work, shape: spec.label, ...timing });
      log(`  ${spec.label} ${work}: ${ms(timing.median_ms)} ms (${timing.runs} runs, first ${ms(timing.first_call_ms)} ms)`);
    }
    for (const t of [x, dy, savedX]) give(t);
  }
}

function runFloor(cells: Cell[]): Promise<void> {
  return SHAPES.reduce(async (previous, spec) => {
    await previous;
    const x = inputInto(new Float32Array(elements(spec.shape)));
    const y = new Float32Array(x.length);
    const timing = await time(() => y.set(x));
    cells.push({ runner: 'copy floor', work: 'copy', shape: spec.label, ...timing });
    log(`  ${spec.label} y.set(x): ${ms(timing.median_ms)} ms (${timing.runs} runs)`);
  }, Promise.resolve());
}

// ---- onnxruntime ------------------------------------------------------------------------------

interface OrtCheck {
  shape: string;
  work: Work;
  /** Largest |ort − reference| over the output tensor. */
  max_abs_error: number;
  /** Per-channel outputs (running statistics, parameter gradients): largest |ort − ref| / max(1, |ref|). */
  max_channel_error: number;
}

const SESSION_OPTIONS: ort.InferenceSession.SessionOptions = {
  executionProviders: ['cpu'],
  intraOpNumThreads: availableParallelism(),
  graphOptimizationLevel: 'all',
};

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    worst = d > worst || Number.isNaN(d) ? d : worst;
  }
  return worst;
}

function maxScaledDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!) / Math.max(1, Math.abs(b[i]!));
    worst = d > worst || Number.isNaN(d) ? d : worst;
  }
  return worst;
}

const floats = (result: ort.InferenceSession.ReturnType, name: string) => (result[name] as ort.Tensor).data as Float32Array;

/** Module parameters and buffers for the ONNX models: away from 1 and 0, so that the check sees them. */
function channelParams(c: number) {
  const f = (g: (ch: number) => number) => Float32Array.from({ length: c }, (_, ch) => g(ch));
  return {
    weight: f((ch) => 1 + 0.25 * Math.sin(ch)),
    bias: f((ch) => 0.5 * Math.cos(ch)),
    runningMean: f((ch) => 2.5 + 0.1 * Math.sin(3 * ch)),
    runningVar: f((ch) => 1.2 + 0.2 * Math.cos(5 * ch)),
  };
}

/**
 * One shape's three models: built, checked once against the float64 reference (throws above
 * TOLERANCE), timed, released. Sessions are released one by one: onnxruntime's pool threads
 * spin for a while after each run and would take cores from whatever runs next.
 */
async function runOrtShape(spec: ShapeSpec, cells: Cell[], checks: OrtCheck[]): Promise<void> {
  const shape = [...spec.shape];
  const layout: Layout = layoutOf(shape);
  const count = layout.n * layout.s;
  const x = inputInto(new Float32Array(elements(shape)));
  const dy = gradInto(new Float32Array(x.length));
  const p = channelParams(layout.c);
  const tensor = (data: Float32Array, dims: readonly number[]) => new ort.Tensor('float32', data, dims);
  const f64 = (a: ArrayLike<number>) => Float64Array.from(a);

  // The float64 reference of what each model computes, by ONNX's definitions.
  const batch = referenceStats(x, layout);
  const batchVar = batch.m2.map((v) => v / count);
  const batchInvstd = batchVar.map((v) => 1 / Math.sqrt(v + EPS));
  const affine = (mean: Float64Array, invstd: Float64Array) => ({ mean, scale: invstd.map((v, ch) => v * p.weight[ch]!), shift: f64(p.bias) });

  const record = async (work: Work, model: Uint8Array, feeds: Record<string, ort.Tensor>, check: (r: ort.InferenceSession.ReturnType) => OrtCheck) => {
    const session = await ort.InferenceSession.create(model, SESSION_OPTIONS);
    try {
      const verdict = check(await session.run(feeds));
      checks.push(verdict);
      log(`  ${spec.label} ${work}: max abs error ${verdict.max_abs_error.toExponential(2)}, per-channel ${verdict.max_channel_error.toExponential(2)}`);
      if (!(verdict.max_abs_error <= TOLERANCE && verdict.max_channel_error <= TOLERANCE)) {
        throw new Error(`onnxruntime ${work} ${spec.label} differs from the float64 reference by more than ${TOLERANCE}; not timing a wrong model`);
      }
      const timing = await time(() => session.run(feeds));
      cells.push({ runner: 'onnxruntime', work, shape: spec.label, ...timing });
      log(`  ${spec.label} ${work}: ${ms(timing.median_ms)} ms (${timing.runs} runs, first ${ms(timing.first_call_ms)} ms)`);
    } finally {
      await session.release();
    }
  };

  const forwardFeeds = {
    X: tensor(x, shape),
    scale: tensor(p.weight, [layout.c]),
    B: tensor(p.bias, [layout.c]),
    input_mean: tensor(p.runningMean, [layout.c]),
    input_var: tensor(p.runningVar, [layout.c]),
  };

  await record('forward-train', batchNormForwardModel(shape, { training: true, momentum: ONNX_MOMENTUM, epsilon: EPS }), forwardFeeds, (r) => {
    const y = referenceNormalize(x, layout, affine(batch.mean, batchInvstd));
    // ONNX: running = input · momentum + batch · (1 − momentum), with the biased batch variance.
    const m = ONNX_MOMENTUM;
    const runningMean = batch.mean.map((v, ch) => p.runningMean[ch]! * m + v * (1 - m));
    const runningVar = batchVar.map((v, ch) => p.runningVar[ch]! * m + v * (1 - m));
    return {
      shape: spec.label,
      work: 'forward-train',
      max_abs_error: maxAbsDiff(floats(r, 'Y'), y),
      max_channel_error: Math.max(maxScaledDiff(floats(r, 'running_mean'), runningMean), maxScaledDiff(floats(r, 'running_var'), runningVar)),
    };
  });

  await record('forward-eval', batchNormForwardModel(shape, { training: false, momentum: ONNX_MOMENTUM, epsilon: EPS }), forwardFeeds, (r) => {
    const invstd = f64(p.runningVar).map((v) => 1 / Math.sqrt(v + EPS));
    const y = referenceNormalize(x, layout, affine(f64(p.runningMean), invstd));
    return { shape: spec.label, work: 'forward-eval', max_abs_error: maxAbsDiff(floats(r, 'Y'), y), max_channel_error: 0 };
  });

  // The saved forward's values, in float32 as the model takes them; the reference uses the same.
  const mean32 = Float32Array.from(batch.mean);
  const invstd32 = Float32Array.from(batchInvstd);
  const ch = channelShape(shape);
  const backwardFeeds = { X: tensor(x, shape), dY: tensor(dy, shape), mean: tensor(mean32, ch), invstd: tensor(invstd32, ch), weight: tensor(p.weight, ch) };
  await record('backward', batchNormBackwardModel(shape), backwardFeeds, (r) => {
    const mean = f64(mean32);
    const invstd = f64(invstd32);
    const sums = referenceGradSums(x, dy, layout, mean);
    const a = invstd.map((v, c) => v * p.weight[c]!);
    const gradInput = referenceGradInput(x, dy, layout, {
      mean,
      a,
      b: a.map((v, c) => (-v * invstd[c]! * invstd[c]! * sums.sumDyXmu[c]!) / count),
      k: a.map((v, c) => (-v * sums.sumDy[c]!) / count),
    });
    return {
      shape: spec.label,
      work: 'backward',
      max_abs_error: maxAbsDiff(floats(r, 'grad_input'), gradInput),
      max_channel_error: Math.max(
        maxScaledDiff(floats(r, 'grad_weight'), sums.sumDyXmu.map((v, c) => v * invstd[c]!)),
        maxScaledDiff(floats(r, 'grad_bias'), sums.sumDy),
      ),
    };
  });
}

// ---- End to end ---------------------------------------------------------------------------

interface Child {
  readonly child: ChildProcessWithoutNullStreams;
  readonly address: string;
}

/** bench/echo-server.ts as a child process; resolves once it listens. */
async function startEchoProcess(): Promise<Child> {
  const child = spawn(process.execPath, ['dist/bench/echo-server.js']);
  child.stderr.pipe(process.stderr);
  const port = await new Promise<number>((resolve, reject) => {
    createInterface({ input: child.stdout }).on('line', (line) => {
      const entry = JSON.parse(line) as { msg?: string; port?: number };
      if (entry.msg === 'echo listening') resolve(entry.port!);
    });
    child.once('exit', (code) => reject(new Error(`echo server exited with ${code} before listening`)));
  });
  return { child, address: `127.0.0.1:${port}` };
}

async function stopChild(child: ChildProcessWithoutNullStreams): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGTERM');
  await exited;
}

type ForwardMessage = ReturnType<typeof forwardMessage>;
const forwardMessage = (name: string, shape: readonly number[], x: Float32Array) => ({ name, input: encodeTensor(shape, x), save_for_backward: false });

/** One unary call on a raw stub; resolves with nothing (the reply is decoded by grpc-js and dropped). */
function unary(stub: Client, method: string, message: ForwardMessage): Promise<void> {
  const fn = (stub as unknown as Record<string, (m: ForwardMessage, cb: (err: ServiceError | null) => void) => void>)[method]!;
  return new Promise((resolve, reject) => fn.call(stub, message, (err) => (err ? reject(err) : resolve())));
}

interface EndToEndRow {
  shape: string;
  tensor_mb: number;
  pairs: number;
  forward_ms: number;
  echo_ms: number;
  forward_over_echo: number;
  forward_first_call_ms: number;
  echo_first_call_ms: number;
}

/** Forward and Echo of the same message, alternated (F, E, F, E, …) so that noise hits both alike. */
async function endToEnd(forwardStub: Client, echoStub: Client, admin: NormserveClient, spec: ShapeSpec): Promise<EndToEndRow> {
  const name = `bench/peers/${spec.shape.join('x')}`;
  await admin.createModule(name, { kind: spec.kind, numFeatures: spec.shape[1]! });
  const x = inputInto(new Float32Array(elements(spec.shape)));
  const message = forwardMessage(name, spec.shape, x);
  const call = async (stub: Client, method: string) => {
    const t = performance.now();
    await unary(stub, method, message);
    return performance.now() - t;
  };
  const forwardFirst = await call(forwardStub, 'Forward');
  const echoFirst = await call(echoStub, 'Echo');
  const warm = performance.now();
  for (let i = 1; i < E2E_TIMING.warmup || performance.now() - warm < E2E_TIMING.warmupMs; i++) {
    await call(forwardStub, 'Forward');
    await call(echoStub, 'Echo');
  }
  const forward: number[] = [];
  const echo: number[] = [];
  const start = performance.now();
  while (forward.length < E2E_TIMING.maxRuns && (forward.length < E2E_TIMING.minRuns || performance.now() - start < 2 * E2E_TIMING.minMs)) {
    forward.push(await call(forwardStub, 'Forward'));
    echo.push(await call(echoStub, 'Echo'));
  }
  const f = median(forward);
  const e = median(echo);
  return {
    shape: spec.label,
    tensor_mb: round(x.byteLength / 1e6, 3),
    pairs: forward.length,
    forward_ms: round(f, 4),
    echo_ms: round(e, 4),
    forward_over_echo: round(f / e, 3),
    forward_first_call_ms: round(forwardFirst, 3),
    echo_first_call_ms: round(echoFirst, 3),
  };
}

// ---- Streams and shared memory ---------------------------------------------------------------

interface TransportRow {
  shape: string;
  tensor_mb: number;
  runs: number;
  /** Medians, ms: unary Forward, ForwardStream, EchoStream of the same chunks, Forward through a shared-memory region. */
  forward_ms: number;
  forward_stream_ms: number;
  echo_stream_ms: number;
  forward_shm_ms: number;
  forward_stream_over_echo_stream: number;
  /** Tensor bytes per second of the whole call (the input in, the output back). */
  forward_stream_gb_per_s: number;
  forward_shm_gb_per_s: number;
}

const STREAM_CHUNK = 1024 * 1024;

/** EchoStream with the client's chunking: a head, then the bytes in 1 MiB chunks; waits for all of it back. */
function echoStream(stub: Client, shape: readonly number[], x: Float32Array): Promise<void> {
  const call = (stub as unknown as { EchoStream(): ClientDuplexStream<object, { part?: string; chunk?: Buffer }> }).EchoStream();
  return new Promise((resolve, reject) => {
    let received = 0;
    call.on('data', (m) => {
      if (m.part === 'chunk') received += m.chunk!.length;
    });
    call.on('error', reject);
    call.on('end', () => (received === x.byteLength ? resolve() : reject(new Error(`echo stream: ${received} of ${x.byteLength} bytes`))));
    void (async () => {
      const write = (m: object) => new Promise<void>((done) => (call.write(m) ? done() : call.once('drain', () => done())));
      await write({ head: { name: 'echo', input: { shape: shape.map(String), dtype: 'FLOAT32', data: Buffer.alloc(0) } } });
      const bytes = Buffer.from(x.buffer, x.byteOffset, x.byteLength);
      for (let at = 0; at < bytes.length; at += STREAM_CHUNK) await write({ chunk: bytes.subarray(at, at + STREAM_CHUNK) });
      call.end();
    })();
  });
}

/** Forward unary, streamed and through shared memory, beside the streamed echo, interleaved. */
async function transports(client: NormserveClient, echoStub: Client, spec: ShapeSpec, shmDir: string): Promise<TransportRow> {
  const name = `bench/transport/${spec.shape.join('x')}`;
  await client.createModule(name, { kind: spec.kind, numFeatures: spec.shape[1]! });
  const x = inputInto(new Float32Array(elements(spec.shape)));
  const input = { shape: spec.shape, data: x };
  const file = SharedMemoryFile.create(join(shmDir, `normserve-bench-${process.pid}-${spec.shape.join('x')}`), 2 * x.byteLength);
  await client.registerRegion(name, file.path, 2 * x.byteLength);
  const region = { name, file, inputOffset: 0, outputOffset: x.byteLength, into: new Float32Array(x.length) };
  const timed = async (run: () => Promise<unknown>) => {
    const t = performance.now();
    await run();
    return performance.now() - t;
  };
  const runs = { unary: [] as number[], stream: [] as number[], echo: [] as number[], shm: [] as number[] };
  const oneRound = async () => {
    runs.unary.push(await timed(() => client.forward(name, input, { transport: 'unary' })));
    runs.stream.push(await timed(() => client.forward(name, input, { transport: 'stream' })));
    runs.echo.push(await timed(() => echoStream(echoStub, spec.shape, x)));
    runs.shm.push(await timed(() => client.forward(name, input, { region })));
  };
  try {
    for (let i = 0; i < TIMING.warmup; i++) await oneRound();
    for (const list of Object.values(runs)) list.length = 0;
    const start = performance.now();
    while (runs.unary.length < TIMING.maxRuns && (runs.unary.length < TIMING.minRuns || performance.now() - start < 2 * TIMING.minMs)) await oneRound();
  } finally {
    await client.unregisterRegion(name);
    file.close(true);
  }
  const m = { unary: median(runs.unary), stream: median(runs.stream), echo: median(runs.echo), shm: median(runs.shm) };
  return {
    shape: spec.label,
    tensor_mb: round(x.byteLength / 1e6, 3),
    runs: runs.unary.length,
    forward_ms: round(m.unary, 4),
    forward_stream_ms: round(m.stream, 4),
    echo_stream_ms: round(m.echo, 4),
    forward_shm_ms: round(m.shm, 4),
    forward_stream_over_echo_stream: round(m.stream / m.echo, 3),
    forward_stream_gb_per_s: round(x.byteLength / 1e6 / m.stream, 3),
    forward_shm_gb_per_s: round(x.byteLength / 1e6 / m.shm, 3),
  };
}

// ---- Memory per in-flight call -------------------------------------------------------------

interface MemoryRow {
  shape: string;
  /** Forward in one message, ForwardStream, or the echo server's Echo for comparison. */
  transport: 'unary' | 'stream' | 'echo';
  concurrent: number;
  tensor_mb: number;
  method: 'VmHWM after clear_refs' | 'VmRSS sampled every 2 ms';
  /** Per repeat (each a fresh server): RSS before the calls and the peak while they ran, MB. */
  repeats: { rss_before_mb: number; peak_mb: number }[];
  /** The median over the repeats of (peak − before) ÷ (concurrent × tensor bytes). */
  per_call_tensors: number;
}

const statusField = (pid: number, field: 'VmRSS' | 'VmHWM') => {
  const match = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!match) throw new Error(`/proc/${pid}/status has no ${field}`);
  return Number(match[1]) * 1024;
};

/** Resets the kernel's high-water mark of the process's RSS to its RSS now; false where not allowed. */
function clearPeak(pid: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5');
    return true;
  } catch {
    return false;
  }
}

/**
 * The server's peak RSS while `k` Forward calls of `spec` are in flight, each on its own module
 * (as from k clients), minus its RSS just before, in tensors per call. Each repeat starts a fresh
 * server: a process that has already served large tensors keeps freed memory (V8 and malloc
 * rarely hand it back), and a second burst would reuse it and look free. Before the burst, every
 * module serves one Forward of a single sample (the same code paths, worker threads started).
 */
async function memoryPerCall(serverArgs: readonly string[], spec: ShapeSpec, k: number, transport: MemoryRow['transport']): Promise<MemoryRow> {
  const x = inputInto(new Float32Array(elements(spec.shape)));
  const sampleShape = [1, ...spec.shape.slice(1)];
  const sample = x.subarray(0, elements(sampleShape));
  let how: MemoryRow['method'] = 'VmHWM after clear_refs';
  const repeats: MemoryRow['repeats'] = [];
  for (let r = 0; r < MEMORY_REPEATS; r++) {
    const server = transport === 'echo' ? await startEchoProcess() : await startServerProcess(serverArgs);
    const pid = server.child.pid!;
    const admin = new NormserveClient(server.address);
    const stub =
      transport === 'echo'
        ? new (loadEchoService())(server.address, credentials.createInsecure(), clientChannelOptions())
        : new grpcObject.normserve.v1.BatchNormService(server.address, credentials.createInsecure(), clientChannelOptions());
    const method = transport === 'echo' ? 'Echo' : 'Forward';
    try {
      const names = Array.from({ length: k }, (_, i) => `bench/peers/memory-${i}`);
      for (const name of names) {
        if (transport !== 'echo') await admin.createModule(name, { kind: spec.kind, numFeatures: spec.shape[1]! });
        await unary(stub, method, forwardMessage(name, sampleShape, sample));
      }
      const messages = names.map((name) => forwardMessage(name, spec.shape, x));
      const burst = () =>
        Promise.all(
          transport === 'stream'
            ? names.map((name) => admin.forward(name, { shape: spec.shape, data: x }, { transport: 'stream' }))
            : messages.map((m) => unary(stub, method, m)),
        );
      await new Promise((resolve) => setTimeout(resolve, 200));
      let before: number;
      let peak: number;
      if (how === 'VmHWM after clear_refs' && clearPeak(pid)) {
        before = statusField(pid, 'VmRSS');
        await burst();
        peak = statusField(pid, 'VmHWM');
      } else {
        how = 'VmRSS sampled every 2 ms';
        before = statusField(pid, 'VmRSS');
        peak = before;
        const sampler = setInterval(() => (peak = Math.max(peak, statusField(pid, 'VmRSS'))), 2);
        await burst();
        clearInterval(sampler);
        peak = Math.max(peak, statusField(pid, 'VmRSS'));
      }
      repeats.push({ rss_before_mb: round(before / 1e6, 1), peak_mb: round(peak / 1e6, 1) });
    } finally {
      stub.close();
      admin.close();
      await stopChild(server.child);
    }
  }
  const perCall = median(repeats.map((r) => ((r.peak_mb - r.rss_before_mb) * 1e6) / (k * x.byteLength)));
  return { shape: spec.label, transport, concurrent: k, tensor_mb: round(x.byteLength / 1e6, 3), method: how, repeats, per_call_tensors: round(perCall, 2) };
}

// ---- Main ---------------------------------------------------------------------------------

async function main(): Promise<void> {
  const started = performance.now();
  const machine = `${cpus().length} x ${cpus()[0]?.model ?? 'cpu'}, Node ${process.version}, onnxruntime-node ${ort.env.versions.node ?? '?'}`;
  log(`peers: ${SHAPES.map((s) => s.label).join(' ')}${QUICK ? ' (quick)' : ''}; ${machine}`);
  const cells: Cell[] = [];
  const skipped: { runner: string; reason: string }[] = [];
  const descriptions: Record<string, string> = {};

  // 1. normserve's backends, one at a time.
  for (const name of want('kernels') ? BACKEND_NAMES : []) {
    let kernels: ReleasingKernels;
    try {
      kernels = await startBackend(name);
    } catch (err) {
      const reason = (err as Error).message;
      skipped.push({ runner: name, reason });
      log(`${name}: not run here: ${reason}`);
      continue;
    }
    descriptions[name] = kernels.description;
    log(`${name}: ${kernels.description}`);
    try {
      await runNormserve(kernels, cells);
    } finally {
      await kernels.dispose();
    }
  }
  const backends = BACKEND_NAMES.filter((b) => b in descriptions);

  // 2. onnxruntime, checked and timed shape by shape.
  descriptions.onnxruntime = `onnxruntime-node ${ort.env.versions.node ?? ''} CPU EP, intraOpNumThreads ${availableParallelism()}, ONNX IR 8 / opset 15`;
  log(`onnxruntime: ${descriptions.onnxruntime}`);
  const checks: OrtCheck[] = [];
  if (want('kernels')) {
    for (const spec of SHAPES) await runOrtShape(spec, cells, checks);
    // 3. The copy floor.
    log('copy floor: y.set(x) into a preallocated array');
    await runFloor(cells);
  }

  // 4. End to end, with the fastest backend by training forward over the shapes run.
  const total = (backend: string) => cells.filter((c) => c.runner === backend && c.work === 'forward-train').reduce((sum, c) => sum + c.median_ms, 0);
  const serverBackend = typeof args.backend === 'string' ? args.backend : ([...backends].sort((a, b) => total(a) - total(b))[0] ?? 'auto');
  // Shared memory under /dev/shm where the machine has it (a tmpfs), else the temporary directory.
  const shmDir = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const serverArgs = ['--backend', serverBackend, '--shm-dir', shmDir, ...(typeof args.durability === 'string' ? ['--durability', args.durability] : [])];
  const transportRows: TransportRow[] = [];
  log(`end to end: normserve ${serverArgs.join(' ')} and the echo server`);
  const server = await startServerProcess(serverArgs);
  const echo = await startEchoProcess();
  const admin = new NormserveClient(server.address);
  const forwardStub = new grpcObject.normserve.v1.BatchNormService(server.address, credentials.createInsecure(), clientChannelOptions());
  const EchoClient = loadEchoService();
  const echoStub = new EchoClient(echo.address, credentials.createInsecure(), clientChannelOptions());
  const endToEndRows: EndToEndRow[] = [];
  try {
    // Both connections up before anything is timed.
    await Promise.all([forwardStub, echoStub].map((stub) => new Promise<void>((resolve, reject) => stub.waitForReady(Date.now() + 10_000, (err) => (err ? reject(err) : resolve())))));
    for (const spec of want('e2e') ? SHAPES : []) {
      const row = await endToEnd(forwardStub, echoStub, admin, spec);
      endToEndRows.push(row);
      log(`  ${spec.label}: Forward ${ms(row.forward_ms)} ms, echo ${ms(row.echo_ms)} ms (${row.pairs} pairs)`);
    }
    for (const spec of want('transport') ? SHAPES : []) {
      const row = await transports(admin, echoStub, spec, shmDir);
      transportRows.push(row);
      log(`  ${spec.label}: ForwardStream ${ms(row.forward_stream_ms)} ms, EchoStream ${ms(row.echo_stream_ms)} ms, shared memory ${ms(row.forward_shm_ms)} ms`);
    }
  } finally {
    forwardStub.close();
    echoStub.close();
    admin.close();
    await Promise.all([stopChild(server.child), stopChild(echo.child)]);
  }

  // 5. Memory per in-flight call, for the largest shape.
  const largest = [...SHAPES].sort((a, b) => elements(b.shape) - elements(a.shape))[0]!;
  log(`memory: ${largest.label}, ${MEMORY_REPEATS} fresh server(s) per row`);
  const memoryRows: MemoryRow[] = [];
  for (const [k, transport] of want('memory') ? MEMORY_CONCURRENCY.flatMap((n) => (['unary', 'stream', 'echo'] as const).map((t) => [n, t] as const)) : []) {
    const row = await memoryPerCall(serverArgs, largest, k, transport);
    memoryRows.push(row);
    log(`  ${transport}, ${k} in flight: ${row.per_call_tensors} tensors per call (${row.method}; ${row.repeats.map((r) => `${r.rss_before_mb} -> ${r.peak_mb} MB`).join(', ')})`);
  }

  // Tables.
  const cell = (runner: string, work: Work | 'copy', shape: string) => cells.find((c) => c.runner === runner && c.work === work && c.shape === shape);
  const labels = SHAPES.map((s) => s.label);
  const lines: string[] = [];
  lines.push(`# normserve and its peers${QUICK ? ' (--quick)' : ''}`, '', `${machine}. Medians of ${TIMING.minRuns} to ${TIMING.maxRuns} runs after ${TIMING.warmup} warm-up.`);
  // The kernel tables only when the kernels ran (`--only e2e` and the like print their own parts).
  for (const work of want('kernels') ? WORKS : []) {
    lines.push('', `## ${WORK_TITLES[work]}`, '', 'ms (÷ onnxruntime, ÷ copy floor)', '');
    const body = [...backends, 'onnxruntime'].map((runner) => [
      runner,
      ...labels.map((label) => {
        const c = cell(runner, work, label);
        if (!c) return '—';
        const ortCell = cell('onnxruntime', work, label);
        const floor = cell('copy floor', 'copy', label);
        const vsOrt = runner === 'onnxruntime' || !ortCell ? '—' : ratioText(c.median_ms / ortCell.median_ms);
        const vsFloor = floor ? ratioText(c.median_ms / floor.median_ms) : '—';
        return `${ms(c.median_ms)} (${vsOrt}, ${vsFloor})`;
      }),
    ]);
    body.push(['copy floor', ...labels.map((label) => ms(cell('copy floor', 'copy', label)?.median_ms ?? NaN))]);
    lines.push(table(['runner', ...labels], body));
  }
  if (want('kernels')) {
    lines.push('', '## First call, ms (includes kernel compilation and first-touch allocation)', '');
    lines.push(
      table(
        ['runner', 'work', ...labels],
        [...backends, 'onnxruntime'].flatMap((runner) => WORKS.map((work) => [runner, work, ...labels.map((l) => (cell(runner, work, l) ? ms(cell(runner, work, l)!.first_call_ms) : '—'))])),
      ),
    );
  }
  if (want('e2e')) lines.push('', `## End to end: Forward (normserve ${serverArgs.join(' ')}, training mode) vs echo, same transport, interleaved`, '');
  if (want('e2e')) lines.push(
    table(
      ['shape', 'tensor MB', 'Forward ms', 'echo ms', 'Forward ÷ echo', 'first Forward ms', 'first echo ms', 'pairs'],
      endToEndRows.map((r) => [r.shape, r.tensor_mb.toFixed(2), ms(r.forward_ms), ms(r.echo_ms), ratioText(r.forward_over_echo), ms(r.forward_first_call_ms), ms(r.echo_first_call_ms), String(r.pairs)]),
    ),
  );
  if (want('transport')) lines.push('', '## Streams and shared memory: Forward unary, streamed in 1 MiB chunks, and through a shared-memory region (client writes and reads the file), beside the streamed echo', '');
  if (want('transport')) lines.push(
    table(
      ['shape', 'tensor MB', 'Forward ms', 'ForwardStream ms', 'EchoStream ms', 'ForwardStream ÷ EchoStream', 'ForwardStream GB/s', 'shared memory ms', 'shared memory GB/s', 'runs'],
      transportRows.map((r) => [
        r.shape,
        r.tensor_mb.toFixed(2),
        ms(r.forward_ms),
        ms(r.forward_stream_ms),
        ms(r.echo_stream_ms),
        ratioText(r.forward_stream_over_echo_stream),
        r.forward_stream_gb_per_s.toFixed(2),
        ms(r.forward_shm_ms),
        r.forward_shm_gb_per_s.toFixed(2),
        String(r.runs),
      ]),
    ),
  );
  if (want('memory')) lines.push('', `## Server memory per in-flight Forward, ${memoryRows[0]?.shape ?? ''} (fresh server per repeat, median of ${MEMORY_REPEATS})`, '');
  if (want('memory')) lines.push(
    table(
      ['call', 'in flight', 'tensor MB', 'RSS before MB', 'peak MB', 'per call MB', 'per call ÷ tensor', 'method'],
      memoryRows.map((r) => {
        const growth = (x: { rss_before_mb: number; peak_mb: number }) => x.peak_mb - x.rss_before_mb;
        const mid = [...r.repeats].sort((a, b) => growth(a) - growth(b))[r.repeats.length >> 1]!;
        const perCallMb = (r.per_call_tensors * r.tensor_mb).toFixed(1);
        const call = { unary: 'Forward', stream: 'ForwardStream', echo: 'echo (Echo)' }[r.transport];
        return [call, String(r.concurrent), r.tensor_mb.toFixed(2), mid.rss_before_mb.toFixed(1), mid.peak_mb.toFixed(1), perCallMb, r.per_call_tensors.toFixed(2), r.method];
      }),
    ),
  );
  if (skipped.length > 0) lines.push('', 'Not run here:', ...skipped.map((s) => `- ${s.runner}: ${s.reason}`));
  lines.push('', 'onnxruntime runs ONNX BatchNormalization (opset 15): its momentum weighs the old running value and its running variance is biased, unlike PyTorch; it is a speed anchor.');
  console.log(lines.join('\n'));

  const seconds = round((performance.now() - started) / 1000, 1);
  mkdirSync('bench-results', { recursive: true });
  const json = {
    machine,
    date: new Date().toISOString(),
    quick: QUICK,
    seconds,
    timing: TIMING,
    shapes: SHAPES.map((s) => ({ label: s.label, shape: s.shape, kind: s.kind })),
    runners: descriptions,
    skipped,
    cells,
    onnxruntime_checks: checks,
    end_to_end: { backend: serverBackend, rows: endToEndRows },
    transports: transportRows,
    memory: memoryRows,
  };
  writeFileSync('bench-results/peers.json', `${JSON.stringify(json, null, 2)}\n`);
  log(`wrote bench-results/peers.json (${seconds} s)`);
}

await main();
