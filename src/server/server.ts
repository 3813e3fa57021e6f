/**
 * The server: grpc-js with the BatchNorm services, the Open Inference Protocol, grpc.health.v1 and
 * reflection, bound to the configured address; and its orderly shutdown.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { Server, ServerCredentials } from '@grpc/grpc-js';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation } from 'grpc-health-check';
import type { Logger } from 'pino';
import type { Config } from '../config.js';
import type { Kernels } from '../kernels/kernels.js';
import { ContextStore } from '../registry/context-store.js';
import { ModuleRegistry, pageRequest, pageTokenAfter, type Page } from '../registry/module-registry.js';
import { BatchNorm } from '../nn/batch-norm.js';
import { Persistence } from '../store/persistence.js';
import { SqliteStore } from '../store/sqlite-store.js';
import type { Store, Stored } from '../store/store.js';
import { packageDefinition } from '../wire/proto.js';
import { answerBufferBytes } from '../wire/tensor-answer.js';
import { bnError } from '../errors.js';
import { Coordinator } from '../sync/coordinator.js';
import { addBatchNormService } from './batch-norm-service.js';
import { addSyncBatchNormService } from './sync-batch-norm-service.js';
import { addInferenceService } from './inference-service.js';
import { BATCH_NORM_SERVICE_NAME, INFERENCE_SERVICE_NAME, SYNC_SERVICE_NAME } from '../wire/proto.js';
import { Authenticator } from './auth.js';
import { callLogInterceptor } from './call-log.js';
import { Metrics } from './metrics.js';
import { createGrpcServer } from '../wire/transport.js';
import { PlainCopies, StreamBudget } from './tensor-call.js';
import { RegionRegistry } from './shared-memory.js';
import { parseStore } from '../config.js';
import { EtcdCluster } from '../cluster/etcd-cluster.js';
import { slotOf } from '../cluster/slots.js';

export { BATCH_NORM_SERVICE_NAME, SYNC_SERVICE_NAME } from '../wire/proto.js';
/**
 * The health service name for liveness probes: SERVING while the process serves at all, draining
 * included, so that a probe never restarts a replica for being busy or shutting down.
 */
export const LIVENESS_SERVICE_NAME = 'liveness';

/** How long one request to etcd may take before its answer counts as lost. */
const ETCD_REQUEST_TIMEOUT_MS = 5000;

export interface RunningServer {
  readonly port: number;
  readonly metricsPort: number;
  /** The plaintext health-only port, or 0 when there is none. */
  readonly healthPort: number;
  readonly metrics: Metrics;
  /** With an etcd store: this replica's membership, and the slots it owns. */
  readonly cluster: EtcdCluster | undefined;
  /**
   * Settles once the replica has joined its cluster in etcd (at once for sqlite); rejects when it
   * cannot, for a reason that waiting does not mend (another cluster's keys under the prefix).
   */
  readonly joined: Promise<void>;
  readonly registry: ModuleRegistry;
  readonly contexts: ContextStore;
  readonly coordinator: Coordinator;
  /** Calls being handled now. */
  inFlight(): number;
  /**
   * Health NOT_SERVING, new calls refused with UNAVAILABLE, calls in flight given `graceMs` to
   * finish before they are cancelled, then the kernels released.
   */
  shutdown(graceMs: number): Promise<void>;
}

export interface ServerDeps {
  readonly kernels: Kernels;
  readonly logger: Logger;
}

