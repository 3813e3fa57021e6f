/**
 * Answers that carry a float32 tensor (Forward's output, Backward's grad_input and their
 * SyncBatchNorm twins), serialised with one copy of the tensor instead of three.
 *
 * The default path copied an answer out of the backend's shared memory into plain memory, then
 * protobufjs copied it into a freshly allocated message (a page fault per 4 KiB on first touch),
 * then grpc-js copied that message into its framed buffer. Here the handler attaches the tensor to
 * the response (`withAnswerTensor`, the field itself left unset) and the method's serialiser
 * (`answerSerializer`) writes the rest of the message with protobufjs, then the tensor field by
 * hand: the Tensor message's shape and dtype, then the data.
 *
 * - A tensor in shared memory with room before it that its backend grants (Kernels.headRoom: the
 *   native backend allocates every shared tensor with 256 bytes of it) is not copied at all: the message's head is written into that room and
 *   the message is a view of the tensor's own memory. Tensor.padding (zero to seven bytes) puts
 *   the data where grpc-js's copy into its frame, five bytes into a new buffer, runs between
 *   equally aligned offsets: V8 copies out of shared memory word by word only then.
 * - Any other tensor is copied once, at an 8-byte boundary, into a buffer kept for the next
 *   answer.
 *
 * grpc-js frames the message inside the same synchronous call (`serializeMessage` copies it into
 * a new buffer and keeps nothing), so neither the kept buffer nor a tensor's head room is read
 * after the serialiser returns.
 *
 * The tensor field comes last on the wire rather than in field order; protobuf parsers take
 * fields in any order (the encoding guide's "Field Order"), and tensor-answer.test.ts decodes
 * every form with grpc-js's own deserialiser.
 */
import type { MethodDefinition, ServiceDefinition } from '@grpc/grpc-js';

const ANSWER = Symbol('normserve.answerTensor');

export interface AnswerTensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

type WithAnswer = { [ANSWER]?: AnswerTensor };

/** `message` with `tensor` to be written into its tensor field when it is serialised. */
export function withAnswerTensor<T extends object>(message: T, tensor: AnswerTensor): T {
  (message as WithAnswer)[ANSWER] = tensor;
  return message;
}

/** Bytes of tensor data attached by `withAnswerTensor` (for the call log), 0 if none. */
export function answerBytes(message: unknown): number {
  return typeof message === 'object' && message !== null ? ((message as WithAnswer)[ANSWER]?.data.byteLength ?? 0) : 0;
}

/**
 * Tensor's fields (tensor.proto): repeated int64 shape = 1 (packed); DType dtype = 2; bytes
 * data = 3; bytes padding = 4.
 */
const SHAPE_KEY = (1 << 3) | 2;
const DTYPE_KEY = (2 << 3) | 0;
const DATA_KEY = (3 << 3) | 2;
const PADDING_KEY = (4 << 3) | 2;
/** grpc-js's frame header before a message: the message starts 5 bytes into the framed buffer. */
const FRAME_HEADER = 5;
/** DType.FLOAT32 in tensor.proto. */
const FLOAT32 = 1;

function varintLength(value: number): number {
  let n = 1;
  while (value >= 128) {
    value = Math.floor(value / 128);
    n++;
  }
  return n;
}

function writeVarint(buf: Uint8Array, at: number, value: number): number {
  while (value >= 128) {
    buf[at++] = (value % 128) | 128;
    value = Math.floor(value / 128);
  }
  buf[at++] = value;
  return at;
}

/** The answer buffer kept between answers; one larger than this is allocated for its call alone. */
const KEEP_BYTES = 64 * 1024 * 1024;
let kept = new ArrayBuffer(0);

/** Bytes of the answer buffer kept now (counted in normserve_pooled_tensor_bytes). */
export function answerBufferBytes(): number {
  return kept.byteLength;
}

function bufferOf(bytes: number): ArrayBuffer {
  if (bytes <= kept.byteLength) return kept;
  if (bytes > KEEP_BYTES) return new ArrayBuffer(bytes);
  let size = Math.max(4096, kept.byteLength);
  while (size < bytes) size *= 2;
  kept = new ArrayBuffer(Math.min(size, KEEP_BYTES));
  return kept;
}

/** Bytes before a tensor that are free for its message head (Kernels.headRoom), 0 if none. */
export type RoomBefore = (data: Float32Array) => number;

