/**
 * Errors to gRPC statuses, in one place. A catalogue error keeps its status and message, and
 * carries a google.rpc.Status in `grpc-status-details-bin` with an ErrorInfo (reason = the
 * catalogue code, metadata.python_type = the PyTorch exception class, when there is one) and,
 * for a field at fault, a BadRequest. The same reason and python type also travel as plain
 * trailers for clients that do not decode details. Anything else is INTERNAL, logged in full
 * and answered as BN_ERR_INTERNAL without internals.
 */
import { Metadata, type ServiceError } from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { bnError, NormserveError } from '../errors.js';
import { BadRequest, ERROR_DOMAIN, ErrorInfo, RpcStatus } from '../wire/proto.js';

export const REASON_TRAILER = 'normserve-error-reason';
export const PYTHON_TYPE_TRAILER = 'normserve-python-type';
export const DETAILS_TRAILER = 'grpc-status-details-bin';

function any(typeName: string, bytes: Uint8Array) {
  return { type_url: `type.googleapis.com/${typeName}`, value: bytes };
}

export function toServiceError(thrown: unknown, logger: Logger): Partial<ServiceError> {
  let err: NormserveError;
  if (thrown instanceof NormserveError) err = thrown;
  else {
    logger.error({ err: thrown }, 'unexpected error');
    err = bnError('BN_ERR_INTERNAL', { detail: 'the server log has the details' });
  }
  const metadata = new Metadata();
  const info: Record<string, string> = { ...err.metadata };
  if (err.pythonType) info.python_type = err.pythonType;
  const details = [any('google.rpc.ErrorInfo', ErrorInfo.encode(ErrorInfo.fromObject({ reason: err.code, domain: ERROR_DOMAIN, metadata: info })).finish())];
  if (err.field) {
    const violation = { field: err.field, description: err.message };
    details.push(any('google.rpc.BadRequest', BadRequest.encode(BadRequest.fromObject({ field_violations: [violation] })).finish()));
  }
  const status = RpcStatus.fromObject({ code: err.status, message: err.message, details });
  metadata.set(DETAILS_TRAILER, Buffer.from(RpcStatus.encode(status).finish()));
  metadata.set(REASON_TRAILER, err.code);
  if (err.pythonType) metadata.set(PYTHON_TYPE_TRAILER, err.pythonType);
  return { code: err.status, details: err.message, metadata };
}
