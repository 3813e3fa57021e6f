/**
 * normserve.v1.SyncBatchNormService: the coordinator on the wire. Each handler checks the call
 * against the group (kind, world size, rank, step), decides with the module whether this call
 * pools statistics (the sync rule), and either joins the group's step or runs on its own.
 * A call the group cannot take is refused at once, and aborts the open step it claims to be part
 * of, so that the other ranks do not wait for it.
 */
import type { Server, UntypedServiceImplementation } from '@grpc/grpc-js';
import type { SyncBatchNormServiceHandlers } from '../generated/normserve/v1/SyncBatchNormService.js';
import { bnError, NormserveError } from '../errors.js';
import type { Kernels } from '../kernels/kernels.js';
import { layoutOf } from '../kernels/kernels.js';
import { backward, checkGradShape, localGradSums, type BatchNorm } from '../nn/batch-norm.js';
import { CLASS_NAMES } from '../nn/config.js';
import { savedBytesFor, type ContextStore } from '../registry/context-store.js';
import type { ModuleRegistry } from '../registry/module-registry.js';
import type { Coordinator } from '../sync/coordinator.js';
import { moduleToWire, syncRuleFromWire } from '../wire/convert.js';
import { syncBatchNormService } from '../wire/proto.js';
import { withAnswerSerializers } from '../wire/tensor-answer.js';
import { encodeTensor } from '../wire/tensor-codec.js';
import type { SyncBackwardRequest__Output } from '../generated/normserve/v1/SyncBackwardRequest.js';
import type { SyncBackwardResponse } from '../generated/normserve/v1/SyncBackwardResponse.js';
import type { SyncForwardRequest__Output } from '../generated/normserve/v1/SyncForwardRequest.js';
import type { SyncForwardResponse } from '../generated/normserve/v1/SyncForwardResponse.js';
import { streamTensorHandler, unaryTensorHandler, type TensorCallContext, type TensorOp } from './tensor-call.js';
import { unaryWith } from './unary.js';

export interface SyncServiceDeps extends TensorCallContext {
  readonly registry: ModuleRegistry;
  readonly contexts: ContextStore;
  readonly coordinator: Coordinator;
  readonly kernels: Kernels;
}

interface StepCall {
  name: string;
  step: string;
  rank: number;
  world_size: number;
}

interface Checked {
  readonly module: BatchNorm;
  readonly step: bigint;
  /** Throws `err` after aborting the step this call claims to be part of. */
  readonly fail: (err: unknown) => never;
  /** Runs a check of the call's payload; what it throws fails the call and the step. */
  readonly guard: <T>(check: () => T) => T;
}

const vector = (values: ArrayLike<number>) => Array.from(values);

