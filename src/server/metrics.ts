/**
 * Prometheus metrics (prom-client) on their own HTTP port: calls by method and status, latency,
 * tensor bytes in and out, kernel time by backend, modules, pending group steps and waiting
 * calls, saved-context bytes, stream reservations, pooled tensors, shared-memory regions, store
 * write latency, and Node's process metrics. Each server has its
 * own registry, so that several servers in one process (tests) do not share counters.
 */
import { createServer, type Server } from 'node:http';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Kernels } from '../kernels/kernels.js';

export interface MetricSources {
  readonly modules: () => number;
  readonly pending: () => { steps: number; waiters: number };
  readonly contexts: () => { count: number; bytes: number };
  /** Bytes streamed calls have reserved against --stream-budget-bytes. */
  readonly streamBytes: () => number;
  /** Released tensors and answer copies kept for reuse. */
  readonly pooledBytes: () => number;
  readonly regions: () => number;
}

const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

export class Metrics {
  readonly registry = new Registry();
  readonly #calls = new Counter({ name: 'normserve_grpc_calls_total', help: 'gRPC calls by method and status code', labelNames: ['method', 'code'], registers: [this.registry] });
  readonly #duration = new Histogram({
    name: 'normserve_grpc_call_duration_seconds',
    help: 'Time from a call arriving to its status being sent',
    labelNames: ['method'],
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly #bytesIn = new Counter({ name: 'normserve_grpc_received_bytes_total', help: 'Tensor bytes received, by method', labelNames: ['method'], registers: [this.registry] });
  readonly #bytesOut = new Counter({ name: 'normserve_grpc_sent_bytes_total', help: 'Tensor bytes sent, by method', labelNames: ['method'], registers: [this.registry] });
  readonly #kernel = new Histogram({
    name: 'normserve_kernel_seconds',
    help: 'Time in compute kernels, by backend and kernel',
    labelNames: ['backend', 'kernel'],
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly #storeWrites = new Histogram({
    name: 'normserve_store_write_seconds',
    help: 'Time to write a change to the store (including fsync)',
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly #storeSyncs = new Histogram({
    name: 'normserve_store_sync_seconds',
    help: 'With --durability process: time to sync the written changes to disk, every --checkpoint-ms',
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly #contextsDropped = new Counter({
    name: 'normserve_saved_contexts_dropped_total',
    help: 'Saved forwards dropped before their backward, by reason',
    labelNames: ['reason'],
    registers: [this.registry],
  });

  constructor(sources: MetricSources) {
    const gauge = (name: string, help: string, read: () => number) =>
      new Gauge({
        name,
        help,
        registers: [this.registry],
        collect() {
          this.set(read());
        },
      });
    gauge('normserve_modules', 'Modules held', sources.modules);
    gauge('normserve_sync_pending_steps', 'Group steps waiting for ranks', () => sources.pending().steps);
    gauge('normserve_sync_waiting_calls', 'Calls waiting in group steps', () => sources.pending().waiters);
    gauge('normserve_saved_contexts', 'Saved forwards waiting for their backward', () => sources.contexts().count);
    gauge('normserve_saved_context_bytes', 'Bytes held by saved forwards', () => sources.contexts().bytes);
    gauge('normserve_stream_reserved_bytes', 'Bytes streamed calls in flight have reserved against the stream budget', sources.streamBytes);
    gauge('normserve_pooled_tensor_bytes', 'Bytes of released tensors and answer copies kept for reuse', sources.pooledBytes);
    gauge('normserve_shm_regions', 'Shared-memory regions registered', sources.regions);
    collectDefaultMetrics({ register: this.registry });
  }

  observeCall(method: string, code: string, seconds: number, bytesIn: number, bytesOut: number): void {
    this.#calls.inc({ method, code });
    this.#duration.observe({ method }, seconds);
    if (bytesIn > 0) this.#bytesIn.inc({ method }, bytesIn);
    if (bytesOut > 0) this.#bytesOut.inc({ method }, bytesOut);
  }

  observeStoreWrite(seconds: number): void {
    this.#storeWrites.observe(seconds);
  }

  observeStoreSync(seconds: number): void {
    this.#storeSyncs.observe(seconds);
  }

  contextDropped(reason: string): void {
    this.#contextsDropped.inc({ reason });
  }

  /** The same kernels, with the time of each call recorded. */
  timed(kernels: Kernels): Kernels {
    const histogram = this.#kernel;
    const backend = kernels.backend;
    const time = <A extends unknown[], R>(kernel: string, fn: (...args: A) => Promise<R>) => {
      return async (...args: A): Promise<R> => {
        const end = histogram.startTimer({ backend, kernel });
        try {
          return await fn(...args);
        } finally {
          end();
        }
      };
    };
    return {
      backend,
      description: kernels.description,
      stats: time('stats', kernels.stats.bind(kernels)),
      normalize: time('normalize', kernels.normalize.bind(kernels)),
      gradSums: time('gradSums', kernels.gradSums.bind(kernels)),
      gradInput: time('gradInput', kernels.gradInput.bind(kernels)),
      ...(kernels.fused && {
        fused: {
          trainForward: time('trainForward', kernels.fused.trainForward.bind(kernels.fused)),
          backward: time('backward', kernels.fused.backward.bind(kernels.fused)),
        },
      }),
      ...(kernels.allocate && { allocate: kernels.allocate.bind(kernels) }),
      ...(kernels.release && { release: kernels.release.bind(kernels) }),
      ...(kernels.headRoom && { headRoom: kernels.headRoom.bind(kernels) }),
      dispose: () => kernels.dispose(),
    };
  }

  /** Serves `GET /metrics` in Prometheus text format. Resolves with the port once listening. */
  serve(host: string, port: number): Promise<{ port: number; close: () => Promise<void> }> {
    const server: Server = createServer((req, res) => {
      if (req.method !== 'GET' || req.url?.split('?')[0] !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: metrics are at /metrics\n');
        return;
      }
      this.registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': this.registry.contentType }).end(text),
        (err: Error) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${err.message}\n`),
      );
    });
    return new Promise((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => {
        // A second server on one host meets the first one's metrics port (9464 by default).
        if (err.code === 'EADDRINUSE') {
          reject(new Error(`metrics port ${port} on ${host} is in use (another normserve on this host?): start this one with --metrics-port 0 for a free port (logged as metrics_port), or another free port`));
        } else reject(err);
      });
      server.listen(port, host, () => {
        const address = server.address();
        resolve({
          port: typeof address === 'object' && address ? address.port : port,
          close: () => new Promise<void>((done) => server.close(() => done())),
        });
      });
    });
  }
}
