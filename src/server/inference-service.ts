/**
 * inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) over gRPC, so that
 * standard inference clients (tritonclient, KServe's REST proxy) can run a module's eval-mode
 * forward. A model is the module of the same name, with one version, "1". ModelInfer never changes
 * a module: training and everything else that changes state stay on normserve's own API
 * (docs/inference.md).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Server, UntypedServiceImplementation } from '@grpc/grpc-js';
import { bnError } from '../errors.js';
import type { GRPCInferenceServiceHandlers } from '../generated/inference/GRPCInferenceService.js';
import type { InferParameter__Output } from '../generated/inference/InferParameter.js';
import type { InferTensorContents__Output } from '../generated/inference/InferTensorContents.js';
import type { ModelInferRequest__Output } from '../generated/inference/ModelInferRequest.js';
import type { ModelInferResponse } from '../generated/inference/ModelInferResponse.js';
import type { Kernels } from '../kernels/kernels.js';
import type { BatchNorm } from '../nn/batch-norm.js';
import type { ModuleKind } from '../nn/config.js';
import type { ModuleRegistry } from '../registry/module-registry.js';
import { inferenceService, PROTO_DIR } from '../wire/proto.js';
import { decodeTensor, decodeTensorHeader, type DecodedTensor, type DecodeOptions, type TensorHeader } from '../wire/tensor-codec.js';
import type { PlainCopies } from './tensor-call.js';
import { unaryWith, type CallContext, type Scratch } from './unary.js';

export interface InferenceServiceDeps extends CallContext {
  readonly registry: ModuleRegistry;
  readonly kernels: Kernels;
  readonly maxTensorElements: number;
  readonly allocate?: (length: number) => Float32Array;
  readonly plain: PlainCopies;
  /** ServerReady: state restored, serving, and not draining. */
  readonly ready: () => boolean;
}

const VERSION = '1';
const INPUT = 'input';
const OUTPUT = 'output';
const DATATYPE = 'FP32';
const SERVER_NAME = 'normserve';
const PLATFORM = 'normserve';

/** package.json sits beside proto/, in the repository as in the image. */
const SERVER_VERSION = (JSON.parse(readFileSync(join(PROTO_DIR, '..', 'package.json'), 'utf8')) as { version: string }).version;

/** Spatial dimensions ModelMetadata declares per kind; BatchNorm1d also takes (N, C), SyncBatchNorm any rank from 2. */
const SPATIAL_DIMS: Readonly<Record<ModuleKind, number>> = { BATCH_NORM_1D: 1, BATCH_NORM_2D: 2, BATCH_NORM_3D: 3, SYNC_BATCH_NORM: 1 };

/** Parameters that ask for what this server does not do, and the extension each belongs to. */
const UNSUPPORTED_PARAMETERS: Readonly<Record<string, string>> = {
  shared_memory_region: 'shared-memory',
  shared_memory_byte_size: 'shared-memory',
  shared_memory_offset: 'shared-memory',
  classification: 'classification',
};

/** An empty version picks the model's one version, as the protocol lets a server choose. */
function checkVersion(name: string, version: string | undefined): void {
  if (version && version !== VERSION) throw bnError('BN_ERR_INFER_VERSION', { name, version });
}

function findModel(registry: ModuleRegistry, name: string): BatchNorm {
  if (!registry.has(name)) throw bnError('BN_ERR_INFER_MODEL_NOT_FOUND', { name });
  return registry.get(name);
}

/** Refused rather than ignored: the caller would otherwise wait for data in a place never written. */
function refuseParameters(where: string, parameters: Record<string, InferParameter__Output>): void {
  for (const parameter of Object.keys(parameters)) {
    const extension = UNSUPPORTED_PARAMETERS[parameter];
    if (extension) throw bnError('BN_ERR_INFER_PARAMETER', { where, parameter, extension });
  }
}

function metadataTensor(name: string, module: BatchNorm) {
  const { kind, numFeatures } = module.config;
  return { name, datatype: DATATYPE, shape: [-1, numFeatures, ...new Array<number>(SPATIAL_DIMS[kind]).fill(-1)] };
}

const decodeOptions = (deps: InferenceServiceDeps): DecodeOptions => ({
  field: 'inputs[0]',
  maxElements: deps.maxTensorElements,
  accept: ['FLOAT32'],
  ...(deps.allocate && { allocate: deps.allocate }),
});

/** The one input's name, datatype, parameters and shape (dimensions and size limit). */
function inputHeader(deps: InferenceServiceDeps, req: ModelInferRequest__Output): TensorHeader {
  const name = req.model_name;
  if (req.inputs.length !== 1) throw bnError('BN_ERR_INFER_INPUTS', { name, detail: `${req.inputs.length} inputs` }, 'inputs');
  const input = req.inputs[0]!;
  if (input.name !== INPUT) throw bnError('BN_ERR_INFER_INPUTS', { name, detail: `an input named '${input.name}'` }, 'inputs[0].name');
  if (input.datatype !== DATATYPE) throw bnError('BN_ERR_INFER_DATATYPE', { name, datatype: input.datatype }, 'inputs[0].datatype');
  refuseParameters(`input '${INPUT}'`, input.parameters);
  return decodeTensorHeader({ shape: input.shape, dtype: 'FLOAT32' }, decodeOptions(deps));
}

