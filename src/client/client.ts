/**
 * A typed TypeScript client for normserve.v1.BatchNormService: typed arrays in, typed arrays
 * out, bigint counters, and errors that carry the status, the normserve reason code and the
 * PyTorch exception class.
 */
import {
  credentials as grpcCredentials,
  status as grpcStatus,
  makeGenericClientConstructor,
  Metadata as GrpcMetadata,
  type ChannelCredentials,
  type ChannelOptions,
  type Client,
  type ClientDuplexStream,
  type ServiceError,
} from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import type { BatchNormServiceClient } from '../generated/normserve/v1/BatchNormService.js';
import type { Module__Output } from '../generated/normserve/v1/Module.js';
import type { ModuleState, ModuleState__Output } from '../generated/normserve/v1/ModuleState.js';
import type { Tensor__Output } from '../generated/normserve/v1/Tensor.js';
import type { ModuleKind } from '../nn/config.js';
import type { StateDict } from '../nn/state-dict.js';
import { grpcObject } from '../wire/proto.js';
import { NormserveClientError } from './errors.js';

export { NormserveClientError, type FieldViolation } from './errors.js';
import { encodeTensor } from '../wire/tensor-codec.js';
import { clientChannelOptions } from '../wire/transport.js';
import type { SharedMemoryFile } from './shared-memory.js';
import { RegionPool, type AutoSharedMemory } from './auto-shm.js';
import { ConnectionPool } from './connection-pool.js';

/** A state_dict; an absent key is one the module does not have (None). */
export type { ModuleKind, StateDict };

