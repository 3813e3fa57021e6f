/** normserve's public surface: the client, and the pieces to embed a server. */
export { NormserveClient, NormserveClientError } from './client/client.js';
export { RemoteBatchNorm, RemoteSyncBatchNorm, type ForwardOptions, type RemoteOutput, type SyncPlace } from './client/remote-batch-norm.js';
export type { AutoSharedMemory } from './client/auto-shm.js';
export { SharedMemoryFile } from './client/shared-memory.js';
export type {
  BufferName,
  CallOptions,
  ClientOptions,
  FieldViolation,
  RetryPolicy,
  Gradients,
  LoadOptions,
  LoadResult,
  ModuleChanges,
  ModuleInfo,
  ModuleKind,
  ModuleSpec,
  ServingStatus,
  StateDict,
  StepRef,
  StepStats,
  SyncRule,
  TensorData,
  Transport,
  TransportChoice,
  RegionUse,
  RegionInfo,
} from './client/client.js';
export { preferredOwner, slotOf, SLOTS } from './cluster/slots.js';
export { catalogue, Status, type ErrorCode } from './errors.js';
export { defaultConfig, loadConfig, SETTINGS, type Config } from './config.js';
export { selectKernels, startBackend, type Selection } from './kernels/select.js';
export type { BackendName, Kernels } from './kernels/kernels.js';
export { startServer, type RunningServer } from './server/server.js';