export async function startServer(
  config: Pick<
    Config,
    | 'host'
    | 'port'
    | 'metricsPort'
    | 'healthPort'
    | 'store'
    | 'advertiseAddress'
    | 'leaseTtlSeconds'
    | 'tlsCert'
    | 'tlsKey'
    | 'tlsClientCa'
    | 'authTokensFile'
    | 'durability'
    | 'checkpointMs'
    | 'maxMessageBytes'
    | 'flowControlWindow'
    | 'streamBudgetBytes'
    | 'streamChunkBytes'
    | 'shmDir'
    | 'maxTensorElements'
    | 'maxModules'
    | 'maxCalls'
    | 'maxCallsPerModule'
    | 'contextBudgetBytes'
    | 'contextTtlMs'
    | 'stepTimeoutMs'
    | 'stepResultsKept'
  >,
  deps: ServerDeps,
): Promise<RunningServer> {
  const { logger } = deps;
  let registry: ModuleRegistry;
  let coordinator: Coordinator;
  let contexts: ContextStore;
  const regions = new RegionRegistry(config.shmDir);
  const plain = new PlainCopies();
  const streams = new StreamBudget(config.streamBudgetBytes);
  const metrics = new Metrics({
    modules: () => registry.size,
    pending: () => coordinator.pending(),
    contexts: () => ({ count: contexts.size, bytes: contexts.bytes }),
    streamBytes: () => streams.used,
    pooledBytes: () => (deps.kernels.pooledBytes ?? 0) + plain.bytes + answerBufferBytes(),
    regions: () => regions.size,
  });
  const kernels = metrics.timed(deps.kernels);
  const server = createGrpcServer({
    maxMessageBytes: config.maxMessageBytes,
    flowControlWindow: config.flowControlWindow,
    interceptors: [callLogInterceptor(logger, metrics)],
  });
  // The store. SQLite: one server owns every module, restored before serving (readiness is only
  // reported once every module is back). etcd: the replica joins the cluster once its port is
  // bound, and takes its slots' modules from etcd as it comes to own them.
  const spec = parseStore(config.store);
  const sqlite = spec.kind === 'sqlite' ? new SqliteStore(spec.dir, config.stepResultsKept, { syncEachCommit: config.durability !== 'process' }) : undefined;
  const member = `${hostname()}-${randomBytes(4).toString('hex')}`;
  let cluster: EtcdCluster | undefined;
  let store: Store;
  if (spec.kind === 'etcd') {
    cluster = new EtcdCluster({
      endpoints: spec.endpoints,
      prefix: spec.prefix,
      member,
      leaseTtlSeconds: config.leaseTtlSeconds,
      requestTimeoutMs: ETCD_REQUEST_TIMEOUT_MS,
      keepSteps: config.stepResultsKept,
      logger,
    });
    store = cluster.store;
  } else {
    store = sqlite!;
  }
  const persistence = new Persistence(store, {
    durability: config.durability,
    checkpointMs: config.checkpointMs,
    logger,
    onWrite: (seconds) => metrics.observeStoreWrite(seconds),
    onSync: (seconds) => metrics.observeStoreSync(seconds),
  });
  const ownership = cluster;
  registry = new ModuleRegistry(config.maxModules, persistence, { maxQueued: config.maxCallsPerModule, ...(ownership && { guard: (name: string) => ownership.check(name) }) });
  contexts = new ContextStore(config.contextBudgetBytes, config.contextTtlMs, (e) => {
    metrics.contextDropped(e.reason);
    logger.warn({ module: e.module, context_id: e.id, bytes: e.bytes, reason: e.reason }, 'saved context dropped before its backward');
  });
  coordinator = new Coordinator(registry, { stepTimeoutMs: config.stepTimeoutMs, keepSteps: config.stepResultsKept });
  const restore = (stored: Stored) => {
    registry.restore(stored.modules);
    coordinator.restore(stored.steps);
  };
  if (sqlite) {
    const stored = sqlite.load();
    restore(stored);
    logger.info({ store: sqlite.location, durability: config.durability, modules: stored.modules.length, steps: stored.steps.length }, 'state restored');
  }
  const listModules = cluster
    ? async (pageSize: number, pageToken: string, visible: (name: string) => boolean): Promise<Page> => {
        const { after, size } = pageRequest(pageSize, pageToken);
        const { modules, more } = await cluster!.store.list(after, size, visible);
        return {
          modules: modules.map(({ name, snapshot }) => ({ name, module: BatchNorm.fromSnapshot(snapshot) })),
          nextPageToken: more && modules.length > 0 ? pageTokenAfter(modules[modules.length - 1]!.name) : '',
        };
      }
    : async (pageSize: number, pageToken: string, visible: (name: string) => boolean) => registry.list(pageSize, pageToken, visible);
  let draining = false;
  // Set with health SERVING: the state is restored and every port is up.
  let serving = false;
  const auth = config.authTokensFile ? Authenticator.fromFile(config.authTokensFile) : Authenticator.disabled();
  const serviceDeps = {
    auth,
    ownership,
    listModules,
    registry,
    contexts,
    coordinator,
    kernels,
    maxTensorElements: config.maxTensorElements,
    ...(kernels.allocate && { allocate: kernels.allocate.bind(kernels) }),
    release: (t: Float32Array) => {
      if (t.buffer instanceof SharedArrayBuffer) kernels.release?.(t);
      else plain.give(t);
    },
    streams,
    plain,
    regions,
    // A chunk must fit a message, with room for the field's tag and length.
    streamChunkBytes: Math.min(config.streamChunkBytes, config.maxMessageBytes - 64),
    logger,
    draining: () => draining,
    inFlight: { count: 0 },
    maxCalls: config.maxCalls,
  };
  addBatchNormService(server, serviceDeps);
  addSyncBatchNormService(server, serviceDeps);
  addInferenceService(server, { ...serviceDeps, ready: () => serving && !draining });
  // Readiness: '' and the three APIs, NOT_SERVING until restored and again while draining.
  const services = ['', BATCH_NORM_SERVICE_NAME, SYNC_SERVICE_NAME, INFERENCE_SERVICE_NAME];
  const health = new HealthImplementation({
    ...Object.fromEntries(services.map((s) => [s, 'NOT_SERVING' as const])),
    [LIVENESS_SERVICE_NAME]: 'SERVING',
  });
  health.addToServer(server);
  new ReflectionService(packageDefinition).addToServer(server);

  const host = config.host.includes(':') ? `[${config.host}]` : config.host;
  const credentials = serverCredentials(config);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(`${host}:${config.port}`, credentials, (err, bound) => (err ? reject(err) : resolve(bound))),
  );
  logger.info({ tls: config.tlsCert !== '', mutual_tls: config.tlsClientCa !== '', authentication: auth.enabled }, 'transport security');
  const metricsServer = await metrics.serve(config.host, config.metricsPort);
  const healthServer = config.healthPort === 0 ? undefined : await serveHealthOnly(health, host, config.healthPort);
  let joined: Promise<void> = Promise.resolve();
  if (cluster) {
    const address = config.advertiseAddress || `${hostname()}:${port}`;
    joined = cluster
      .join(address, {
        open: (_slot, stored) => restore(stored),
        close: async (slot, error) => {
          const inSlot = (name: string) => slotOf(name) === slot;
          // Ranks waiting in a step of these modules go where the modules go.
          coordinator.dropWhere(inSlot, error);
          for (const name of await registry.evict(inSlot)) contexts.dropModule(name);
        },
      })
      .then(() => logger.info({ store: store.location, member, address }, 'serving from etcd'));
  }
  // Ready: restored (sqlite) or joined with a lease etcd confirms (etcd), and not draining.
  const ready = () => !draining && (cluster === undefined || cluster.confirmed);
  let reported = false;
  const report = () => {
    serving = ready();
    if (serving === reported) return;
    reported = serving;
    for (const s of services) health.setStatus(s, serving ? 'SERVING' : 'NOT_SERVING');
    if (cluster) logger.info({ ready: serving, slots: cluster.serving }, serving ? 'ready' : 'not ready: etcd does not confirm the lease');
  };
  report();
  const readiness = cluster ? setInterval(report, 250) : undefined;
  readiness?.unref();

  let closing: Promise<void> | undefined;
  const shutdown = (graceMs: number) => {
    closing ??= (async () => {
      draining = true;
      clearInterval(readiness);
      for (const s of services) health.setStatus(s, 'NOT_SERVING');
      // Ranks waiting in a step would wait out the grace period: end their steps now.
      coordinator.abortAll(bnError('BN_ERR_SHUTTING_DOWN', {}));
      await new Promise<void>((resolve) => {
        // tryShutdown can hang on half-closed streams (grpc-node #1458, #1664): force after the grace.
        const timer = setTimeout(() => {
          logger.warn({ grace_ms: graceMs }, 'calls still in flight after the grace period; cancelling them');
          server.forceShutdown();
          resolve();
        }, graceMs);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      contexts.close();
      await regions.close();
      await persistence.close();
      // After the drain: the slots move to the other replicas at once.
      await cluster?.leave();
      await metricsServer.close();
      healthServer?.forceShutdown();
      await kernels.dispose();
    })();
    return closing;
  };
  return { port, metricsPort: metricsServer.port, healthPort: healthServer?.port ?? 0, metrics, cluster, joined, registry, contexts, coordinator, inFlight: () => serviceDeps.inFlight.count, shutdown };
}

/**
 * grpc.health.v1 alone, in plaintext, on its own port: Kubernetes' gRPC probes cannot speak TLS,
 * and health tells nothing that needs protecting.
 */
async function serveHealthOnly(health: HealthImplementation, host: string, port: number): Promise<Server & { port: number }> {
  const server = new Server();
  health.addToServer(server);
  const bound = await new Promise<number>((resolve, reject) =>
    server.bindAsync(`${host}:${port}`, ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return Object.assign(server, { port: bound });
}

/** Plaintext, TLS, or mutual TLS, from the certificate settings. */
function serverCredentials(config: Pick<Config, 'tlsCert' | 'tlsKey' | 'tlsClientCa'>): ServerCredentials {
  if (config.tlsCert === '' && config.tlsKey === '') {
    if (config.tlsClientCa !== '') throw new Error('--tls-client-ca needs --tls-cert and --tls-key');
    return ServerCredentials.createInsecure();
  }
  if (config.tlsCert === '' || config.tlsKey === '') throw new Error('TLS needs both --tls-cert and --tls-key');
  const read = (path: string, what: string) => {
    try {
      return readFileSync(path);
    } catch (err) {
      throw new Error(`cannot read the ${what} ${path}: ${(err as Error).message}`);
    }
  };
  const ca = config.tlsClientCa === '' ? null : read(config.tlsClientCa, 'client CA');
  return ServerCredentials.createSsl(ca, [{ cert_chain: read(config.tlsCert, 'certificate'), private_key: read(config.tlsKey, 'private key') }], ca !== null);
}
