/**
 * One pino line per call: method, module, status, duration and tensor bytes in and out (never
 * tensor contents). A server interceptor, so that calls refused by grpc-js itself (message too
 * large, unknown method) are logged too. Health checks log at debug: probes would drown the log.
 */
import { ServerInterceptingCall, status as grpcStatus, type ServerInterceptor } from '@grpc/grpc-js';
import type { Logger } from 'pino';

const STATUS_NAMES = Object.fromEntries(Object.entries(grpcStatus).map(([k, v]) => [v, k])) as Record<number, string>;

/** Bytes of tensor data in a message: the `bytes` fields, found a few levels deep. */
export function payloadBytes(message: unknown, depth = 0): number {
  if (message === null || typeof message !== 'object' || depth > 3) return 0;
  if (message instanceof Uint8Array) return message.byteLength;
  let total = 0;
  for (const value of Object.values(message)) {
    if (value instanceof Uint8Array) total += value.byteLength;
    else if (typeof value === 'object' && value !== null) total += payloadBytes(value, depth + 1);
  }
  return total;
}

export function callLogInterceptor(logger: Logger): ServerInterceptor {
  return (method, call) => {
    const started = process.hrtime.bigint();
    let module: string | undefined;
    let bytesIn = 0;
    let bytesOut = 0;
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMessage: (message, nextMessage) => {
            if (typeof message?.name === 'string') module = message.name;
            bytesIn += payloadBytes(message);
            nextMessage(message);
          },
        }),
      sendMessage: (message, next) => {
        bytesOut += payloadBytes(message);
        next(message);
      },
      sendStatus: (status, next) => {
        const ms = Number(process.hrtime.bigint() - started) / 1e6;
        const line = {
          method: method.path,
          module,
          status: STATUS_NAMES[status.code] ?? String(status.code),
          ms: Math.round(ms * 1000) / 1000,
          bytes_in: bytesIn,
          bytes_out: bytesOut,
          ...(status.code === grpcStatus.OK ? {} : { error: status.details }),
        };
        if (method.path.startsWith('/grpc.health.v1.')) logger.debug(line, 'call');
        else logger.info(line, 'call');
        next(status);
      },
    });
  };
}
