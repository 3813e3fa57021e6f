/**
 * The error catalogue: every error a caller can see, with its stable code, its gRPC status and its
 * message template. Layers throw `NormserveError`s made here; one place on the wire turns them into
 * statuses (src/server/status.ts). docs/errors.md lists the same table, and a test keeps the two in
 * step.
 *
 * Where PyTorch raises for the same call, the template is PyTorch's own text and `pythonType` names
 * the exception class, so a client can re-raise what `torch.nn.BatchNorm*d` would have raised.
 */

/** gRPC status codes (google.rpc.Code), kept here so that no pure layer imports grpc-js. */
export const Status = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  OUT_OF_RANGE: 11,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  DATA_LOSS: 15,
  UNAUTHENTICATED: 16,
} as const;
export type StatusCode = (typeof Status)[keyof typeof Status];

const STATUS_NAMES = new Map<number, string>(Object.entries(Status).map(([name, code]) => [code, name]));

/** A status code's name ('INVALID_ARGUMENT'), or the number as text for a code gRPC does not define. */
export function statusName(code: number): string {
  return STATUS_NAMES.get(code) ?? String(code);
}

export type PythonType = 'ValueError' | 'RuntimeError' | 'AttributeError';

interface Entry {
  readonly status: StatusCode;
  /** `{placeholder}`s are replaced by the arguments of the same name. */
  readonly template: string;
  readonly pythonType?: PythonType;
}