export interface TensorData {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

export interface Gradients {
  gradInput: TensorData;
  /** null when the module is not affine. */
  gradWeight: Float32Array | null;
  gradBias: Float32Array | null;
}

export type SyncRule = 'SYNC_WHEN_BATCH_STATS' | 'SYNC_WHEN_TRAINING';

/** Which step of which group a SyncBatchNorm call is part of. */
export interface StepRef {
  step: number | bigint;
  rank: number;
  worldSize: number;
}

/** Statistics the group normalises with (the group's, or this rank's own when it did not sync). */
export interface StepStats {
  count: number;
  mean: Float64Array;
  invstd: Float64Array;
  synced: boolean;
}

export interface ModuleSpec {
  kind: ModuleKind;
  numFeatures: number;
  /** SYNC_BATCH_NORM: ranks in the group (default 1). */
  worldSize?: number;
  /** SYNC_BATCH_NORM: when the group pools statistics (default SYNC_WHEN_BATCH_STATS, PR #44445). */
  syncRule?: SyncRule;
  eps?: number;
  /** null is PyTorch's momentum=None (cumulative average). */
  momentum?: number | null;
  affine?: boolean;
  trackRunningStats?: boolean;
}

export interface ModuleInfo {
  name: string;
  kind: ModuleKind;
  numFeatures: number;
  eps: number;
  momentum: number | null;
  affine: boolean;
  /** As constructed: whether the buffers were created. */
  builtWithRunningStats: boolean;
  training: boolean;
  /** The current attribute. */
  trackRunningStats: boolean;
  numBatchesTracked: bigint | null;
  hasRunningMean: boolean;
  hasRunningVar: boolean;
  repr: string;
  worldSize: number;
  syncRule: SyncRule;
}

export type BufferName = 'running_mean' | 'running_var' | 'num_batches_tracked';

export interface ModuleChanges {
  training?: boolean;
  trackRunningStats?: boolean;
  /** null assigns momentum = None. */
  momentum?: number | null;
  eps?: number;
  clearBuffers?: BufferName[];
}

export interface LoadOptions {
  /** Default true, as in PyTorch. */
  strict?: boolean;
  /** The state_dict metadata version; default 2. null: a dict without metadata. */
  version?: number | null;
}

export interface LoadResult {
  module: ModuleInfo;
  missingKeys: string[];
  unexpectedKeys: string[];
}

export interface ClientOptions {
  /** TLS or mutual TLS: grpc.credentials.createSsl(ca, key, cert). Plaintext by default. */
  credentials?: ChannelCredentials;
  /** Sent as `authorization: Bearer <token>` on every call, for servers with --auth-tokens-file. */
  token?: string;
  /** grpc-js channel options, over the client's own (connections of its own, unlimited messages, the window). */
  channelOptions?: ChannelOptions;
  /** Tensors larger than this many bytes are streamed in chunks (default 32 MiB). */
  streamAboveBytes?: number;
  /** Bytes per chunk when streaming (default 1 MiB). */
  streamChunkBytes?: number;
  /** HTTP/2 flow-control window of the client's end, in bytes (default 16 MiB; 65535 keeps HTTP/2's default). */
  flowControlWindow?: number;
  /** Deadline of each call, in milliseconds, over all its attempts; none by default. */
  deadlineMs?: number;
  /**
   * Retries of calls answered UNAVAILABLE, the one status that means "try again" (default: 8
   * attempts, backoff from 50 ms doubling to 2 s, with jitter, about 7 s in all; false: none). A
   * call the server refused unchanged (a catalogue reason such as BN_ERR_SHUTTING_DOWN, or
   * BN_ERR_SLOT_MOVING while a module changes replicas) is always retried; after a transport
   * failure, when the server may have acted, only calls that are safe to repeat are (reads, and
   * SyncBatchNorm calls, whose steps the server deduplicates).
   */
  retry?: RetryPolicy | false;
  /**
   * Follow BN_ERR_NOT_OWNER to the replica it names, and remember it for the module (default
   * true): with replicas on etcd, `address` may be any replica, or a Service in front of them.
   */
  followOwner?: boolean;
  /**
   * Shared memory chosen by size and locality: Forward and Backward to a replica on a loopback
   * address move tensors above `aboveBytes` through files under `dir` (the server's --shm-dir),
   * registered once and reused; a replica that refuses regions is served over the wire. Call
   * `close()` to unregister them and remove the files.
   */
  sharedMemory?: AutoSharedMemory;
}

/** How a tensor travels: inside one message, or streamed in chunks (default: streamed above `streamAboveBytes`). */
export type Transport = 'unary' | 'stream';
export interface TransportChoice {
  transport?: Transport;
  /**
   * Move the tensors through a registered shared-memory region instead: the input is written
   * into `file` at `inputOffset`, the server reads it there and writes its answer at
   * `outputOffset`, where it is read back.
   */
  region?: RegionUse;
}

export interface RegionUse {
  /** The name it was registered under. */
  name: string;
  file: SharedMemoryFile;
  /** Where the region starts in the file (the offset it was registered with; default 0). */
  fileOffset?: number;
  /** Where the input and the answer go, in bytes from the region's start. */
  inputOffset: number;
  outputOffset: number;
  /** An array to read the answer into (reused across calls, it saves fresh memory's page faults). */
  into?: Float32Array;
}

export interface RegionInfo {
  name: string;
  path: string;
  offset: number;
  byteSize: number;
}

interface StreamPart {
  part?: 'head' | 'chunk';
  head?: Record<string, unknown> | null;
  chunk?: Buffer;
}

function writeStream(call: ClientDuplexStream<object, StreamPart>, message: object): Promise<void> {
  return new Promise((resolve) => {
    if (call.write(message)) resolve();
    else call.once('drain', resolve);
  });
}

interface WireRegion {
  name: string;
  path: string;
  offset: string;
  byte_size: string;
}

const regionFromWire = (r: WireRegion): RegionInfo => ({ name: r.name, path: r.path, offset: Number(r.offset), byteSize: Number(r.byte_size) });

function tensorFromWire(t: Tensor__Output | null | undefined): TensorData {
  if (!t || t.dtype !== 'FLOAT32') throw new Error('normserve client: expected a FLOAT32 tensor in the reply');
  const bytes = t.data;
  const data = new Float32Array(bytes.byteLength / 4);
  new Uint8Array(data.buffer).set(bytes);
  return { shape: t.shape.map(Number), data };
}

/** The configuration a module was created with, as createModule takes it (to recreate or compare it). */
export function specOf(info: ModuleInfo): ModuleSpec {
  return {
    kind: info.kind,
    numFeatures: info.numFeatures,
    eps: info.eps,
    momentum: info.momentum,
    affine: info.affine,
    trackRunningStats: info.builtWithRunningStats,
    worldSize: info.worldSize,
    syncRule: info.syncRule,
  };
}

function moduleFromWire(m: Module__Output): ModuleInfo {
  const c = m.config!;
  return {
    name: m.name,
    kind: c.kind as ModuleKind,
    numFeatures: Number(c.num_features),
    eps: c.eps ?? 1e-5,
    momentum: c.cumulative_average ? null : (c.momentum ?? 0.1),
    affine: c.affine ?? true,
    builtWithRunningStats: c.track_running_stats ?? true,
    training: m.training,
    trackRunningStats: m.track_running_stats,
    numBatchesTracked: m.num_batches_tracked === undefined ? null : BigInt(m.num_batches_tracked),
    hasRunningMean: m.has_running_mean,
    hasRunningVar: m.has_running_var,
    repr: m.repr,
    worldSize: c.world_size || 1,
    syncRule: c.sync_rule === 'SYNC_WHEN_TRAINING' ? 'SYNC_WHEN_TRAINING' : 'SYNC_WHEN_BATCH_STATS',
  };
}

function stateFromWire(s: ModuleState__Output): StateDict {
  const out: StateDict = {};
  for (const key of ['weight', 'bias', 'running_mean', 'running_var'] as const) {
    const t = s[key];
    if (t) out[key] = tensorFromWire(t).data;
  }
  if (s.num_batches_tracked !== undefined) out.num_batches_tracked = BigInt(s.num_batches_tracked);
  return out;
}

const BUFFER_ENUM = { running_mean: 'RUNNING_MEAN', running_var: 'RUNNING_VAR', num_batches_tracked: 'NUM_BATCHES_TRACKED' } as const;

const HealthClient = makeGenericClientConstructor(healthService as never, 'Health');

export type ServingStatus = 'UNKNOWN' | 'SERVING' | 'NOT_SERVING' | 'SERVICE_UNKNOWN';

const stepFields = (ref: StepRef) => ({ step: String(ref.step), rank: ref.rank, world_size: ref.worldSize });
const f64 = (values: number[]) => Float64Array.from(values);

export interface RetryPolicy {
  maxAttempts?: number;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
}

/** Per call: a deadline of its own, over all its attempts. */
export interface CallOptions {
  deadlineMs?: number;
}

/** Calls that give the same result when repeated, so a transport failure may be retried. */
const SAFE_TO_REPEAT = new Set([
  'Check',
  'GetModule',
  'ListModules',
  'GetState',
  'ListRegions',
  'UpdateModule',
  'LoadState',
  'ResetRunningStats',
  'ResetParameters',
  'SyncForward',
  'SyncBackward',
  'GatherStats',
  'ReduceGrads',
]);

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The stubs of one connection to a replica, sharing its channel. */
interface Endpoint {
  readonly modules: BatchNormServiceClient;
  readonly sync: Client;
  readonly health: Client;
}
type ServiceKind = keyof Endpoint;
/** The tensor bytes a call moves each way, which decide whether it shares a connection. */
type CallBytes = number;

/** Calls that name no module (or name a region): they go to the client's own address. */
const UNROUTED = new Set(['Check', 'ListModules', 'RegisterRegion', 'UnregisterRegion', 'ListRegions']);
/** Owners learnt from BN_ERR_NOT_OWNER answers are kept for this many names. */
const LEARNT_OWNERS_LIMIT = 65_536;
/** BN_ERR_NOT_OWNER answers followed by one call (a module can move while the call is on its way). */
const MAX_HOPS = 4;

export class NormserveClient {
  readonly #address: string;
  readonly #pools = new Map<string, ConnectionPool<Endpoint>>();
  readonly #owners = new Map<string, string>();
  readonly #credentials: ChannelCredentials;
  readonly #channelOptions: ChannelOptions;
  readonly #deadlineMs: number | undefined;
  readonly #token: string | undefined;
  readonly #streamAboveBytes: number;
  readonly #streamChunkBytes: number;
  readonly #followOwner: boolean;
  readonly #retry: Required<RetryPolicy>;
  readonly #regions: RegionPool | undefined;

