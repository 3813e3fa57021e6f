/**
 * Calls that carry one tensor in and one out (Forward, Backward and their sync twins), in three
 * shapes over one implementation (a TensorOp):
 *
 * - unary: the tensor inside the request message, decoded with one copy into the backend's memory;
 * - streamed: a head message with the tensor's shape and dtype, then its bytes in chunks of any
 *   size, copied straight to their place; the answer goes back as a head and then chunks. Streams
 *   hold at most `streamBudgetBytes` of tensors between them, so a tensor may be larger than a
 *   message while memory stays bounded by configuration;
 * - through shared memory: a unary call whose request names registered regions for the tensor
 *   and the answer (shared-memory.ts).
 *
 * A unary answer is written into its message by the method's serialiser (wire/tensor-answer.ts),
 * one aligned copy out of the backend's memory. Streamed answers that live in shared memory leave
 * through pooled plain buffers: V8 copies out of shared memory byte by byte when the target's
 * alignment differs, and protobufjs's copy into a message would be such a copy.
 */
import type { ServerDuplexStream } from '@grpc/grpc-js';
import { bnError } from '../errors.js';
import type { Tensor, Tensor__Output } from '../generated/normserve/v1/Tensor.js';
import { withAnswerTensor } from '../wire/tensor-answer.js';
import { copyBytes, decodeTensor, decodeTensorHeader, type DecodedTensor, type TensorHeader } from '../wire/tensor-codec.js';
import type { Ref, RegionRegistry } from './shared-memory.js';
import { toServiceError } from './status.js';
import { admit, authorize, moduleNameOf, type Admission, type CallContext, type Handler, type Requirement, type Scratch } from './unary.js';

/** What a tensor call answers: the response without its tensor, and the tensor. */
export interface TensorAnswer<Res> {
  readonly head: Res;
  readonly shape: readonly number[];
  readonly tensor: Float32Array;
}

export interface TensorOp<Req, Res> {
  /** The request's tensor field ('input' or 'grad_output') and the response's ('output' or 'grad_input'). */
  readonly inputField: string;
  readonly outputField: string;
  /**
   * Every check that needs no tensor data, in the order the unary call makes them; `header`
   * decodes the tensor's shape and dtype (and throws what is wrong with them).
   */
  check(req: Req, header: () => TensorHeader): void;
  /** The work, once the data is in. Tensors the call owns afterwards go into `scratch`. */
  run(req: Req, tensor: DecodedTensor, signal: AbortSignal, scratch: Scratch): Promise<TensorAnswer<Res>>;
  /** The data turned out wrong after `check` passed (length, or a stream cut short). */
  fail?(req: Req, err: unknown): void;
}

export interface TensorCallContext extends CallContext {
  readonly maxTensorElements: number;
  readonly regions: RegionRegistry;
  readonly allocate?: (length: number) => Float32Array;
  readonly streams: StreamBudget;
  /** Bytes per answer chunk of a stream. */
  readonly streamChunkBytes: number;
}

/**
 * Plain memory kept for reuse, by length: fresh memory costs a page fault per 4 KiB on first
 * touch. Only what `take` handed out comes back, once; past `limit` bytes a returned buffer is
 * left to the garbage collector.
 */
class PlainPool<T extends Uint8Array | Float32Array> {
  readonly #free = new Map<number, T[]>();
  readonly #out = new WeakSet<T>();
  readonly #make: (length: number) => T;
  #bytes = 0;
  constructor(
    readonly limit: number,
    make: (length: number) => T,
  ) {
    this.#make = make;
  }

  get bytes(): number {
    return this.#bytes;
  }

  take(length: number): T {
    const reused = this.#free.get(length)?.pop();
    if (reused) this.#bytes -= reused.byteLength;
    const out = reused ?? this.#make(length);
    this.#out.add(out);
    return out;
  }

