/**
 * The client's errors: a failed call carries its gRPC status, the catalogue code (typed, so a
 * `switch` on it is checked), PyTorch's exception class, and the decoded google.rpc details
 * (ErrorInfo metadata such as the owner's address, BadRequest field violations).
 */
import { status as grpcStatus, type Metadata, type ServiceError } from '@grpc/grpc-js';
import { statusName, type ErrorCode } from '../errors.js';
import { BadRequest, ErrorInfo, RpcStatus } from '../wire/proto.js';


export interface FieldViolation {
  field: string;
  description: string;
}

/** A failed call: the gRPC status plus normserve's reason code and PyTorch's exception class. */
export class NormserveClientError extends Error {
  override readonly name = 'NormserveClientError';
  /** The gRPC status code. */
  readonly code: number;
  /** Its name, e.g. 'INVALID_ARGUMENT'. */
  readonly statusName: string;
  /** The catalogue code (docs/errors.md), e.g. BN_ERR_INPUT_RANK; undefined for transport errors. */
  readonly reason: ErrorCode | undefined;
  /** ValueError, RuntimeError or AttributeError where PyTorch raises for the same call. */
  readonly pythonType: string | undefined;
  /** google.rpc.ErrorInfo's metadata, e.g. `owner` (the owner's address) with BN_ERR_NOT_OWNER. */
  readonly info: Readonly<Record<string, string>>;
  /** google.rpc.BadRequest's field violations: the request field at fault. */
  readonly fieldViolations: readonly FieldViolation[];
  readonly metadata: Metadata | undefined;

  constructor(err: Pick<ServiceError, 'code' | 'details' | 'message' | 'metadata'>) {
    super(err.details || err.message);
    this.code = err.code;
    this.statusName = statusName(err.code);
    this.metadata = err.metadata;
    const details = decodeDetails(err.metadata);
    this.reason = details.reason as ErrorCode | undefined;
    this.pythonType = details.info.python_type;
    this.info = details.info;
    this.fieldViolations = details.fieldViolations;
  }

  /**
   * Whether the server refused the call without changing anything and asks for a retry
   * (UNAVAILABLE with a catalogue reason: shutting down, or a store write undone). A transport
   * failure (UNAVAILABLE without a reason) may have happened after the server acted.
   */
  get refusedUnchanged(): boolean {
    return this.code === grpcStatus.UNAVAILABLE && this.reason !== undefined;
  }
}

function decodeDetails(metadata: Metadata | undefined): { reason: string | undefined; info: Record<string, string>; fieldViolations: FieldViolation[] } {
  const raw = metadata?.get('grpc-status-details-bin')[0];
  const out = { reason: undefined as string | undefined, info: {} as Record<string, string>, fieldViolations: [] as FieldViolation[] };
  if (!(raw instanceof Buffer)) return out;
  const status = RpcStatus.toObject(RpcStatus.decode(raw)) as { details?: { type_url: string; value: Uint8Array }[] };
  for (const any of status.details ?? []) {
    if (any.type_url.endsWith('/google.rpc.ErrorInfo')) {
      const info = ErrorInfo.toObject(ErrorInfo.decode(any.value)) as { reason: string; metadata?: Record<string, string> };
      out.reason = info.reason;
      out.info = info.metadata ?? {};
    } else if (any.type_url.endsWith('/google.rpc.BadRequest')) {
      const bad = BadRequest.toObject(BadRequest.decode(any.value)) as { field_violations?: FieldViolation[] };
      out.fieldViolations = bad.field_violations ?? [];
    }
  }
  return out;
}