  constructor(address: string, options: ClientOptions = {}) {
    this.#address = address;
    this.#followOwner = options.followOwner ?? true;
    this.#retry = options.retry === false ? { maxAttempts: 1, initialBackoffMs: 0, maxBackoffMs: 0 } : { maxAttempts: 8, initialBackoffMs: 50, maxBackoffMs: 2000, ...options.retry };
    this.#credentials = options.credentials ?? grpcCredentials.createInsecure();
    // Connections of its own (grpc-js would put every client of the process on one), and one per
    // overlapping tensor call (ConnectionPool): two Node.js ends with 16 MiB windows deadlock when
    // tensors move both ways at once on one connection (docs/load.md).
    this.#channelOptions = { ...clientChannelOptions(options.flowControlWindow), 'grpc.use_local_subchannel_pool': 1, ...options.channelOptions };
    this.#deadlineMs = options.deadlineMs;
    this.#token = options.token;
    this.#streamAboveBytes = options.streamAboveBytes ?? 32 * 1024 * 1024;
    this.#streamChunkBytes = options.streamChunkBytes ?? 1024 * 1024;
    this.#regions =
      options.sharedMemory &&
      new RegionPool(
        { aboveBytes: 1024 * 1024, ...options.sharedMemory },
        {
          register: (at, name, path, byteSize) => this.#onConnection(at, 0, (e) => this.#callOn(e.modules, 'RegisterRegion', { name, path, offset: '0', byte_size: String(byteSize) }, undefined)),
          unregister: (at, name) => this.#onConnection(at, 0, (e) => this.#callOn(e.modules, 'UnregisterRegion', { name }, undefined)),
        },
      );
    this.#pool(address);
  }