/** The typed fields other than fp32_contents that hold values. */
function otherTypedFields(contents: InferTensorContents__Output): string[] {
  return Object.entries(contents)
    .filter(([field, values]) => field !== 'fp32_contents' && Array.isArray(values) && values.length > 0)
    .map(([field]) => field);
}

function contentsError(detail: string) {
  return bnError('BN_ERR_INFER_CONTENTS', { detail }, 'raw_input_contents');
}

/**
 * The input's values, from raw_input_contents[0] (any byte offset: decodeTensor copies) or from
 * contents.fp32_contents, copied once into the compute backend's memory.
 */
function inputData(deps: InferenceServiceDeps, req: ModelInferRequest__Output, header: TensorHeader): DecodedTensor {
  const raw = req.raw_input_contents;
  const contents = req.inputs[0]!.contents;
  const typed = contents?.fp32_contents ?? [];
  const other = contents ? otherTypedFields(contents) : [];
  if (raw.length > 1) throw contentsError(`is the only input, but raw_input_contents has ${raw.length} entries`);
  if (other.length > 0) throw contentsError(`has values in contents.${other[0]}, which does not hold FP32`);
  const shape = header.shape.join(', ');
  const sizeError = (where: string, given: string, expected: string) => bnError('BN_ERR_INFER_DATA_SIZE', { where, given, shape, expected }, where);
  const bytes = raw[0];
  if (bytes !== undefined) {
    if (typed.length > 0) throw contentsError('has data in both raw_input_contents and contents');
    if (bytes.length !== header.bytes) {
      throw sizeError('raw_input_contents[0]', `${bytes.length} bytes`, `${header.bytes} bytes (${header.count} elements of 4 bytes)`);
    }
    return decodeTensor({ shape: header.shape.map(String), dtype: 'FLOAT32', data: bytes }, decodeOptions(deps));
  }
  if (typed.length === 0 && header.count > 0) throw contentsError('has no data');
  if (typed.length !== header.count) throw sizeError('contents.fp32_contents', `${typed.length} values`, `${header.count} values`);
  const data = deps.allocate ? deps.allocate(header.count) : new Float32Array(header.count);
  data.set(typed);
  return { shape: header.shape, data };
}

/** A SyncBatchNorm group that pools batch statistics even in eval cannot answer one rank alone. */
function refuseGroupStats(name: string, module: BatchNorm): void {
  if (module.config.worldSize > 1 && module.needsSync(module.plan(false))) {
    throw bnError('BN_ERR_USE_SYNC', { name, worldSize: module.config.worldSize, method: 'SyncForward' });
  }
}

async function modelInfer(deps: InferenceServiceDeps, req: ModelInferRequest__Output, signal: AbortSignal, scratch: Scratch): Promise<ModelInferResponse> {
  const name = req.model_name;
  checkVersion(name, req.model_version);
  findModel(deps.registry, name);
  for (const output of req.outputs) {
    if (output.name !== OUTPUT) throw bnError('BN_ERR_INFER_OUTPUT', { name, output: output.name }, 'outputs');
    refuseParameters(`output '${OUTPUT}'`, output.parameters);
  }
  const input = inputData(deps, req, inputHeader(deps, req));
  scratch.push(input.data);
  const output = await deps.registry.exclusive(
    name,
    (module) => {
      refuseGroupStats(name, module);
      return module.evalForward(input.data, input.shape, deps.kernels);
    },
    undefined,
    signal,
  );
  scratch.push(output);
  // Out of shared memory through a plain copy (tensor-call.ts, PlainCopies).
  const plain = deps.plain.take(output);
  if (plain !== output) scratch.push(plain);
  return {
    model_name: name,
    model_version: VERSION,
    id: req.id,
    // Raw bytes only: tritonclient's InferResult.as_numpy reads raw_output_contents and nothing typed.
    outputs: [{ name: OUTPUT, datatype: DATATYPE, shape: input.shape }],
    raw_output_contents: [Buffer.from(plain.buffer, plain.byteOffset, plain.byteLength)],
  };
}

export function addInferenceService(server: Server, deps: InferenceServiceDeps): void {
  const { registry } = deps;
  const unary = unaryWith(deps);

  const handlers: GRPCInferenceServiceHandlers = {
    // Liveness and readiness answer without a token, while draining too, like grpc.health.v1:
    // probes need them, and they tell nothing that needs protecting.
    ServerLive: (_call, callback) => callback(null, { live: true }),
    ServerReady: (_call, callback) => callback(null, { ready: deps.ready() }),
    ServerMetadata: unary('list', () => ({ name: SERVER_NAME, version: SERVER_VERSION, extensions: [] })),
    ModelReady: unary('read', (req) => {
      checkVersion(req.name, req.version);
      return { ready: registry.has(req.name) };
    }),
    ModelMetadata: unary('read', (req) => {
      checkVersion(req.name, req.version);
      const module = findModel(registry, req.name);
      return { name: req.name, versions: [VERSION], platform: PLATFORM, inputs: [metadataTensor(INPUT, module)], outputs: [metadataTensor(OUTPUT, module)] };
    }),
    // Access and placement are checked against model_name (moduleNameOf).
    ModelInfer: unary('read', (req: ModelInferRequest__Output, signal, _principal, scratch) => modelInfer(deps, req, signal, scratch)),
  };
  server.addService(inferenceService, handlers as unknown as UntypedServiceImplementation);
}
