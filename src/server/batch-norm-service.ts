/**
 * normserve.v1.BatchNormService: decode the request, run the module operation, encode the reply.
 * Handlers throw catalogue errors; `unary` turns them into statuses.
 */
import type { Server, UntypedServiceImplementation } from '@grpc/grpc-js';
import type { BatchNormServiceHandlers } from '../generated/normserve/v1/BatchNormService.js';
import { bnError } from '../errors.js';
import type { Kernels } from '../kernels/kernels.js';
import { backward } from '../nn/batch-norm.js';
import { savedBytesFor, type ContextStore } from '../registry/context-store.js';
import type { ModuleRegistry, Page } from '../registry/module-registry.js';
import { configFromWire, loadInputFromWire, moduleToWire, stateToWire, updateFromWire } from '../wire/convert.js';
import { batchNormService } from '../wire/proto.js';
import { withAnswerSerializers } from '../wire/tensor-answer.js';
import { encodeTensor } from '../wire/tensor-codec.js';
import type { LoadInput } from '../nn/state-dict.js';
import type { Coordinator } from '../sync/coordinator.js';
import type { BackwardRequest__Output } from '../generated/normserve/v1/BackwardRequest.js';
import type { BackwardResponse } from '../generated/normserve/v1/BackwardResponse.js';
import type { ForwardRequest__Output } from '../generated/normserve/v1/ForwardRequest.js';
import type { ForwardResponse } from '../generated/normserve/v1/ForwardResponse.js';
import { streamTensorHandler, unaryTensorHandler, type TensorCallContext, type TensorOp } from './tensor-call.js';
import type { RegionInfo } from './shared-memory.js';
import { unaryWith } from './unary.js';

export interface BatchNormServiceDeps extends TensorCallContext {
  readonly registry: ModuleRegistry;
  /** ListModules: this server's modules, or with a shared store the whole cluster's. */
  readonly listModules: (pageSize: number, pageToken: string, visible: (name: string) => boolean) => Promise<Page>;
  readonly contexts: ContextStore;
  readonly coordinator: Coordinator;
  readonly kernels: Kernels;
}

const regionToWire = (r: RegionInfo) => ({ name: r.name, path: r.path, offset: String(r.offset), byte_size: String(r.byteSize) });