  /** Closes the channels, after unregistering and removing automatic shared-memory regions. */
  async close(): Promise<void> {
    await this.#regions?.close();
    for (const pool of this.#pools.values()) pool.close();
  }

  /** The address the client sends calls on module `name` to: the owner it learnt, or its own. */
  addressFor(name: string): string {
    return this.#owners.get(name) ?? this.#address;
  }

  #pool(address: string): ConnectionPool<Endpoint> {
    let pool = this.#pools.get(address);
    if (!pool) {
      pool = new ConnectionPool<Endpoint>(
        () => {
          const modules = new grpcObject.normserve.v1.BatchNormService(address, this.#credentials, this.#channelOptions) as unknown as BatchNormServiceClient;
          const shared = { channelOverride: modules.getChannel() };
          return {
            modules,
            sync: new grpcObject.normserve.v1.SyncBatchNormService(address, this.#credentials, shared),
            health: new HealthClient(address, this.#credentials, shared),
          };
        },
        (e) => e.modules.close(),
      );
      this.#pools.set(address, pool);
    }
    return pool;
  }

  /** Runs `call` on a connection to `address` that can carry `bytes` each way, held until it settles. */
  async #onConnection<T>(address: string, bytes: CallBytes, call: (endpoint: Endpoint) => Promise<T>): Promise<T> {
    const lease = this.#pool(address).lease(bytes);
    try {
      return await call(lease.stubs);
    } finally {
      lease.release();
    }
  }

  /**
   * Runs `attempt` against the replica that owns `name`, as far as the client knows. When a
   * replica answers BN_ERR_NOT_OWNER, runs it again against the owner it names (the refused call
   * changed nothing), and remembers that owner. When the owner it remembers fails at the
   * transport (it has died, and its modules are moving to the others), forgets it, so that calls
   * go to the client's own address again. When a call is answered UNAVAILABLE, retries it with
   * backoff as the retry policy says. One deadline covers it all.
   */
  async #routed<T>(
    name: string | undefined,
    method: string,
    bytes: CallBytes,
    attempt: (endpoint: Endpoint, deadline: number | undefined) => Promise<T>,
    deadlineMs = this.#deadlineMs,
  ): Promise<T> {
    const deadline = deadlineMs === undefined ? undefined : Date.now() + deadlineMs;
    let address = name === undefined ? this.#address : this.addressFor(name);
    for (let hop = 0, tries = 1; ; ) {
      try {
        return await this.#onConnection(address, bytes, (endpoint) => attempt(endpoint, deadline));
      } catch (err) {
        if (!(err instanceof NormserveClientError)) throw err;
        const owner = err.reason === 'BN_ERR_NOT_OWNER' ? err.info.owner : undefined;
        if (this.#followOwner && name !== undefined && owner !== undefined && owner !== address && hop < MAX_HOPS) {
          hop++;
          if (this.#owners.size >= LEARNT_OWNERS_LIMIT) this.#owners.clear();
          this.#owners.set(name, owner);
          address = owner;
          continue;
        }
        const lostOwner = name !== undefined && err.code === grpcStatus.UNAVAILABLE && err.reason === undefined && this.#owners.get(name) === address;
        if (lostOwner) {
          this.#owners.delete(name);
          address = this.#address;
        }
        const backoff = this.#backoff(err, method, tries, deadline);
        if (backoff === undefined) throw err;
        tries++;
        hop = 0;
        await sleep(backoff);
      }
    }
  }

  /** How long to wait before retrying a failed call, or undefined not to retry it. */
  #backoff(err: NormserveClientError, method: string, tries: number, deadline: number | undefined): number | undefined {
    if (err.code !== grpcStatus.UNAVAILABLE || tries >= this.#retry.maxAttempts) return undefined;
    if (!err.refusedUnchanged && !SAFE_TO_REPEAT.has(method)) return undefined;
    const ms = Math.min(this.#retry.maxBackoffMs, this.#retry.initialBackoffMs * 2 ** (tries - 1)) * (0.5 + Math.random() / 2);
    return deadline !== undefined && Date.now() + ms >= deadline ? undefined : ms;
  }

  /** grpc.health.v1 Check: '' is the whole server, 'normserve.v1.BatchNormService' the module API. */
  async health(service = ''): Promise<ServingStatus> {
    const r = await this.#call<{ status: ServingStatus }>('Check', { service }, 'health');
    return r.status;
  }

  async createModule(name: string, spec: ModuleSpec): Promise<ModuleInfo> {
    const config = {
      kind: spec.kind,
      num_features: String(spec.numFeatures),
      ...(spec.eps === undefined ? {} : { eps: spec.eps }),
      ...(spec.momentum === null ? { cumulative_average: true } : spec.momentum === undefined ? {} : { momentum: spec.momentum }),
      ...(spec.affine === undefined ? {} : { affine: spec.affine }),
      ...(spec.trackRunningStats === undefined ? {} : { track_running_stats: spec.trackRunningStats }),
      ...(spec.worldSize === undefined ? {} : { world_size: spec.worldSize }),
      ...(spec.syncRule === undefined ? {} : { sync_rule: spec.syncRule }),
    };
    return moduleFromWire(await this.#call<Module__Output>('CreateModule', { name, config }));
  }

  async getModule(name: string): Promise<ModuleInfo> {
    return moduleFromWire(await this.#call<Module__Output>('GetModule', { name }));
  }

  async listModules(pageSize = 0, pageToken = ''): Promise<{ modules: ModuleInfo[]; nextPageToken: string }> {
    const r = await this.#call<{ modules: Module__Output[]; next_page_token: string }>('ListModules', { page_size: pageSize, page_token: pageToken });
    return { modules: r.modules.map(moduleFromWire), nextPageToken: r.next_page_token };
  }

  async deleteModule(name: string): Promise<void> {
    await this.#call('DeleteModule', { name });
  }

  async updateModule(name: string, changes: ModuleChanges): Promise<ModuleInfo> {
    const request = {
      name,
      ...(changes.training === undefined ? {} : { training: changes.training }),
      ...(changes.trackRunningStats === undefined ? {} : { track_running_stats: changes.trackRunningStats }),
      ...(changes.momentum === null ? { cumulative_average: true } : changes.momentum === undefined ? {} : { momentum: changes.momentum }),
      ...(changes.eps === undefined ? {} : { eps: changes.eps }),
      clear_buffers: (changes.clearBuffers ?? []).map((b) => BUFFER_ENUM[b]),
    };
    return moduleFromWire(await this.#call<Module__Output>('UpdateModule', request));
  }

  /** module.train() / module.eval(). */
  async train(name: string, mode = true): Promise<ModuleInfo> {
    return this.updateModule(name, { training: mode });
  }

  async eval(name: string): Promise<ModuleInfo> {
    return this.updateModule(name, { training: false });
  }

  async resetRunningStats(name: string): Promise<ModuleInfo> {
    return moduleFromWire(await this.#call<Module__Output>('ResetRunningStats', { name }));
  }

  async resetParameters(name: string): Promise<ModuleInfo> {
    return moduleFromWire(await this.#call<Module__Output>('ResetParameters', { name }));
  }

  async getState(name: string): Promise<StateDict> {
    return stateFromWire(await this.#call<ModuleState__Output>('GetState', { name }));
  }

  async loadState(name: string, state: StateDict, options: LoadOptions = {}): Promise<LoadResult> {
    const wire: ModuleState = { version: options.version === undefined ? 2 : (options.version ?? 0) };
    let bytes = 0;
    for (const key of ['weight', 'bias', 'running_mean', 'running_var'] as const) {
      const t = state[key];
      if (t) wire[key] = encodeTensor([t.length], t);
      bytes += t?.byteLength ?? 0;
    }
    if (state.num_batches_tracked !== undefined) wire.num_batches_tracked = String(state.num_batches_tracked);
    const r = await this.#call<{ module: Module__Output; missing_keys: string[]; unexpected_keys: string[] }>('LoadState', {
      name,
      state: wire,
      strict: options.strict ?? true,
    }, 'modules', undefined, bytes);
    return { module: moduleFromWire(r.module), missingKeys: r.missing_keys, unexpectedKeys: r.unexpected_keys };
  }

  /**
   * module(input): the output has the input's shape. With `saveForBackward`, the server keeps what
   * backward needs and `contextId` names it.
   */
  async forward(
    name: string,
    input: TensorData,
    options: { saveForBackward?: boolean; parameters?: { weight: Float32Array; bias: Float32Array } } & TransportChoice & CallOptions = {},
  ): Promise<TensorData & { contextId: string }> {
    // `parameters`: weight and bias loaded first, in one change with the forward (a LoadState saved).
    const p = options.parameters;
    const parameters = p ? { weight: encodeTensor([p.weight.length], p.weight), bias: encodeTensor([p.bias.length], p.bias) } : {};
    const { tensor, response } = await this.#tensorCall<{ context_id: string }>(
      'Forward',
      { name, save_for_backward: options.saveForBackward ?? false, ...parameters },
      ['input', input],
      'output',
      'modules',
      options,
    );
    return { ...tensor, contextId: response.context_id };
  }

  /** The gradients of a saved forward; parameter gradients only for affine modules. */
  async backward(name: string, contextId: string, gradOutput: TensorData, options: { retainContext?: boolean } & TransportChoice & CallOptions = {}): Promise<Gradients> {
    const { tensor, response: r } = await this.#tensorCall<{ grad_weight?: Tensor__Output | null; grad_bias?: Tensor__Output | null }>(
      'Backward',
      { name, context_id: contextId, retain_context: options.retainContext ?? false },
      ['grad_output', gradOutput],
      'grad_input',
      'modules',
      options,
    );
    return {
      gradInput: tensor,
      gradWeight: r.grad_weight ? tensorFromWire(r.grad_weight).data : null,
      gradBias: r.grad_bias ? tensorFromWire(r.grad_bias).data : null,
    };
  }

  /** SyncBatchNorm, full-shard mode: this rank's shard normalised with the group's statistics. */
  async syncForward(
    name: string,
    ref: StepRef,
    input: TensorData,
    options: { saveForBackward?: boolean } & Pick<TransportChoice, 'transport'> & CallOptions = {},
  ): Promise<{ output: TensorData; contextId: string } & StepStats> {
    const { tensor, response: r } = await this.#tensorCall<{ context_id: string; count: string; mean: number[]; invstd: number[]; synced: boolean }>(
      'SyncForward',
      { name, ...stepFields(ref), save_for_backward: options.saveForBackward ?? false },
      ['input', input],
      'output',
      'sync',
      options,
    );
    return { output: tensor, contextId: r.context_id, count: Number(r.count), mean: f64(r.mean), invstd: f64(r.invstd), synced: r.synced };
  }

  /** SyncBatchNorm backward: the input gradient from the group's sums; partial and total parameter gradients. */
  async syncBackward(
    name: string,
    ref: StepRef,
    contextId: string,
    gradOutput: TensorData,
    options: { retainContext?: boolean } & Pick<TransportChoice, 'transport'> & CallOptions = {},
  ): Promise<Gradients & { gradWeightTotal: Float32Array | null; gradBiasTotal: Float32Array | null }> {
    type Maybe = Tensor__Output | null | undefined;
    const { tensor, response: r } = await this.#tensorCall<{ grad_weight?: Maybe; grad_bias?: Maybe; grad_weight_total?: Maybe; grad_bias_total?: Maybe }>(
      'SyncBackward',
      { name, ...stepFields(ref), context_id: contextId, retain_context: options.retainContext ?? false },
      ['grad_output', gradOutput],
      'grad_input',
      'sync',
      options,
    );
    const vec = (t: Maybe) => (t ? tensorFromWire(t).data : null);
    return {
      gradInput: tensor,
      gradWeight: vec(r.grad_weight),
      gradBias: vec(r.grad_bias),
      gradWeightTotal: vec(r.grad_weight_total),
      gradBiasTotal: vec(r.grad_bias_total),
    };
  }

  /** SyncBatchNorm, statistics-only mode: this rank's count, mean and biased variance in; the group's out. */
  async gatherStats(name: string, ref: StepRef, stats: { count: number; mean: ArrayLike<number>; var: ArrayLike<number> }): Promise<StepStats & { var: Float64Array }> {
    const r = await this.#call<{ count: string; mean: number[]; var: number[]; invstd: number[]; synced: boolean }>(
      'GatherStats',
      { name, ...stepFields(ref), count: String(stats.count), mean: Array.from(stats.mean), var: Array.from(stats.var) },
      'sync',
    );
    return { count: Number(r.count), mean: f64(r.mean), var: f64(r.var), invstd: f64(r.invstd), synced: r.synced };
  }

  /** SyncBatchNorm, statistics-only backward: the group's Σ dy and Σ dy·(x − mean), and its count. */
  async reduceGrads(
    name: string,
    ref: StepRef,
    sums: { sumDy: ArrayLike<number>; sumDyXmu: ArrayLike<number> },
  ): Promise<{ sumDy: Float64Array; sumDyXmu: Float64Array; count: number }> {
    const r = await this.#call<{ sum_dy: number[]; sum_dy_xmu: number[]; count: string }>(
      'ReduceGrads',
      { name, ...stepFields(ref), sum_dy: Array.from(sums.sumDy), sum_dy_xmu: Array.from(sums.sumDyXmu) },
      'sync',
    );
    return { sumDy: f64(r.sum_dy), sumDyXmu: f64(r.sum_dy_xmu), count: Number(r.count) };
  }

  /** convert_sync_batchnorm for one module, in place, keeping its state and training flag. */
  async convertToSync(name: string, worldSize: number, syncRule?: SyncRule): Promise<ModuleInfo> {
    return moduleFromWire(await this.#call<Module__Output>('ConvertToSync', { name, world_size: worldSize, sync_rule: syncRule ?? 'SYNC_RULE_UNSPECIFIED' }, 'sync'));
  }

  /** Registers `byteSize` bytes from `offset` of a file under the server's --shm-dir as region `name`. */
  async registerRegion(name: string, path: string, byteSize: number, offset = 0): Promise<RegionInfo> {
    return regionFromWire(await this.#call('RegisterRegion', { name, path, offset: String(offset), byte_size: String(byteSize) }));
  }

  async unregisterRegion(name: string): Promise<void> {
    await this.#call('UnregisterRegion', { name });
  }

  /** The regions this caller registered. */
  async listRegions(): Promise<RegionInfo[]> {
    const r = await this.#call<{ regions: WireRegion[] }>('ListRegions', {});
    return r.regions.map(regionFromWire);
  }

  #call<T>(method: string, request: object, kind: ServiceKind = 'modules', deadlineMs?: number, bytes: CallBytes = 0): Promise<T> {
    const named = (request as { name?: unknown }).name;
    const name = !UNROUTED.has(method) && typeof named === 'string' ? named : undefined;
    return this.#routed(name, method, bytes, (endpoint, deadline) => this.#callOn<T>(endpoint[kind], method, request, deadline), deadlineMs);
  }

  #callOn<T>(stub: object, method: string, request: object, deadline: number | undefined): Promise<T> {
    const fn = (stub as Record<string, Function>)[method]!;
    return new Promise<T>((resolve, reject) => {
      fn.call(stub, request, this.#metadata(), deadline === undefined ? {} : { deadline }, (err: ServiceError | null, response: T) =>
        err ? reject(new NormserveClientError(err)) : resolve(response),
      );
    });
  }

  #metadata(): GrpcMetadata {
    const metadata = new GrpcMetadata();
    if (this.#token !== undefined) metadata.set('authorization', `Bearer ${this.#token}`);
    return metadata;
  }

  /**
   * A call with one tensor in and one out, unary or streamed (`<method>Stream`: a head without
   * the tensor's data, then its bytes in chunks; the answer likewise).
   */
  async #tensorCall<R>(
    method: string,
    request: object,
    [inField, input]: [string, TensorData],
    outField: string,
    kind: ServiceKind,
    { transport, region, deadlineMs }: TransportChoice & CallOptions,
  ): Promise<{ tensor: TensorData; response: R }> {
    const named = (request as { name?: unknown }).name;
    if (this.#regions && !region && transport === undefined && kind === 'modules' && typeof named === 'string') {
      const address = this.addressFor(named);
      if (this.#regions.wants(address, input.data.byteLength)) {
        const lease = await this.#regions.lease(address, input.data.byteLength);
        if (lease) {
          try {
            return await this.#tensorCall<R>(method, request, [inField, input], outField, kind, { region: lease.use, deadlineMs });
          } finally {
            lease.release();
          }
        }
      }
    }
    if (region) {
      const start = region.fileOffset ?? 0;
      region.file.write(start + region.inputOffset, input.data);
      const r = await this.#call<Record<string, unknown>>(
        method,
        {
          ...request,
          [inField]: { shape: input.shape.map(String), dtype: 'FLOAT32', data: Buffer.alloc(0) },
          [`${inField}_region`]: { region: region.name, offset: String(region.inputOffset) },
          [`${outField}_region`]: { region: region.name, offset: String(region.outputOffset) },
        },
        kind,
        deadlineMs,
      );
      const t = r[outField] as Tensor__Output;
      const shape = t.shape.map(Number);
      const count = shape.reduce((a, d) => a * d, 1);
      return { tensor: { shape, data: region.file.read(start + region.outputOffset, count, region.into) }, response: r as R };
    }
    const streamed = transport === 'stream' || (transport === undefined && input.data.byteLength > this.#streamAboveBytes);
    if (!streamed) {
      // The answer's tensor has the request's size.
      const r = await this.#call<Record<string, unknown>>(method, { ...request, [inField]: encodeTensor(input.shape, input.data) }, kind, deadlineMs, input.data.byteLength);
      return { tensor: tensorFromWire(r[outField] as Tensor__Output), response: r as R };
    }
    return this.#routed(
      typeof named === 'string' ? named : undefined,
      method,
      input.data.byteLength,
      (endpoint, deadline) => this.#stream<R>(endpoint[kind], method, request, input, inField, outField, deadline),
      deadlineMs,
    );
  }

