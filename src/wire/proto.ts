/**
 * The wire contract, loaded once from proto/: the grpc-js service definitions for servers and
 * clients, and protobufjs types for the google.rpc error details.
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadPackageDefinition, type GrpcObject } from '@grpc/grpc-js';
import { loadSync, type Options } from '@grpc/proto-loader';
import protobuf from 'protobufjs';
import type { ProtoGrpcType } from '../generated/batch_norm.js';
import type { ProtoGrpcType as SyncProtoGrpcType } from '../generated/sync_batch_norm.js';
import type { ProtoGrpcType as InferenceProtoGrpcType } from '../generated/grpc_predict_v2.js';

function findProtoDir(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = join(dir, 'proto');
    if (existsSync(join(candidate, 'normserve', 'v1', 'batch_norm.proto'))) return candidate;
    const parent = dirname(dir);
    if (parent === dir) throw new Error('normserve: cannot find the proto/ directory above ' + fileURLToPath(import.meta.url));
    dir = parent;
  }
}

/** The directory holding normserve/v1/*.proto, inference/*.proto and google/rpc/*.proto. */
export const PROTO_DIR = findProtoDir();
/** normserve's own API, and the Open Inference Protocol (KServe v2) beside it (docs/inference.md). */
export const PROTO_FILES = ['normserve/v1/batch_norm.proto', 'normserve/v1/sync_batch_norm.proto', 'inference/grpc_predict_v2.proto'];

export const LOADER_OPTIONS: Options = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

export const packageDefinition = loadSync(PROTO_FILES, LOADER_OPTIONS);
export const grpcObject = loadPackageDefinition(packageDefinition) as unknown as ProtoGrpcType & SyncProtoGrpcType & InferenceProtoGrpcType & GrpcObject;
/** Full service names, as grpc.health.v1 and reflection know them. */
export const BATCH_NORM_SERVICE_NAME = 'normserve.v1.BatchNormService';
export const SYNC_SERVICE_NAME = 'normserve.v1.SyncBatchNormService';
export const INFERENCE_SERVICE_NAME = 'inference.GRPCInferenceService';

export const batchNormService = grpcObject.normserve.v1.BatchNormService.service;
export const syncBatchNormService = grpcObject.normserve.v1.SyncBatchNormService.service;
export const inferenceService = grpcObject.inference.GRPCInferenceService.service;

const rpcRoot = new protobuf.Root().loadSync(
  ['google/rpc/status.proto', 'google/rpc/error_details.proto'].map((p) => join(PROTO_DIR, p)),
  { keepCase: true },
);
export const RpcStatus = rpcRoot.lookupType('google.rpc.Status');
export const ErrorInfo = rpcRoot.lookupType('google.rpc.ErrorInfo');
export const BadRequest = rpcRoot.lookupType('google.rpc.BadRequest');
export const ERROR_DOMAIN = 'normserve.dev';
