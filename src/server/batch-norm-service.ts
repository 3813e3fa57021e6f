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
import type { ModuleRegistry } from '../registry/module-registry.js';
import { configFromWire, loadInputFromWire, moduleToWire, stateToWire, updateFromWire } from '../wire/convert.js';
import { batchNormService } from '../wire/proto.js';
import { decodeTensor, encodeTensor } from '../wire/tensor-codec.js';
import type { Coordinator } from '../sync/coordinator.js';
import { unaryWith, type CallContext } from './unary.js';

export interface BatchNormServiceDeps extends CallContext {
  readonly registry: ModuleRegistry;
  readonly contexts: ContextStore;
  readonly coordinator: Coordinator;
  readonly kernels: Kernels;
  readonly maxTensorElements: number;
}

export function addBatchNormService(server: Server, deps: BatchNormServiceDeps): void {
  const { registry, contexts, coordinator, kernels, maxTensorElements } = deps;
  const unary = unaryWith(deps);

  const handlers: BatchNormServiceHandlers = {
    CreateModule: unary('write', (req) => {
      const config = configFromWire(req.config);
      const module = registry.create(req.name, config);
      return moduleToWire(req.name, module);
    }),
    GetModule: unary('read', (req) => moduleToWire(req.name, registry.get(req.name))),
    ListModules: unary('list', (req, _signal, principal) => {
      const page = registry.list(req.page_size, req.page_token, (name) => principal.can('read', name));
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
      const input = loadInputFromWire(req.state, maxTensorElements);
      const version = req.state?.version ? req.state.version : null;
      const strict = req.strict ?? true;
      return registry.exclusive(req.name, (module) => {
        const result = module.loadStateDict(input, version, strict);
        return { module: moduleToWire(req.name, module), missing_keys: result.missingKeys, unexpected_keys: result.unexpectedKeys };
      });
    }),
    Forward: unary('write', (req, signal) => {
      const target = registry.get(req.name);
      if (target.config.worldSize > 1 && target.needsSync(target.plan())) {
        throw bnError('BN_ERR_USE_SYNC', { name: req.name, worldSize: target.config.worldSize, method: 'SyncForward' });
      }
      const input = decodeTensor(req.input, { field: 'input', maxElements: maxTensorElements, accept: ['FLOAT32'] });
      if (req.save_for_backward) contexts.checkFits(savedBytesFor(input.data.length, input.shape[1] ?? 0));
      return registry.exclusive(
        req.name,
        async (module) => {
          const { output, saved } = await module.forward(input.data, input.shape, kernels, req.save_for_backward);
          const contextId = saved ? contexts.put(req.name, saved) : '';
          return { output: encodeTensor(input.shape, output), context_id: contextId };
        },
        undefined,
        signal,
      );
    }),
    Backward: unary('write', async (req) => {
      const target = registry.get(req.name);
      const dy = decodeTensor(req.grad_output, { field: 'grad_output', maxElements: maxTensorElements, accept: ['FLOAT32'] });
      const { saved, group } = contexts.get(req.context_id, req.name);
      if (group?.synced) {
        throw bnError('BN_ERR_USE_SYNC', { name: req.name, worldSize: target.config.worldSize, method: 'SyncBackward' });
      }
      const grads = await backward(saved, dy.data, dy.shape, kernels);
      if (!req.retain_context) contexts.release(req.context_id);
      return {
        grad_input: encodeTensor(saved.shape, grads.gradInput),
        ...(grads.gradWeight ? { grad_weight: encodeTensor([grads.gradWeight.length], grads.gradWeight) } : {}),
        ...(grads.gradBias ? { grad_bias: encodeTensor([grads.gradBias.length], grads.gradBias) } : {}),
      };
    }),
  };
  server.addService(batchNormService, handlers as unknown as UntypedServiceImplementation);
}
