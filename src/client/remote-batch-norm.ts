/**
 * Remote modules for TypeScript training code: a named module on the service behaving like
 * `torch.nn.BatchNorm*d` / `SyncBatchNorm` — `forward` in training saves what backward needs,
 * and the output it returns carries its own `backward`, so a training loop cannot mix up
 * contexts; `train()`/`eval()` and the state_dict as PyTorch has them. Every call goes through
 * a `NormserveClient`, with its routing, retries, deadlines and transport choice.
 */
import { specOf, type CallOptions, type Gradients, type LoadOptions, type LoadResult, type ModuleInfo, type ModuleSpec, type NormserveClient, type StateDict, type StepStats, type TensorData, type Transport } from './client.js';
import { NormserveClientError } from './errors.js';

/** A forward's output; when the forward saved its context, `backward` runs the matching backward, once. */
export interface RemoteOutput extends TensorData {
  backward(gradOutput: TensorData, options?: CallOptions): Promise<Gradients>;
}

export interface ForwardOptions extends CallOptions {
  transport?: Transport;
  /** Keep what backward needs (default: in training mode; eval-mode backward works too, as in PyTorch). */
  saveForBackward?: boolean;
}

/** `run`, callable once; a second call, or one when nothing was saved, rejects with why. */
function backwardOnce(name: string, run: ((dy: TensorData, options: CallOptions) => Promise<Gradients>) | undefined): RemoteOutput['backward'] {
  let used = false;
  return (dy, options = {}) => {
    if (!run) return Promise.reject(new Error(`normserve client: this forward of module '${name}' saved nothing for backward (eval mode; pass saveForBackward: true)`));
    if (used) return Promise.reject(new Error(`normserve client: this forward of module '${name}' was differentiated already; a saved context serves one backward`));
    used = true;
    return run(dy, options);
  };
}

/** Shared by both kinds: a name on a client, and what the module says of itself. */
abstract class RemoteModuleBase {
  #info: ModuleInfo;

  protected constructor(
    readonly client: NormserveClient,
    readonly name: string,
    info: ModuleInfo,
  ) {
    this.#info = info;
  }

  /** The module as last seen: configuration, training flag, counter. */
  get info(): ModuleInfo {
    return this.#info;
  }

  get training(): boolean {
    return this.#info.training;
  }

  /** module.train(mode). */
  async train(mode = true): Promise<this> {
    this.#info = await this.client.train(this.name, mode);
    return this;
  }

  /** module.eval(). */
  async eval(): Promise<this> {
    return this.train(false);
  }

  /** Reads the module back (its counter moves with every training forward). */
  async refresh(): Promise<ModuleInfo> {
    this.#info = await this.client.getModule(this.name);
    return this.#info;
  }

  /** state_dict(): weight, bias, running_mean, running_var, num_batches_tracked, as the module has them. */
  stateDict(): Promise<StateDict> {
    return this.client.getState(this.name);
  }

  /** load_state_dict(state, strict). */
  async loadStateDict(state: StateDict, options?: LoadOptions): Promise<LoadResult> {
    const result = await this.client.loadState(this.name, state, options);
    this.#info = result.module;
    return result;
  }

  async resetRunningStats(): Promise<void> {
    this.#info = await this.client.resetRunningStats(this.name);
  }

  /** Deletes the module from the service. */
  delete(): Promise<void> {
    return this.client.deleteModule(this.name);
  }
}

/** Creates module `name`, or attaches to it when it exists with the same configuration. */
async function createOrAttach(client: NormserveClient, name: string, spec: ModuleSpec, attach: boolean): Promise<ModuleInfo> {
  try {
    return await client.createModule(name, spec);
  } catch (err) {
    if (!(attach && err instanceof NormserveClientError && err.reason === 'BN_ERR_MODULE_EXISTS')) throw err;
    const info = await client.getModule(name);
    const differs = (Object.keys(spec) as (keyof ModuleSpec)[]).filter((k) => spec[k] !== undefined && specOf(info)[k] !== spec[k]);
    if (differs.length > 0) throw new Error(`normserve client: module '${name}' exists with another ${differs.join(', ')}; delete it or use another name`);
    return info;
  }
}

