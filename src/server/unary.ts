/**
 * The wrapper every unary handler runs in: refuse new calls while draining, count calls in
 * flight, turn thrown errors into statuses, and give the handler an AbortSignal that fires when
 * the client cancels or its deadline passes.
 */
import type { ServerUnaryCall, sendUnaryData } from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { bnError } from '../errors.js';
import type { Access, Authenticator, Principal } from './auth.js';
import { toServiceError } from './status.js';

export interface CallContext {
  readonly logger: Logger;
  /** True once shutdown has begun: new calls are refused with UNAVAILABLE. */
  readonly draining: () => boolean;
  /** Counts handlers running, for the drain and the limit. */
  readonly inFlight: { count: number };
  /** At most this many handlers run at once. */
  readonly maxCalls: number;
  readonly auth: Authenticator;
  /** Takes back tensors a call owned once its answer is sent (Kernels.release). */
  readonly release?: (tensor: Float32Array) => void;
}

/**
 * Tensors a call owns (decoded inputs it did not keep, outputs it answered with): handed back to
 * the compute backend for reuse once the answer has been serialised.
 */
export type Scratch = Float32Array[];

export type Handler<Req, Res> = (request: Req, signal: AbortSignal, principal: Principal, scratch: Scratch) => Res | Promise<Res>;

/**
 * What a call needs: `read` or `write` on the module it names, or `list` (any valid token; the
 * handler shows only what the principal may read).
 */
export type Requirement = Access | 'list';

export function unaryWith(ctx: CallContext) {
  return function unary<Req, Res>(requirement: Requirement, handler: Handler<Req, Res>) {
    return (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>) => {
      if (ctx.draining()) {
        callback(toServiceError(bnError('BN_ERR_SHUTTING_DOWN', {}), ctx.logger));
        return;
      }
      let principal: Principal;
      try {
        principal = ctx.auth.authenticate(call.metadata);
        const named = (call.request as { name?: unknown }).name;
        const name = typeof named === 'string' ? named : '';
        if (requirement !== 'list' && !principal.can(requirement, name)) {
          throw bnError('BN_ERR_PERMISSION_DENIED', { id: principal.id, access: requirement, name });
        }
      } catch (err) {
        callback(toServiceError(err, ctx.logger));
        return;
      }
      if (ctx.inFlight.count >= ctx.maxCalls) {
        const err = bnError('BN_ERR_TOO_MANY_CALLS', { count: ctx.inFlight.count, where: 'being handled', limit: `max_calls=${ctx.maxCalls}` });
        callback(toServiceError(err, ctx.logger));
        return;
      }
      const cancel = new AbortController();
      call.once('cancelled', () => cancel.abort());
      // grpc-js answers DEADLINE_EXCEEDED at the deadline without telling the handler: time it here too.
      const deadline = call.getDeadline();
      const ms = deadline instanceof Date ? deadline.getTime() - Date.now() : deadline - Date.now();
      const timer = Number.isFinite(ms) ? setTimeout(() => cancel.abort(), Math.max(0, ms)) : undefined;
      ctx.inFlight.count++;
      const scratch: Scratch = [];
      Promise.resolve()
        .then(() => handler(call.request, cancel.signal, principal, scratch))
        .then(
          // grpc-js serialises the response inside the callback: after it, no tensor is read again.
          (response) => callback(null, response),
          (err: unknown) => callback(toServiceError(err, ctx.logger)),
        )
        .finally(() => {
          clearTimeout(timer);
          ctx.inFlight.count--;
          if (ctx.release) for (const t of scratch) ctx.release(t);
        });
    };
  };
}