export function addSyncBatchNormService(server: Server, deps: SyncServiceDeps): void {
  const { registry, contexts, coordinator, kernels } = deps;
  const unary = unaryWith(deps);

  /** The checks every call makes before it may join its group's step. */
  function checkCall(req: StepCall, phase: 'forward' | 'backward'): Checked {
    const module = registry.get(req.name);
    const step = BigInt(req.step);
    const fail = (err: unknown): never => {
      if (err instanceof NormserveError) coordinator.abortStep(req.name, phase, step, `rank ${req.rank}: ${err.message}`);
      throw err;
    };
    const { kind, worldSize } = module.config;
    if (kind !== 'SYNC_BATCH_NORM') throw bnError('BN_ERR_NOT_SYNC', { name: req.name, className: CLASS_NAMES[kind] });
    if (step < 0n) throw bnError('BN_ERR_STEP', { step });
    if (req.world_size !== worldSize) fail(bnError('BN_ERR_WORLD_SIZE', { given: req.world_size, name: req.name, expected: worldSize }));
    if (req.rank < 0 || req.rank >= worldSize) fail(bnError('BN_ERR_RANK', { rank: req.rank, last: worldSize - 1, worldSize }));
    const guard = <T>(check: () => T): T => {
      try {
        return check();
      } catch (err) {
        return fail(err);
      }
    };
    return { module, step, fail, guard };
  }

  /** Per-channel statistics from a client: C finite values (or none for an empty shard). */
  function statsVector(values: number[], field: string, count: number, channels: number, nonNegative = false): Float64Array {
    const invalid = (detail: string) => bnError('BN_ERR_INVALID_STATS', { field, detail });
    if (count === 0 && values.length === 0) return new Float64Array(channels);
    if (values.length !== channels) throw invalid(`${values.length} values; the module has ${channels} channels`);
    for (const v of values) {
      if (!Number.isFinite(v)) throw invalid(`${v} is not finite`);
      if (nonNegative && v < 0) throw invalid(`${v} is negative`);
    }
    return Float64Array.from(values);
  }


  const syncForward: TensorOp<SyncForwardRequest__Output, SyncForwardResponse> = {
    inputField: 'input',
    outputField: 'output',
    check(req, header) {
      const { module, guard } = checkCall(req, 'forward');
      const { count, shape } = guard(header);
      if (req.save_for_backward) contexts.checkFits(savedBytesFor(count, shape[1] ?? 0));
      guard(() => module.checkRank(shape));
    },
    fail: (req, err) => void coordinator.abortStep(req.name, 'forward', BigInt(req.step), `rank ${req.rank}: ${(err as Error).message}`),
    async run(req, input, signal, scratch) {
      const { module, step, fail } = checkCall(req, 'forward');
      const { shape, data: x } = input;
      const plan = module.plan();
      const group = { step, rank: req.rank };
      if (!module.needsSync(plan)) {
        // Eval with running statistics, or PyTorch 1.9's rule in eval: each rank on its own.
        const r = await registry.exclusive(req.name, (m) => m.forward(x, shape, kernels, req.save_for_backward, true), undefined, signal);
        scratch.push(r.output);
        if (!r.saved) scratch.push(x);
        return {
          head: {
            context_id: r.saved ? contexts.put(req.name, r.saved, { ...group, synced: false }) : '',
            count: String(r.stats.count),
            mean: vector(r.stats.mean),
            invstd: vector(r.stats.invstd),
            synced: false,
          },
          shape,
          tensor: r.output,
        };
      }
      const layout = layoutOf(shape);
      const count = layout.n * layout.s;
      if (count > 0) {
        const sizeError = module.sizeError(layout.c, plan);
        if (sizeError) fail(sizeError);
      }
      const local = count > 0 ? await kernels.stats(x, layout) : { mean: new Float64Array(layout.c), m2: new Float64Array(layout.c) };
      const stats = await coordinator.gather(req.name, step, req.rank, req.world_size, { count, ...local, channels: layout.c, shape }, signal);
      const output = stats.count > 0 && x.length > 0 ? await module.normalize(x, layout, stats.mean, stats.invstd, kernels) : new Float32Array(0);
      scratch.push(output);
      // The decoded input is this call's own: a saved context keeps it without a copy.
      if (!req.save_for_backward) scratch.push(x);
      const contextId = req.save_for_backward
        ? contexts.put(req.name, module.savedFor(shape, x, stats.mean, stats.invstd, stats.count, true), { ...group, synced: true })
        : '';
      return {
        head: { context_id: contextId, count: String(stats.count), mean: vector(stats.mean), invstd: vector(stats.invstd), synced: true },
        shape,
        tensor: output,
      };
    },
  };

  const syncBackward: TensorOp<SyncBackwardRequest__Output, SyncBackwardResponse> = {
    inputField: 'grad_output',
    outputField: 'grad_input',
    check(req, header) {
      const { guard } = checkCall(req, 'backward');
      guard(header);
    },
    fail: (req, err) => void coordinator.abortStep(req.name, 'backward', BigInt(req.step), `rank ${req.rank}: ${(err as Error).message}`),
    async run(req, dy, signal, scratch) {
      const { step, fail, guard } = checkCall(req, 'backward');
      const { saved, group } = contexts.get(req.context_id, req.name);
      if (!group || group.step !== step || group.rank !== req.rank) {
        const from = group ? `SyncForward step ${group.step} rank ${group.rank}` : 'a Forward (use Backward)';
        fail(bnError('BN_ERR_CONTEXT_STEP', { id: req.context_id, from, step, rank: req.rank }));
      }
      guard(() => checkGradShape(saved, dy.shape));
      const local = await localGradSums(saved, dy.data, kernels);
      let totals;
      if (group!.synced) {
        totals = await coordinator.reduce(req.name, step, req.rank, req.world_size, { ...local, count: saved.count }, signal);
      }
      const grads = await backward(saved, dy.data, dy.shape, kernels, { local, group: totals });
      if (!req.retain_context) contexts.release(req.context_id);
      scratch.push(dy.data, grads.gradInput);
      const tensor = (v: Float32Array | Float64Array) => {
        const f = Float32Array.from(v);
        return encodeTensor([f.length], f);
      };
      const affine = grads.gradWeight !== null;
      return {
        head: {
          ...(affine ? { grad_weight: tensor(grads.gradWeight!), grad_bias: tensor(grads.gradBias!) } : {}),
          ...(affine && totals
            ? { grad_weight_total: tensor(totals.sumDyXmu.map((v, ch) => v * saved.invstd[ch]!)), grad_bias_total: tensor(totals.sumDy) }
            : {}),
        },
        shape: saved.shape,
        tensor: grads.gradInput,
      };
    },
  };

  const handlers: SyncBatchNormServiceHandlers = {
    SyncForward: unary('write', unaryTensorHandler(deps, syncForward)),
    SyncForwardStream: streamTensorHandler(deps, 'write', syncForward),
    GatherStats: unary('write', async (req, signal) => {
      const { module, step, guard } = checkCall(req, 'forward');
      const channels = module.config.numFeatures;
      const { count, mean, variance } = guard(() => {
        const wide = BigInt(req.count);
        if (wide < 0n || wide > BigInt(Number.MAX_SAFE_INTEGER)) throw bnError('BN_ERR_INVALID_STATS', { field: 'count', detail: `${wide} is out of range` });
        const n = Number(wide);
        return { count: n, mean: statsVector(req.mean, 'mean', n, channels), variance: statsVector(req.var, 'var', n, channels, true) };
      });
      const plan = module.plan();
      if (!module.needsSync(plan)) {
        if (!plan.bnTraining) {
          // Eval with buffers: the running statistics are what normalises.
          const rv = plan.runningVar!;
          return { count: String(count), mean: vector(plan.runningMean!), var: vector(rv), invstd: vector(module.runningInvstd(rv)), synced: false };
        }
        // PyTorch 1.9's rule in eval without buffers: this rank's own batch statistics.
        if (count === 1) throw bnError('BN_ERR_ONE_VALUE_PER_CHANNEL', { size: `torch.Size([1, ${channels}])` });
        return { count: String(count), mean: vector(mean), var: vector(variance), invstd: vector(module.batchInvstd(variance)), synced: false };
      }
      const m2 = variance.map((v) => v * count);
      const stats = await coordinator.gather(req.name, step, req.rank, req.world_size, { count, mean, m2, channels }, signal);
      return { count: String(stats.count), mean: vector(stats.mean), var: vector(stats.var), invstd: vector(stats.invstd), synced: true };
    }),

    SyncBackward: unary('write', unaryTensorHandler(deps, syncBackward)),
    SyncBackwardStream: streamTensorHandler(deps, 'write', syncBackward),
    ReduceGrads: unary('write', async (req, signal) => {
      const { module, step, fail, guard } = checkCall(req, 'backward');
      const channels = module.config.numFeatures;
      const sumDy = guard(() => statsVector(req.sum_dy, 'sum_dy', 1, channels));
      const sumDyXmu = guard(() => statsVector(req.sum_dy_xmu, 'sum_dy_xmu', 1, channels));
      const count = await coordinator.forwardCount(req.name, step);
      if (count === undefined) fail(bnError('BN_ERR_NO_FORWARD_STEP', { step, name: req.name }));
      const totals = await coordinator.reduce(req.name, step, req.rank, req.world_size, { sumDy, sumDyXmu, count: count! }, signal);
      return { sum_dy: vector(totals.sumDy), sum_dy_xmu: vector(totals.sumDyXmu), count: String(totals.count) };
    }),

    ConvertToSync: unary('write', (req) =>
      registry.exclusive(req.name, (module) => {
        module.convertToSync(req.world_size || 1, syncRuleFromWire(req.sync_rule));
        coordinator.drop(req.name, `module '${req.name}' was converted to a group of ${module.config.worldSize}`);
        return moduleToWire(req.name, module);
      }),
    ),
  };
  server.addService(withAnswerSerializers(syncBatchNormService, { SyncForward: 'output', SyncBackward: 'grad_input' }, (t) => kernels.headRoom?.(t) ?? 0), handlers as unknown as UntypedServiceImplementation);
}
