/**
 * Tensors on the wire: `normserve.v1.Tensor` (shape as int64 strings, dtype, raw little-endian
 * bytes) to and from typed arrays. grpc-js hands `bytes` fields over as Buffer slices at any
 * offset; an aligned slice is viewed in place, an unaligned one is copied once.
 */
import { endianness } from 'node:os';
import type { Tensor, Tensor__Output } from '../generated/normserve/v1/Tensor.js';
import { bnError } from '../errors.js';

if (endianness() !== 'LE') throw new Error('normserve reads tensors as little-endian and needs a little-endian host');

export const MAX_RANK = 64;

const ELEMENT_BYTES = { FLOAT32: 4, FLOAT64: 8, FLOAT16: 2, BFLOAT16: 2 } as const;
export type WireDType = keyof typeof ELEMENT_BYTES;

export interface DecodedTensor {
  readonly shape: number[];
  readonly data: Float32Array;
}

export interface DecodeOptions {
  /** Request field name, for error messages, e.g. "input". */
  readonly field: string;
  readonly maxElements: number;
  /** The dtypes this call accepts; FLOAT64 is converted to float32 (as PyTorch's copy_ does). */
  readonly accept: readonly ('FLOAT32' | 'FLOAT64')[];
  /**
   * Where float32 contents go: the compute backend's memory (see Kernels.allocate). The bytes are
   * then always copied there, once; without it an aligned field is viewed in place.
   */
  readonly allocate?: (length: number) => Float32Array;
}

export interface TensorHeader {
  readonly shape: number[];
  readonly dtype: WireDType;
  /** Elements, and bytes the data must have. */
  readonly count: number;
  readonly bytes: number;
}

/** Checks a tensor message's shape and dtype (not its data): what a stream's first message declares. */
export function decodeTensorHeader(t: Pick<Tensor__Output, 'shape' | 'dtype'> | null | undefined, opts: DecodeOptions): TensorHeader {
  const { field } = opts;
  const invalid = (detail: string) => bnError('BN_ERR_INVALID_TENSOR', { field, detail }, field);
  if (!t) throw invalid('the tensor is missing');
  const dtype = t.dtype as string | number;
  if (dtype === 'DTYPE_UNSPECIFIED') throw invalid('dtype is unset (DTYPE_UNSPECIFIED); set it to FLOAT32');
  if (typeof dtype !== 'string' || !(dtype in ELEMENT_BYTES)) throw invalid(`unknown dtype ${String(dtype)}`);
  if (!(opts.accept as readonly string[]).includes(dtype)) {
    throw bnError('BN_ERR_UNSUPPORTED_DTYPE', { field, dtype, accepted: opts.accept.join(' or ') }, `${field}.dtype`);
  }
  if (t.shape.length > MAX_RANK) throw invalid(`rank ${t.shape.length} is over the maximum of ${MAX_RANK}`);

  const shape: number[] = [];
  let elements = 1n;
  for (const [i, text] of t.shape.entries()) {
    const dim = BigInt(text);
    if (dim < 0n) throw invalid(`dimension ${i} is ${dim}; dimensions must be 0 or more`);
    if (dim > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(`dimension ${i} is ${dim}, over 2^53 - 1`);
    elements *= dim;
    shape.push(Number(dim));
  }
  if (elements > BigInt(opts.maxElements)) {
    throw bnError('BN_ERR_TENSOR_TOO_LARGE', { field, elements, limit: opts.maxElements }, field);
  }
  const count = Number(elements);
  return { shape, dtype: dtype as WireDType, count, bytes: count * ELEMENT_BYTES[dtype as WireDType] };
}

/** Checks a tensor message and returns its float32 contents. */
export function decodeTensor(t: Pick<Tensor__Output, 'shape' | 'dtype' | 'data'> | null | undefined, opts: DecodeOptions): DecodedTensor {
  const header = decodeTensorHeader(t, opts);
  const { shape, dtype, count } = header;
  const bytes = t!.data;
  if (bytes.length !== header.bytes) {
    throw bnError(
      'BN_ERR_INVALID_TENSOR',
      {
        field: opts.field,
        detail: `data has ${bytes.length} bytes, but shape [${shape.join(', ')}] of ${dtype} needs ${header.bytes} (${count} elements of ${ELEMENT_BYTES[dtype]} bytes)`,
      },
      opts.field,
    );
  }
  if (dtype === 'FLOAT64') {
    const f64 = bytes.byteOffset % 8 === 0 ? new Float64Array(bytes.buffer, bytes.byteOffset, count) : copyAligned(bytes, Float64Array, count);
    return { shape, data: Float32Array.from(f64) };
  }
  if (opts.allocate) {
    const data = opts.allocate(count);
    copyBytes(bytes, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    return { shape, data };
  }
  const data = bytes.byteOffset % 4 === 0 ? new Float32Array(bytes.buffer, bytes.byteOffset, count) : copyAligned(bytes, Float32Array, count);
  return { shape, data };
}

/** A cache-sized bounce buffer for copyBytes (the event loop runs one copy at a time). */
const BOUNCE = new Uint8Array(1 << 20);

/**
 * Copies `from` into `to`. V8 copies into shared memory with relaxed atomics, word by word only
 * when source and target are equally aligned, else byte by byte (about 6× slower than memcpy on a
 * 25 MB tensor). Received bytes sit at any offset, so a misaligned copy into shared memory goes
 * through a bounce buffer in cache: a memcpy in, an aligned copy out.
 */
export function copyBytes(from: Uint8Array, to: Uint8Array): void {
  if (!(to.buffer instanceof SharedArrayBuffer) || (from.byteOffset - to.byteOffset) % 8 === 0 || from.length <= 4096) {
    to.set(from);
    return;
  }
  for (let at = 0; at < from.length; at += BOUNCE.length) {
    const n = Math.min(BOUNCE.length, from.length - at);
    BOUNCE.set(from.subarray(at, at + n));
    to.set(BOUNCE.subarray(0, n), at);
  }
}

function copyAligned<T extends Float32Array | Float64Array>(
  bytes: Uint8Array,
  Kind: { new (n: number): T },
  count: number,
): T {
  const out = new Kind(count);
  new Uint8Array(out.buffer).set(bytes);
  return out;
}

/** A float32 tensor message over `data`'s memory (no copy). */
export function encodeTensor(shape: readonly number[], data: Float32Array): Tensor {
  return {
    shape: shape.map(String),
    dtype: 'FLOAT32',
    data: Buffer.from(data.buffer, data.byteOffset, data.byteLength),
  };
}
