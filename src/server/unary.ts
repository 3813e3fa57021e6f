/**
 * The wrapper every unary handler runs in: refuse new calls while draining, count calls in
 * flight, turn thrown errors into statuses, and give the handler an AbortSignal that fires when
 * the client cancels or its deadline passes.
 */
import type { Deadline, Metadata, ServerUnaryCall, sendUnaryData } from '@grpc/grpc-js';
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
  /**
   * Which replica owns which module (with a shared store): throws BN_ERR_NOT_OWNER, or
   * BN_ERR_SLOT_MOVING, for a module this replica may not serve now. A single server owns all.
   */
  readonly ownership?: { check(name: string): void };
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

/** A call let in: who makes it, a signal for its cancellation or deadline, and its end. */
export interface Admission {
  readonly principal: Principal;
  readonly signal: AbortSignal;
  /** Call once when the call has ended: it frees its place under --max-calls. */
  done(): void;
}

/**
 * The module a request names: `name` in normserve's messages, `model_name` in the Open Inference
 * Protocol's ('' when neither is a string).
 */
export function moduleNameOf(request: unknown): string {
  const r = request as { name?: unknown; model_name?: unknown } | null | undefined;
  if (typeof r?.name === 'string') return r.name;
  return typeof r?.model_name === 'string' ? r.model_name : '';
}

/**
 * Refuses a principal the access a call needs to the module it names, then a call on a module
 * this replica may not serve (BN_ERR_NOT_OWNER with the owner's address, or BN_ERR_SLOT_MOVING);
 * `list` names no module.
 */
export function authorize(ctx: Pick<CallContext, 'ownership'>, principal: Principal, requirement: Requirement, name: string): void {
  if (requirement === 'list') return;
  if (!principal.can(requirement, name)) throw bnError('BN_ERR_PERMISSION_DENIED', { id: principal.id, access: requirement, name });
  ctx.ownership?.check(name);
}

/**
 * Lets a call in, or throws why not: the server is draining, the token is missing or unknown,
 * `check` (the permission, where the module is known already) refuses, or --max-calls calls are
 * running. The signal fires when the client cancels or the deadline passes (grpc-js answers
 * DEADLINE_EXCEEDED at the deadline without telling the handler, so it is timed here too).
 */
export function admit(
  ctx: CallContext,
  call: {
    readonly metadata: Metadata;
    getDeadline(): Deadline;
    once(event: 'cancelled', listener: () => void): unknown;
    removeListener(event: 'cancelled', listener: () => void): unknown;
  },
  check: (principal: Principal) => void = () => {},
): Admission {
  if (ctx.draining()) throw bnError('BN_ERR_SHUTTING_DOWN', {});
  const principal = ctx.auth.authenticate(call.metadata);
  check(principal);
  if (ctx.inFlight.count >= ctx.maxCalls) {
    throw bnError('BN_ERR_TOO_MANY_CALLS', { count: ctx.inFlight.count, where: 'being handled', limit: `max_calls=${ctx.maxCalls}` });
  }
  const cancel = new AbortController();
  // grpc-js emits 'cancelled' when any call's stream closes, also after its status went out; an
  // abort then would only build an AbortError (a DOMException, tens of µs) that nobody reads.
  const onCancel = () => cancel.abort();
  call.once('cancelled', onCancel);
  const deadline = call.getDeadline();
  const ms = deadline instanceof Date ? deadline.getTime() - Date.now() : deadline - Date.now();
  const timer = Number.isFinite(ms) ? setTimeout(() => cancel.abort(), Math.max(0, ms)) : undefined;
  ctx.inFlight.count++;
  let ended = false;
  return {
    principal,
    signal: cancel.signal,
    done: () => {
      if (ended) return;
      ended = true;
      clearTimeout(timer);
      call.removeListener('cancelled', onCancel);
      ctx.inFlight.count--;
    },
  };
}

export function unaryWith(ctx: CallContext) {
  return function unary<Req, Res>(requirement: Requirement, handler: Handler<Req, Res>) {
    return (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>) => {
      let admission: Admission;
      try {
        admission = admit(ctx, call, (principal) => authorize(ctx, principal, requirement, moduleNameOf(call.request)));
      } catch (err) {
        callback(toServiceError(err, ctx.logger));
        return;
      }
      const scratch: Scratch = [];
      Promise.resolve()
        .then(() => handler(call.request, admission.signal, admission.principal, scratch))
        .then(
          // grpc-js serialises the response inside the callback: after it, no tensor is read again.
          (response) => callback(null, response),
          (err: unknown) => callback(toServiceError(err, ctx.logger)),
        )
        .finally(() => {
          admission.done();
          if (ctx.release) for (const t of scratch) ctx.release(t);
        });
    };
  };
}