export function addBatchNormService(server: Server, deps: BatchNormServiceDeps): void {
  const { registry, contexts, coordinator, kernels } = deps;
  const unary = unaryWith(deps);

  const forward: TensorOp<ForwardRequest__Output, ForwardResponse> = {
    inputField: 'input',
    outputField: 'output',
    check(req, header) {
      const target = registry.get(req.name);
      if (target.config.worldSize > 1 && target.needsSync(target.plan())) {
        throw bnError('BN_ERR_USE_SYNC', { name: req.name, worldSize: target.config.worldSize, method: 'SyncForward' });
      }
      const { count, shape } = header();
      if (req.save_for_backward) contexts.checkFits(savedBytesFor(count, shape[1] ?? 0));
      if (req.weight || req.bias) {
        if (!req.weight || !req.bias) throw bnError('BN_ERR_FORWARD_PARAMETERS', { detail: `come together: the request has only ${req.weight ? 'weight' : 'bias'}` });
        if (!target.config.affine) throw bnError('BN_ERR_FORWARD_PARAMETERS', { detail: `are for an affine module, and module '${req.name}' has affine=False` });
      }
    },
    run: (req, input, signal, scratch) =>
      registry.exclusive(
        req.name,
        async (module) => {
          const parameters = req.weight && req.bias ? loadInputFromWire({ weight: req.weight, bias: req.bias }, deps.maxTensorElements, '') : undefined;
          // Loaded as LoadState(strict=false) would (PyTorch's size-mismatch message included), and
          // put back when the forward is refused: the parameters change with the call or not at
          // all, and the forward's own effects on a refusal stay PyTorch's (a channel mismatch
          // has counted the batch, as there).
          let previous: LoadInput | undefined;
          if (parameters) {
            const { weight, bias } = module.snapshot();
            previous = { weight: { shape: [weight!.length], data: weight! }, bias: { shape: [bias!.length], data: bias! } };
            module.loadStateDict(parameters, 2, false);
          }
          let result: Awaited<ReturnType<typeof module.forward>>;
          try {
            // The decoded input is this call's own: a saved context keeps it without a copy.
            result = await module.forward(input.data, input.shape, kernels, req.save_for_backward, true);
          } catch (err) {
            if (previous) module.loadStateDict(previous, 2, false);
            throw err;
          }
          const { output, saved } = result;
          const contextId = saved ? contexts.put(req.name, saved) : '';
          scratch.push(output);
          if (!saved) scratch.push(input.data);
          return { head: { context_id: contextId }, shape: input.shape, tensor: output };
        },
        undefined,
        signal,
      ),
  };

  const backwardOp: TensorOp<BackwardRequest__Output, BackwardResponse> = {
    inputField: 'grad_output',
    outputField: 'grad_input',
    check(req, header) {
      registry.get(req.name);
      header();
      const { group } = contexts.get(req.context_id, req.name);
      if (group?.synced) {
        throw bnError('BN_ERR_USE_SYNC', { name: req.name, worldSize: registry.get(req.name).config.worldSize, method: 'SyncBackward' });
      }
    },
    async run(req, dy, _signal, scratch) {
      const { saved } = contexts.get(req.context_id, req.name);
      // dy is this call's own decoded copy, read by nothing after: grad_input may overwrite it.
      const grads = await backward(saved, dy.data, dy.shape, kernels, { dyDisposable: true });
      if (!req.retain_context) contexts.release(req.context_id);
      scratch.push(dy.data, grads.gradInput);
      return {
        head: {
          ...(grads.gradWeight ? { grad_weight: encodeTensor([grads.gradWeight.length], grads.gradWeight) } : {}),
          ...(grads.gradBias ? { grad_bias: encodeTensor([grads.gradBias.length], grads.gradBias) } : {}),
        },
        shape: saved.shape,
        tensor: grads.gradInput,
      };
    },
  };

  const handlers: BatchNormServiceHandlers = {
    CreateModule: unary('write', async (req) => {
      const config = configFromWire(req.config);
      const module = await registry.create(req.name, config);
      return moduleToWire(req.name, module);
    }),
    GetModule: unary('read', (req) => moduleToWire(req.name, registry.get(req.name))),
    ListModules: unary('list', async (req, _signal, principal) => {
      const page = await deps.listModules(req.page_size, req.page_token, (name) => principal.can('read', name));
      return { modules: page.modules.map(({ name, module }) => moduleToWire(name, module)), next_page_token: page.nextPageToken };
    }),
    DeleteModule: unary('write', async (req) => {
      await registry.delete(req.name);
      contexts.dropModule(req.name);
      coordinator.drop(req.name, `module '${req.name}' was deleted`);
      return {};
    }),
    UpdateModule: unary('write', (req) => {
      const update = updateFromWire(req);
      return registry.exclusive(req.name, (module) => {
        module.update(update);
        return moduleToWire(req.name, module);
      });
    }),
    ResetRunningStats: unary('write', (req) =>
      registry.exclusive(req.name, (module) => {
        module.resetRunningStats();
        return moduleToWire(req.name, module);
      }),
    ),
    ResetParameters: unary('write', (req) =>
      registry.exclusive(req.name, (module) => {
        module.resetParameters();
        return moduleToWire(req.name, module);
      }),
    ),
    GetState: unary('read', (req) => stateToWire(registry.get(req.name))),
    LoadState: unary('write', (req) => {
      registry.get(req.name);
      const input = loadInputFromWire(req.state, deps.maxTensorElements);
      const version = req.state?.version ? req.state.version : null;
      const strict = req.strict ?? true;
      return registry.exclusive(req.name, (module) => {
        const result = module.loadStateDict(input, version, strict);
        return { module: moduleToWire(req.name, module), missing_keys: result.missingKeys, unexpected_keys: result.unexpectedKeys };
      });
    }),
    Forward: unary('write', unaryTensorHandler(deps, forward)),
    Backward: unary('write', unaryTensorHandler(deps, backwardOp)),
    ForwardStream: streamTensorHandler(deps, 'write', forward),
    RegisterRegion: unary('list', async (req, _signal, principal) => {
      const r = await deps.regions.register(principal.id, req.name, req.path, Number(req.offset), Number(req.byte_size));
      return regionToWire(r);
    }),
    UnregisterRegion: unary('list', async (req, _signal, principal) => {
      await deps.regions.unregister(principal.id, req.name);
      return {};
    }),
    ListRegions: unary('list', (_req, _signal, principal) => ({ regions: deps.regions.list(principal.id).map(regionToWire), shm_dir: deps.regions.dir })),
    BackwardStream: streamTensorHandler(deps, 'write', backwardOp),
  };
  server.addService(withAnswerSerializers(batchNormService, { Forward: 'output', Backward: 'grad_input' }, (t) => kernels.headRoom?.(t) ?? 0), handlers as unknown as UntypedServiceImplementation);
}
