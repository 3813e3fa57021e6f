/**
 * The server: grpc-js with the BatchNorm services, the Open Inference Protocol, grpc.health.v1 and
 * reflection, bound to the configured address; and its orderly shutdown.
 */
import { readFileSync } from 'node:fs';
import { Server, ServerCredentials } from '@grpc/grpc-js';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation } from 'grpc-health-check';
import type { Logger } from 'pino';
import type { Config } from '../config.js';
import type { Kernels } from '../kernels/kernels.js';
import { ContextStore } from '../registry/context-store.js';
import { ModuleRegistry } from '../registry/module-registry.js';
import { Persistence } from '../store/persistence.js';
import { SqliteStore } from '../store/sqlite-store.js';
import { packageDefinition } from '../wire/proto.js';
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
import { parsePeers, Placement } from '../cluster/placement.js';

export { BATCH_NORM_SERVICE_NAME, SYNC_SERVICE_NAME } from '../wire/proto.js';
/**
 * The health service name for liveness probes: SERVING while the process serves at all, draining
 * included, so that a probe never restarts a replica for being busy or shutting down.
 */
export const LIVENESS_SERVICE_NAME = 'liveness';

export interface RunningServer {
  readonly port: number;
  readonly metricsPort: number;
  /** The plaintext health-only port, or 0 when there is none. */
  readonly healthPort: number;
  readonly metrics: Metrics;
  readonly placement: Placement;
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
    | 'peers'
    | 'selfAddress'
    | 'tlsCert'
    | 'tlsKey'
    | 'tlsClientCa'
    | 'authTokensFile'
    | 'dataDir'
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
    pooledBytes: () => (deps.kernels.pooledBytes ?? 0) + plain.bytes,
    regions: () => regions.size,
  });
  const kernels = metrics.timed(deps.kernels);
  const server = createGrpcServer({
    maxMessageBytes: config.maxMessageBytes,
    flowControlWindow: config.flowControlWindow,
    interceptors: [callLogInterceptor(logger, metrics)],
  });
  // Restore before serving: readiness is only reported once every module is back.
  const store = new SqliteStore(config.dataDir, config.stepResultsKept);
  const persistence = new Persistence(store, {
    durability: config.durability,
    checkpointMs: config.checkpointMs,
    logger,
    onWrite: (seconds) => metrics.observeStoreWrite(seconds),
  });
  const stored = store.load();
  registry = new ModuleRegistry(config.maxModules, persistence, config.maxCallsPerModule);
  registry.restore(stored.modules);
  const placement = new Placement(parsePeers(config.peers), config.selfAddress, (name) => registry.has(name));
  contexts = new ContextStore(config.contextBudgetBytes, config.contextTtlMs, (e) => {
    metrics.contextDropped(e.reason);
    logger.warn({ module: e.module, context_id: e.id, bytes: e.bytes, reason: e.reason }, 'saved context dropped before its backward');
  });
  coordinator = new Coordinator(registry, { stepTimeoutMs: config.stepTimeoutMs, keepSteps: config.stepResultsKept });
  coordinator.restore(stored.steps);
  logger.info({ store: store.location, durability: config.durability, modules: stored.modules.length, steps: stored.steps.length }, 'state restored');
  let draining = false;
  // Set with health SERVING: the state is restored and every port is up.
  let serving = false;
  const auth = config.authTokensFile ? Authenticator.fromFile(config.authTokensFile) : Authenticator.disabled();
  const serviceDeps = {
    auth,
    placement,
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
  logger.info({ peers: placement.peers, self: config.selfAddress || undefined, replicas: placement.replicas, owns: placement.owns }, 'placement');
  if (!placement.owns) logger.warn({ self: config.selfAddress }, 'this replica is not among its peers: it owns no module and serves only reads and deletes of the copies it holds');
  for (const s of services) health.setStatus(s, 'SERVING');
  serving = true;

  let closing: Promise<void> | undefined;
  const shutdown = (graceMs: number) => {
    closing ??= (async () => {
      draining = true;
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
      persistence.close();
      await metricsServer.close();
      healthServer?.forceShutdown();
      await kernels.dispose();
    })();
    return closing;
  };
  return { port, metricsPort: metricsServer.port, healthPort: healthServer?.port ?? 0, metrics, placement, registry, contexts, coordinator, inFlight: () => serviceDeps.inFlight.count, shutdown };
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