/** The catalogue. Keys are the stable codes (google.rpc.ErrorInfo.reason). */
export const catalogue = {
  // Names and lookup
  BN_ERR_MODULE_NOT_FOUND: { status: Status.NOT_FOUND, template: "module '{name}' not found" },
  BN_ERR_MODULE_EXISTS: { status: Status.ALREADY_EXISTS, template: "module '{name}' already exists" },
  BN_ERR_INVALID_NAME: {
    status: Status.INVALID_ARGUMENT,
    template:
      'invalid module name {name}: use 1 to 256 characters from A-Z a-z 0-9 _ . : / -, starting with a letter, digit or underscore',
  },
  BN_ERR_INVALID_PAGE_TOKEN: {
    status: Status.INVALID_ARGUMENT,
    template: 'page_token {token} was not issued by ListModules; start again with an empty page_token',
  },

  // Configuration
  BN_ERR_INVALID_CONFIG: { status: Status.INVALID_ARGUMENT, template: 'invalid module config: {detail}' },
  BN_ERR_INVALID_UPDATE: { status: Status.INVALID_ARGUMENT, template: 'invalid update: {detail}' },

  // Tensors on the wire
  BN_ERR_INVALID_TENSOR: { status: Status.INVALID_ARGUMENT, template: 'invalid tensor {field}: {detail}' },
  BN_ERR_UNSUPPORTED_DTYPE: {
    status: Status.INVALID_ARGUMENT,
    template: '{field} has dtype {dtype}; this call takes {accepted}',
  },
  BN_ERR_TENSOR_TOO_LARGE: {
    status: Status.RESOURCE_EXHAUSTED,
    template: '{field} has {elements} elements, over the limit max_tensor_elements={limit}',
  },

  // The Open Inference Protocol (inference.GRPCInferenceService, docs/inference.md)
  BN_ERR_INFER_MODEL_NOT_FOUND: {
    status: Status.NOT_FOUND,
    template: "model '{name}' not found: models are this server's modules, and none is named so (ModelReady tells whether one is)",
  },
  BN_ERR_INFER_VERSION: {
    status: Status.NOT_FOUND,
    template: "model '{name}' has no version '{version}': its one version is '1' (an empty version means '1')",
  },
  BN_ERR_INFER_INPUTS: {
    status: Status.INVALID_ARGUMENT,
    template: "model '{name}' takes one input, named 'input' (ModelMetadata lists it); the request has {detail}",
  },
  BN_ERR_INFER_OUTPUT: {
    status: Status.INVALID_ARGUMENT,
    template: "model '{name}' has one output, named 'output'; the request asks for '{output}'",
  },
  BN_ERR_INFER_DATATYPE: {
    status: Status.INVALID_ARGUMENT,
    template: "input 'input' has datatype '{datatype}'; model '{name}' takes FP32",
  },
  BN_ERR_INFER_CONTENTS: {
    status: Status.INVALID_ARGUMENT,
    template: "input 'input' {detail}; send its data either as raw_input_contents[0] (FP32, little-endian) or as contents.fp32_contents",
  },
  BN_ERR_INFER_DATA_SIZE: {
    status: Status.INVALID_ARGUMENT,
    template: "{where} has {given}, but input 'input' of shape [{shape}] and datatype FP32 needs {expected}",
  },
  BN_ERR_INFER_PARAMETER: {
    status: Status.INVALID_ARGUMENT,
    template: "{where} sets the parameter '{parameter}', but this server does not implement the {extension} extension; leave it out",
  },

  // PyTorch's forward errors (batchnorm-semantics.md §2.4, §3)
  BN_ERR_INPUT_RANK: { status: Status.INVALID_ARGUMENT, template: 'expected {expected} input (got {rank}D input)', pythonType: 'ValueError' },
  BN_ERR_ZERO_CHANNELS: {
    status: Status.INVALID_ARGUMENT,
    template: 'SyncBatchNorm number of input channels should be non-zero',
    pythonType: 'ValueError',
  },
  BN_ERR_ONE_VALUE_PER_CHANNEL: {
    status: Status.INVALID_ARGUMENT,
    template: 'Expected more than 1 value per channel when training, got input size {size}',
    pythonType: 'ValueError',
  },
  BN_ERR_CHANNEL_MISMATCH: {
    status: Status.INVALID_ARGUMENT,
    template: '{tensor} should contain {channels} elements not {length}',
    pythonType: 'RuntimeError',
  },
  BN_ERR_FORWARD_PARAMETERS: {
    status: Status.INVALID_ARGUMENT,
    template: "Forward's weight and bias {detail}; nothing was changed",
  },
  BN_ERR_BUFFER_UNDEFINED: {
    status: Status.FAILED_PRECONDITION,
    template: '{buffer} must be defined in evaluation mode',
    pythonType: 'RuntimeError',
  },

  // Backward (§6)
  BN_ERR_GRAD_SHAPE: {
    status: Status.INVALID_ARGUMENT,
    template: 'Mismatch in shape: grad_output[0] has a shape of {given} and output[0] has a shape of {expected}.',
    pythonType: 'RuntimeError',
  },
  BN_ERR_CONTEXT_NOT_FOUND: { status: Status.NOT_FOUND, template: 'context {id}: {why}' },
  BN_ERR_CONTEXT_TOO_LARGE: {
    status: Status.RESOURCE_EXHAUSTED,
    template: 'saving {bytes} bytes for backward is over the limit context_budget_bytes={limit}; call Forward without save_for_backward or raise the limit',
  },

  // PyTorch's state errors (§2.3, §9)
  BN_ERR_BUFFER_IS_NONE: {
    status: Status.FAILED_PRECONDITION,
    template:
      "{operation}() needs running_mean, running_var and num_batches_tracked while track_running_stats is True, but {buffer} is None (PyTorch raises AttributeError: 'NoneType' object has no attribute '{method}'); nothing was changed",
    pythonType: 'AttributeError',
  },
  BN_ERR_LOAD_STATE: {
    status: Status.INVALID_ARGUMENT,
    template: 'Error(s) in loading state_dict for {className}:\n\t{errors}',
    pythonType: 'RuntimeError',
  },

  // The SyncBatchNorm coordinator
  BN_ERR_NOT_SYNC: {
    status: Status.FAILED_PRECONDITION,
    template: "module '{name}' is a {className}: SyncBatchNormService serves SYNC_BATCH_NORM modules (ConvertToSync makes one)",
  },
  BN_ERR_USE_SYNC: {
    status: Status.FAILED_PRECONDITION,
    template: "module '{name}' is a SyncBatchNorm group of {worldSize} ranks that pools its statistics in this mode: use SyncBatchNormService.{method}",
  },
  BN_ERR_WORLD_SIZE: {
    status: Status.FAILED_PRECONDITION,
    template: "world_size {given} disagrees with module '{name}', a group of {expected} ranks",
  },
  BN_ERR_RANK: { status: Status.INVALID_ARGUMENT, template: 'rank {rank} is outside 0..{last} of a group of {worldSize} ranks' },
  BN_ERR_STEP: { status: Status.INVALID_ARGUMENT, template: 'step must be 0 or more, got {step}' },
  BN_ERR_STEP_ORDER: { status: Status.FAILED_PRECONDITION, template: "module '{name}': {detail}" },
  BN_ERR_STEP_ABORTED: {
    status: Status.ABORTED,
    template: "step {step} of module '{name}' was aborted: {why}; nothing changed, run the step again",
  },
  BN_ERR_STEP_TIMEOUT: {
    status: Status.ABORTED,
    template:
      "step {step} of module '{name}' timed out after step_timeout_ms={ms} waiting for ranks {missing} (joined: {joined}); nothing changed, run the step again",
  },
  BN_ERR_DUPLICATE_RANK: {
    status: Status.ALREADY_EXISTS,
    template: "rank {rank} already sent different {what} for step {step} of module '{name}'",
  },
  BN_ERR_INVALID_STATS: { status: Status.INVALID_ARGUMENT, template: 'invalid {field}: {detail}' },
  BN_ERR_GROUP_CHANNELS: {
    status: Status.FAILED_PRECONDITION,
    template: "rank {rank} sent {channels} channels for step {step} of module '{name}'; rank {other} sent {expected}",
  },
  BN_ERR_NO_FORWARD_STEP: {
    status: Status.FAILED_PRECONDITION,
    template: "step {step} of module '{name}' has no completed forward here: SyncForward or GatherStats must complete it first",
  },
  BN_ERR_CONTEXT_STEP: {
    status: Status.INVALID_ARGUMENT,
    template: 'context {id} is from {from}, not step {step} rank {rank}',
  },

  // Authentication
  BN_ERR_UNAUTHENTICATED: { status: Status.UNAUTHENTICATED, template: '{why}' },
  BN_ERR_PERMISSION_DENIED: { status: Status.PERMISSION_DENIED, template: "token {id} may not {access} module '{name}'" },

  // Capacity and service state
  BN_ERR_TOO_MANY_MODULES: {
    status: Status.RESOURCE_EXHAUSTED,
    template: 'cannot create module {name}: the server holds {count} modules, the limit max_modules={limit}',
  },
  BN_ERR_TOO_MANY_CALLS: {
    status: Status.RESOURCE_EXHAUSTED,
    template: '{count} calls are {where} already, the limit {limit}; retry later',
  },
  BN_ERR_STREAM_BUDGET: {
    status: Status.RESOURCE_EXHAUSTED,
    template: 'a stream needs {bytes} bytes, and streams in flight hold {used} of the stream_budget_bytes={limit}; retry later or send a smaller tensor',
  },
  BN_ERR_INVALID_STREAM: {
    status: Status.INVALID_ARGUMENT,
    template: 'invalid stream: {detail} (send one head message, then the tensor\'s bytes as chunks)',
  },
  BN_ERR_SHM_DISABLED: {
    status: Status.FAILED_PRECONDITION,
    template: 'shared memory is off on this server; the operator turns it on with --shm-dir (e.g. /dev/shm)',
  },
  BN_ERR_REGION_NAME: {
    status: Status.INVALID_ARGUMENT,
    template: "invalid region name '{name}': use 1 to 128 letters, digits, '.', '_', '-' or '/'",
  },
  BN_ERR_REGION_EXISTS: { status: Status.ALREADY_EXISTS, template: "region '{name}' is registered already; unregister it first" },
  BN_ERR_REGION_LIMIT: { status: Status.RESOURCE_EXHAUSTED, template: 'the server holds {limit} regions, its limit; unregister some first' },
  BN_ERR_REGION_PATH: { status: Status.INVALID_ARGUMENT, template: 'cannot register {path}: {detail} (the server allows files under {dir})' },
  BN_ERR_REGION_BOUNDS: { status: Status.INVALID_ARGUMENT, template: 'out of bounds: {detail}' },
  BN_ERR_REGION_UNKNOWN: { status: Status.NOT_FOUND, template: "no region named '{name}' is registered (by this caller)" },
  BN_ERR_REGION_DATA: { status: Status.INVALID_ARGUMENT, template: '{field} has data and names a region; send the bytes one way only' },
  BN_ERR_NOT_OWNER: {
    status: Status.FAILED_PRECONDITION,
    template:
      "module '{name}' is in slot {slot}, which replica {member} at {owner} owns, not this one ({self}); send its calls there (google.rpc.ErrorInfo metadata 'owner' has the address)",
  },
  BN_ERR_SLOT_MOVING: {
    status: Status.UNAVAILABLE,
    template: "module '{name}' is in slot {slot}, which {why}; nothing was changed, retry shortly",
  },
  BN_ERR_CANCELLED: { status: Status.CANCELLED, template: 'the call was cancelled before it ran' },
  BN_ERR_SHUTTING_DOWN: { status: Status.UNAVAILABLE, template: 'the server is shutting down; retry on another replica' },
  BN_ERR_STORE: {
    status: Status.UNAVAILABLE,
    template: 'the data store could not be written ({detail}); the change was not made, retry later',
  },
  BN_ERR_STORE_UNKNOWN: {
    status: Status.UNKNOWN,
    template:
      'the data store did not confirm the change ({detail}); it may or may not have been made: read the module (GetModule, GetState) once the store is back, before you repeat the call',
  },
  BN_ERR_INTERNAL: { status: Status.INTERNAL, template: 'internal error: {detail}' },
} as const satisfies Record<string, Entry>;

