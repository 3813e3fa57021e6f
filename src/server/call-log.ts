/**
 * One pino line per call: request id, method, module, status, duration and tensor bytes in and
 * out (never tensor contents), and the same numbers into the metrics. A server interceptor, so
 * that calls refused by grpc-js itself (message too large, unknown method) are counted too.
 * Health checks log at debug: probes would drown the log.
 *
 * The request id is the client's `x-request-id` when it sends a usable one, otherwise a new one;
 * it goes back in the response's headers and trailers.
 */
import { randomUUID } from 'node:crypto';
import { Metadata, ServerInterceptingCall, status as grpcStatus, type ServerInterceptor } from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { Metrics } from './metrics.js';
import { moduleNameOf } from './unary.js';
import { statusName } from '../errors.js';
import { answerBytes } from '../wire/tensor-answer.js';

export const REQUEST_ID = 'x-request-id';
const USABLE_ID = /^[A-Za-z0-9._:-]{1,128}$/;


/**
 * Bytes of tensor data in a message: the `bytes` fields, found a few levels deep, and a tensor
 * attached for its serialiser (wire/tensor-answer.ts).
 */
export function payloadBytes(message: unknown, depth = 0): number {
  if (message === null || typeof message !== 'object' || depth > 3) return 0;
  if (message instanceof Uint8Array) return message.byteLength;
  let total = answerBytes(message);
  for (const value of Object.values(message)) {
    if (value instanceof Uint8Array) total += value.byteLength;
    else if (typeof value === 'object' && value !== null) total += payloadBytes(value, depth + 1);
  }
  return total;
}

export function callLogInterceptor(logger: Logger, metrics?: Metrics): ServerInterceptor {
  return (method, call) => {
    const started = process.hrtime.bigint();
    let requestId: string = randomUUID();
    let module: string | undefined;
    let bytesIn = 0;
    let bytesOut = 0;
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, nextMetadata) => {
            const given = metadata.get(REQUEST_ID)[0];
            if (typeof given === 'string' && USABLE_ID.test(given)) requestId = given;
            nextMetadata(metadata);
          },
          onReceiveMessage: (message, nextMessage) => {
            const named = moduleNameOf(message);
            if (named !== '') module = named;
            bytesIn += payloadBytes(message);
            nextMessage(message);
          },
        }),
      sendMetadata: (metadata, next) => {
        metadata.set(REQUEST_ID, requestId);
        next(metadata);
      },
      sendMessage: (message, next) => {
        bytesOut += payloadBytes(message);
        next(message);
      },
      sendStatus: (status, next) => {
        const seconds = Number(process.hrtime.bigint() - started) / 1e9;
        const code = statusName(status.code);
        const line = {
          request_id: requestId,
          method: method.path,
          module,
          status: code,
          ms: Math.round(seconds * 1e6) / 1000,
          bytes_in: bytesIn,
          bytes_out: bytesOut,
          ...(status.code === grpcStatus.OK ? {} : { error: status.details }),
        };
        if (method.path.startsWith('/grpc.health.v1.')) logger.debug(line, 'call');
        else logger.info(line, 'call');
        metrics?.observeCall(method.path, code, seconds, bytesIn, bytesOut);
        const trailers = status.metadata ?? new Metadata();
        trailers.set(REQUEST_ID, requestId);
        next({ ...status, metadata: trailers });
      },
    });
  };
}