  give(t: T): void {
    if (!this.#out.has(t)) return;
    this.#out.delete(t);
    if (this.#bytes + t.byteLength > this.limit) return;
    let list = this.#free.get(t.length);
    if (!list) this.#free.set(t.length, (list = []));
    list.push(t);
    this.#bytes += t.byteLength;
  }
}

/**
 * Plain-memory copies of answers in shared memory, for the inference service's answers (its
 * messages are not Tensors, so wire/tensor-answer.ts does not write them). protobufjs copies a
 * bytes field into its message at any offset, and V8 copies out of shared memory byte by byte
 * when the alignments differ; an aligned copy into plain memory first, then protobufjs's memcpy,
 * is faster.
 */
export class PlainCopies {
  readonly #pool: PlainPool<Float32Array>;
  constructor(limit = 256 * 1024 * 1024) {
    this.#pool = new PlainPool(limit, (n) => new Float32Array(n));
  }

  /** Bytes kept for reuse now. */
  get bytes(): number {
    return this.#pool.bytes;
  }

  /** `t` itself when it is in plain memory, else a copy (to `give` back once serialised). */
  take(t: Float32Array): Float32Array {
    if (!(t.buffer instanceof SharedArrayBuffer)) return t;
    const out = this.#pool.take(t.length);
    out.set(t);
    return out;
  }

  give(t: Float32Array): void {
    this.#pool.give(t);
  }
}

/** The bytes that streamed tensors may hold at once, reserved when a stream's head arrives. */
export class StreamBudget {
  #used = 0;
  constructor(readonly limit: number) {}

  get used(): number {
    return this.#used;
  }

  reserve(bytes: number): () => void {
    if (this.#used + bytes > this.limit) {
      throw bnError('BN_ERR_STREAM_BUDGET', { bytes, used: this.#used, limit: this.limit });
    }
    this.#used += bytes;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#used -= bytes;
    };
  }
}

const EMPTY = Buffer.alloc(0);

const decodeOptions = (ctx: TensorCallContext, field: string) => ({
  field,
  maxElements: ctx.maxTensorElements,
  accept: ['FLOAT32'] as const,
  ...(ctx.allocate && { allocate: ctx.allocate }),
});

/**
 * The unary form: the tensor travels inside the request and the response, or, where the request
 * names regions (`<field>_region`), through registered shared memory.
 */
export function unaryTensorHandler<Req, Res>(ctx: TensorCallContext, op: TensorOp<Req, Res>): Handler<Req, Res> {
  const inRegionField = `${op.inputField}_region`;
  const outRegionField = `${op.outputField}_region`;
  return async (req, signal, principal, scratch) => {
    const fields = req as Record<string, unknown>;
    const wire = fields[op.inputField] as Tensor__Output | null | undefined;
    const inRef = (fields[inRegionField] ?? null) as Ref | null;
    const outRef = (fields[outRegionField] ?? null) as Ref | null;
    const options = decodeOptions(ctx, op.inputField);
    let header: TensorHeader | undefined;
    op.check(req, () => (header = decodeTensorHeader(wire, options)));
    let tensor: DecodedTensor;
    try {
      if (inRef || outRef) header ??= decodeTensorHeader(wire, options);
      // The answer has the input's size: its place is checked before any work.
      if (outRef) ctx.regions.check(principal.id, outRef, header!.bytes, outRegionField);
      if (inRef) {
        if (wire && wire.data.length > 0) throw bnError('BN_ERR_REGION_DATA', { field: op.inputField }, op.inputField);
        ctx.regions.check(principal.id, inRef, header!.bytes, inRegionField);
        const data = ctx.allocate ? ctx.allocate(header!.count) : new Float32Array(header!.count);
        await ctx.regions.read(principal.id, inRef, new Uint8Array(data.buffer, data.byteOffset, data.byteLength), inRegionField);
        tensor = { shape: header!.shape, data };
      } else {
        tensor = decodeTensor(wire, options);
        // Copied out: let grpc-js's joined message go now rather than when the call ends.
        if (tensor.data.buffer !== wire!.data.buffer) (wire as { data: Buffer }).data = EMPTY;
      }
    } catch (err) {
      op.fail?.(req, err);
      throw err;
    }
    const answer = await op.run(req, tensor, signal, scratch);
    if (!outRef) {
      // The method's serialiser writes the tensor field (wire/tensor-answer.ts), straight from the
      // backend's memory, before `scratch` goes back to it.
      return withAnswerTensor({ ...answer.head, [op.outputField]: null } as Res & object, { shape: answer.shape, data: answer.tensor });
    }
    const out = answer.tensor;
    await ctx.regions.write(principal.id, outRef, new Uint8Array(out.buffer, out.byteOffset, out.byteLength), outRegionField);
    return { ...answer.head, [op.outputField]: { shape: answer.shape.map(String), dtype: 'FLOAT32', data: Buffer.alloc(0) } } as Res;
  };
}

interface StreamMessage<T> {
  head?: T | null;
  chunk?: Buffer;
  part?: 'head' | 'chunk';
}

/**
 * The streamed form, for a bidirectional stream of `{head | chunk}` messages. Admission (drain,
 * authentication, call limit) is as for unary calls; the permission is checked against the
 * head's module name.
 */
export function streamTensorHandler<Req, Res>(ctx: TensorCallContext, requirement: Requirement, op: TensorOp<Req, Res>) {
  return (call: ServerDuplexStream<StreamMessage<Req>, StreamMessage<Res>>) => {
    let finished = false;
    const cleanups: (() => void)[] = [];
    const scratch: Scratch = [];
    const finish = (err?: unknown) => {
      if (finished) return;
      finished = true;
      for (const cleanup of cleanups.splice(0)) cleanup();
      if (err !== undefined) call.emit('error', toServiceError(err, ctx.logger));
    };
    let admission: Admission;
    try {
      admission = admit(ctx, call);
    } catch (err) {
      return finish(err);
    }
    const { principal, signal } = admission;
    cleanups.push(() => admission.done());
    call.once('cancelled', () => finish());
    // Tensors go back to the backend once every chunk has been serialised.
    call.once('finish', () => {
      if (ctx.release) for (const t of scratch) ctx.release(t);
    });

    let req: Req | undefined;
    let header: TensorHeader | undefined;
    let data: Float32Array | undefined;
    let bytes: Uint8Array | undefined;
    let received = 0;

    call.on('data', (message: StreamMessage<Req>) => {
      if (finished) return;
      try {
        if (message.part === 'head') {
          if (req !== undefined) throw invalidStream('a second head arrived; a stream carries one call');
          req = message.head!;
          authorize(ctx, principal, requirement, moduleNameOf(req));
          const wire = (req as Record<string, unknown>)[op.inputField] as Tensor__Output | null | undefined;
          if (wire && wire.data.length > 0) throw invalidStream(`the head's ${op.inputField} carries data; send its bytes as chunks after the head`);
          op.check(req, () => (header = decodeTensorHeader(wire, decodeOptions(ctx, op.inputField))));
          // The input and the output it becomes.
          cleanups.push(ctx.streams.reserve(2 * header!.bytes));
          data = ctx.allocate ? ctx.allocate(header!.count) : new Float32Array(header!.count);
          bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
          return;
        }
        if (req === undefined || bytes === undefined) throw invalidStream('data arrived before the head');
        const chunk = message.chunk ?? Buffer.alloc(0);
        if (received + chunk.length > bytes.length) {
          throw streamLength(op.inputField, `more than the ${bytes.length} bytes its shape [${header!.shape.join(', ')}] needs`, req, op);
        }
        copyBytes(chunk, bytes.subarray(received, received + chunk.length));
        received += chunk.length;
      } catch (err) {
        finish(err);
      }
    });

    call.on('end', () => {
      if (finished) return;
      void (async () => {
        if (req === undefined || data === undefined) throw invalidStream('the stream ended without a head');
        if (received !== bytes!.length) {
          throw streamLength(op.inputField, `${received} bytes before the stream ended, of the ${bytes!.length} its shape [${header!.shape.join(', ')}] needs`, req, op);
        }
        const answer = await op.run(req, { shape: header!.shape, data }, signal, scratch);
        if (finished) return;
        const head = { ...answer.head, [op.outputField]: { shape: answer.shape.map(String), dtype: 'FLOAT32', data: Buffer.alloc(0) } satisfies Tensor } as Res;
        await write(call, { head });
        const out = answer.tensor;
        const outBytes = Buffer.from(out.buffer, out.byteOffset, out.byteLength);
        const shared = out.buffer instanceof SharedArrayBuffer;
        for (let at = 0; at < outBytes.length && !finished; at += ctx.streamChunkBytes) {
          const view = outBytes.subarray(at, Math.min(outBytes.length, at + ctx.streamChunkBytes));
          if (!shared) {
            await write(call, { chunk: view });
            continue;
          }
          // Out of shared memory, an aligned copy into a pooled plain buffer first (protobufjs's own
          // copy would go byte by byte, and fresh memory costs a page fault per 4 KiB); the buffer
          // comes back once the message has been written.
          const chunk = CHUNKS.take(view.length);
          chunk.set(view);
          await write(call, { chunk }, () => CHUNKS.give(chunk));
        }
        if (finished) return;
        finished = true;
        for (const cleanup of cleanups.splice(0)) cleanup();
        call.end();
      })().catch((err: unknown) => finish(err));
    });
  };
}

/** Plain buffers for answer chunks out of shared memory, shared by all streams (64 MiB at most kept). */
const CHUNKS = new PlainPool(64 * 1024 * 1024, (n) => Buffer.allocUnsafeSlow(n));

/**
 * Writes one message, waiting for the stream to drain when its buffer is full; `done` runs once
 * grpc-js has serialised and written it.
 */
function write<T>(call: ServerDuplexStream<unknown, T>, message: T, done?: () => void): Promise<void> {
  return new Promise((resolve) => {
    if (call.write(message, done)) resolve();
    else call.once('drain', resolve);
  });
}

function invalidStream(detail: string) {
  return bnError('BN_ERR_INVALID_STREAM', { detail });
}

function streamLength<Req>(field: string, detail: string, req: Req, op: TensorOp<Req, unknown>) {
  const err = bnError('BN_ERR_INVALID_TENSOR', { field, detail: `the stream carried ${detail}` }, field);
  op.fail?.(req, err);
  return err;
}