export type ErrorCode = keyof typeof catalogue;

type Placeholders<T extends string> = T extends `${string}{${infer P}}${infer Rest}` ? P | Placeholders<Rest> : never;
export type ErrorArgs<C extends ErrorCode> = { [K in Placeholders<(typeof catalogue)[C]['template']>]: string | number | bigint };

/** An error from the catalogue. `field` names the request field at fault, when there is one. */
export class NormserveError extends Error {
  override readonly name = 'NormserveError';
  readonly status: StatusCode;
  readonly pythonType: PythonType | undefined;
  /** Extra google.rpc.ErrorInfo metadata for clients to act on (e.g. the owner's address). */
  metadata: Readonly<Record<string, string>> = {};

  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly field?: string,
  ) {
    super(message);
    const entry: Entry = catalogue[code];
    this.status = entry.status;
    this.pythonType = entry.pythonType;
  }

  /** Adds ErrorInfo metadata; returns the error, for `throw bnError(...).with({...})`. */
  with(metadata: Record<string, string>): this {
    this.metadata = { ...this.metadata, ...metadata };
    return this;
  }
}

export function formatTemplate(template: string, args: Record<string, string | number | bigint>): string {
  return template.replace(/\{(\w+)\}/g, (whole, key: string) => (key in args ? String(args[key]) : whole));
}

/** Makes the catalogue error `code` with its template filled from `args`. */
export function bnError<C extends ErrorCode>(code: C, args: ErrorArgs<C>, field?: string): NormserveError {
  return new NormserveError(code, formatTemplate(catalogue[code].template, args as Record<string, string>), field);
}