/**
 * `serialize` (grpc-js's, from proto-loader) for messages without an attached tensor; with one,
 * the message as `serialize` writes it followed by field `field` holding the tensor, written in
 * place where `roomBefore` grants the bytes before the tensor.
 */
export function answerSerializer(serialize: (value: object) => Buffer, field: number, roomBefore: RoomBefore = () => 0): (value: object) => Buffer {
  const fieldKey = (field << 3) | 2;
  return (value) => {
    const tensor = (value as WithAnswer)[ANSWER];
    const rest = serialize(value);
    if (!tensor) return rest;
    const { shape, data } = tensor;
    let packed = 0;
    for (const dim of shape) packed += varintLength(dim);
    const dataBytes = data.byteLength;
    const shapeBytes = shape.length > 0 ? 1 + varintLength(packed) + packed : 0;
    const dataHead = dataBytes > 0 ? 1 + varintLength(dataBytes) : 0;
    /** The message's bytes before the data, with `pad` padding bytes (-1: no padding field). */
    const headWith = (pad: number) => {
      const inner = shapeBytes + 2 + (pad >= 0 ? 2 + pad : 0) + dataHead + dataBytes;
      return { inner, head: rest.length + 1 + varintLength(inner) + (inner - dataBytes) };
    };
    const write = (out: Uint8Array, inner: number, pad: number) => {
      out.set(rest, 0);
      let at = rest.length;
      out[at++] = fieldKey;
      at = writeVarint(out, at, inner);
      if (shape.length > 0) {
        out[at++] = SHAPE_KEY;
        at = writeVarint(out, at, packed);
        for (const dim of shape) at = writeVarint(out, at, dim);
      }
      out[at++] = DTYPE_KEY;
      out[at++] = FLOAT32;
      if (pad >= 0) {
        out[at++] = PADDING_KEY;
        out[at++] = pad;
        out.fill(0, at, at + pad);
        at += pad;
      }
      if (dataBytes > 0) {
        out[at++] = DATA_KEY;
        at = writeVarint(out, at, dataBytes);
      }
      return at;
    };
    // In place: a tensor in shared memory with room before it (the native backend's) gets the
    // message's head written just before its data, padded so that grpc-js's copy into its frame
    // runs between equally aligned offsets; no copy here at all.
    const room = data.buffer instanceof SharedArrayBuffer && dataBytes > 0 ? roomBefore(data) : 0;
    if (room > 0) {
      for (let pad = 0; pad < 8; pad++) {
        const { inner, head } = headWith(pad);
        if (head > room || (data.byteOffset - head) % 8 !== FRAME_HEADER) continue;
        const start = data.byteOffset - head;
        write(new Uint8Array(data.buffer, start, head), inner, pad);
        return Buffer.from(data.buffer, start, head + dataBytes);
      }
    }
    // Otherwise one copy, at an 8-byte boundary of the kept buffer.
    const { inner, head } = headWith(-1);
    const start = (8 - (head % 8)) % 8;
    const buffer = bufferOf(start + head + dataBytes);
    const out = new Uint8Array(buffer, start, head + dataBytes);
    const at = write(out, inner, -1);
    if (dataBytes > 0) out.set(new Uint8Array(data.buffer, data.byteOffset, dataBytes), at);
    return Buffer.from(buffer, start, head + dataBytes);
  };
}

/**
 * `service` with `answerSerializer` on the named methods, each given the name of its response's
 * tensor field; the field's number comes from the method's own descriptor.
 */
export function withAnswerSerializers(service: ServiceDefinition, methods: Readonly<Record<string, string>>, roomBefore?: RoomBefore): ServiceDefinition {
  const out: Record<string, MethodDefinition<object, object>> = { ...(service as Record<string, MethodDefinition<object, object>>) };
  for (const [name, fieldName] of Object.entries(methods)) {
    const method = out[name];
    if (!method) throw new Error(`withAnswerSerializers: the service has no method ${name}`);
    const descriptor = (method as { responseType?: { type?: { field?: { name: string; number: number; type: string; typeName: string }[] } } }).responseType?.type;
    const found = descriptor?.field?.find((f) => f.name === fieldName);
    if (!found || found.type !== 'TYPE_MESSAGE' || !found.typeName.endsWith('Tensor')) {
      throw new Error(`withAnswerSerializers: ${name}'s response has no Tensor field ${fieldName}`);
    }
    out[name] = { ...method, responseSerialize: answerSerializer(method.responseSerialize as (value: object) => Buffer, found.number, roomBefore) };
  }
  return out as ServiceDefinition;
}