  /** The streamed form of a tensor call, on one replica. */
  #stream<R>(
    stub: object,
    method: string,
    request: object,
    input: TensorData,
    inField: string,
    outField: string,
    deadline: number | undefined,
  ): Promise<{ tensor: TensorData; response: R }> {
    const call = (stub as Record<string, Function>)[`${method}Stream`]!.call(stub, this.#metadata(), deadline === undefined ? {} : { deadline }) as ClientDuplexStream<object, StreamPart>;
    return new Promise((resolve, reject) => {
      let head: Record<string, unknown> | undefined;
      let out: Float32Array | undefined;
      let outBytes: Uint8Array | undefined;
      let received = 0;
      let failed = false;
      const fail = (err: Error) => {
        if (failed) return;
        failed = true;
        call.cancel();
        reject(err);
      };
      call.on('data', (m: StreamPart) => {
        if (m.part === 'head') {
          head = m.head!;
          const t = head[outField] as Tensor__Output;
          const count = t.shape.reduce((a, d) => a * Number(d), 1);
          out = new Float32Array(count);
          outBytes = new Uint8Array(out.buffer);
        } else if (outBytes && m.chunk && received + m.chunk.length <= outBytes.length) {
          outBytes.set(m.chunk, received);
          received += m.chunk.length;
        } else {
          fail(new Error('normserve client: the server streamed more bytes than the output holds, or data before its head'));
        }
      });
      call.on('error', (err: ServiceError) => {
        if (!failed) {
          failed = true;
          reject(new NormserveClientError(err));
        }
      });
      call.on('end', () => {
        if (failed) return;
        if (!head || !outBytes || received !== outBytes.length) return fail(new Error(`normserve client: the stream ended after ${received} of ${outBytes?.length ?? '?'} output bytes`));
        const t = head[outField] as Tensor__Output;
        resolve({ tensor: { shape: t.shape.map(Number), data: out! }, response: head as R });
      });
      void (async () => {
        await writeStream(call, { head: { ...request, [inField]: { shape: input.shape.map(String), dtype: 'FLOAT32', data: Buffer.alloc(0) } } });
        const bytes = Buffer.from(input.data.buffer, input.data.byteOffset, input.data.byteLength);
        for (let at = 0; at < bytes.length && !failed; at += this.#streamChunkBytes) {
          await writeStream(call, { chunk: bytes.subarray(at, at + this.#streamChunkBytes) });
        }
        call.end();
      })();
    });
  }
}