/** BatchNorm1d/2d/3d on the service. */
export class RemoteBatchNorm extends RemoteModuleBase {
  /**
   * Creates the module; with `attach`, an existing module of that name and configuration is used
   * instead (a training job that restarts keeps its running statistics).
   */
  static async create(client: NormserveClient, name: string, spec: ModuleSpec, options: { attach?: boolean } = {}): Promise<RemoteBatchNorm> {
    if (spec.kind === 'SYNC_BATCH_NORM') throw new Error('normserve client: use RemoteSyncBatchNorm for SYNC_BATCH_NORM');
    return new RemoteBatchNorm(client, name, await createOrAttach(client, name, spec, options.attach ?? false));
  }

  /** A module that exists already. */
  static async attach(client: NormserveClient, name: string): Promise<RemoteBatchNorm> {
    return new RemoteBatchNorm(client, name, await client.getModule(name));
  }

  /** module(input). The output's `backward` gives the gradients of this forward. */
  async forward(input: TensorData, options: ForwardOptions = {}): Promise<RemoteOutput> {
    const { saveForBackward = this.training, transport, deadlineMs } = options;
    const y = await this.client.forward(this.name, input, { saveForBackward, ...(transport && { transport }), ...(deadlineMs !== undefined && { deadlineMs }) });
    const run = saveForBackward
      ? (dy: TensorData, o: CallOptions) => this.client.backward(this.name, y.contextId, dy, { ...(transport && { transport }), ...o })
      : undefined;
    return { shape: y.shape, data: y.data, backward: backwardOnce(this.name, run) };
  }
}

export interface SyncPlace {
  /** This process's rank, 0..worldSize-1. */
  rank: number;
  worldSize: number;
  /**
   * The step the first forward takes (default 0). Every rank counts forwards alike, so all
   * ranks agree on each step's number; a job that resumes passes the step it resumes at.
   */
  firstStep?: number | bigint;
}

/**
 * SyncBatchNorm on the service: every rank's forward of one step is normalised with the whole
 * group's statistics, and backward reduces the group's gradient sums, as
 * torch.nn.SyncBatchNorm does over a process group.
 */
export class RemoteSyncBatchNorm extends RemoteModuleBase {
  #step: bigint;

  private constructor(
    client: NormserveClient,
    name: string,
    info: ModuleInfo,
    readonly place: SyncPlace,
  ) {
    super(client, name, info);
    if (!Number.isInteger(place.rank) || place.rank < 0 || place.rank >= place.worldSize) {
      throw new RangeError(`normserve client: rank ${place.rank} is outside 0..${place.worldSize - 1}`);
    }
    this.#step = BigInt(place.firstStep ?? 0);
  }

  /**
   * Creates the group's module (every rank may call this: the first creates it, the others attach
   * to the same configuration).
   */
  static async create(client: NormserveClient, name: string, spec: Omit<ModuleSpec, 'kind' | 'worldSize'>, place: SyncPlace): Promise<RemoteSyncBatchNorm> {
    const info = await createOrAttach(client, name, { ...spec, kind: 'SYNC_BATCH_NORM', worldSize: place.worldSize }, true);
    return new RemoteSyncBatchNorm(client, name, info, place);
  }

  static async attach(client: NormserveClient, name: string, place: SyncPlace): Promise<RemoteSyncBatchNorm> {
    return new RemoteSyncBatchNorm(client, name, await client.getModule(name), place);
  }

  /** The step the next forward takes. */
  get step(): bigint {
    return this.#step;
  }

  /** This rank's shard through the module; the output carries the group's statistics and its backward. */
  async forward(input: TensorData, options: ForwardOptions = {}): Promise<RemoteOutput & StepStats> {
    const { saveForBackward = this.training, transport, deadlineMs } = options;
    const ref = { step: this.#step++, rank: this.place.rank, worldSize: this.place.worldSize };
    const y = await this.client.syncForward(this.name, ref, input, { saveForBackward, ...(transport && { transport }), ...(deadlineMs !== undefined && { deadlineMs }) });
    const run = saveForBackward
      ? (dy: TensorData, o: CallOptions) => this.client.syncBackward(this.name, ref, y.contextId, dy, { ...(transport && { transport }), ...o })
      : undefined;
    return { shape: y.output.shape, data: y.output.data, count: y.count, mean: y.mean, invstd: y.invstd, synced: y.synced, backward: backwardOnce(this.name, run) };
  }
}
