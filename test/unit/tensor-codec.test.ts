import { describe, expect, it } from 'vitest';
import { decodeTensor, encodeTensor } from '../../src/wire/tensor-codec.js';

const opts = { field: 'input', maxElements: 1000, accept: ['FLOAT32', 'FLOAT64'] as ('FLOAT32' | 'FLOAT64')[] };

/** The bytes of `values` placed at `offset` inside a larger buffer, as grpc-js hands them over. */
function sliceAt(bytes: Uint8Array, offset: number): Buffer {
  const backing = Buffer.alloc(bytes.length + 16);
  backing.set(bytes, offset);
  return backing.subarray(offset, offset + bytes.length);
}

describe('decodeTensor', () => {
  const values = [1.5, -2, 3.25, 1e-30, -0, Number.POSITIVE_INFINITY];
  const f32 = new Uint8Array(new Float32Array(values).buffer);
  const f64 = new Uint8Array(new Float64Array(values).buffer);

  for (const offset of [0, 1, 2, 3, 4, 5, 7]) {
    it(`reads FLOAT32 bytes at byte offset ${offset}`, () => {
      const t = decodeTensor({ shape: ['2', '3'], dtype: 'FLOAT32', data: sliceAt(f32, offset) }, opts);
      expect(t.shape).toEqual([2, 3]);
      expect(Array.from(t.data)).toEqual(Array.from(new Float32Array(values)));
    });
    it(`reads FLOAT64 bytes at byte offset ${offset} and converts them`, () => {
      const t = decodeTensor({ shape: ['6'], dtype: 'FLOAT64', data: sliceAt(f64, offset) }, opts);
      expect(Array.from(t.data)).toEqual(Array.from(new Float32Array(values)));
    });
  }

  it('views aligned float32 bytes in place and copies unaligned ones', () => {
    const aligned = sliceAt(f32, 4);
    expect(decodeTensor({ shape: ['6'], dtype: 'FLOAT32', data: aligned }, opts).data.buffer).toBe(aligned.buffer);
    const unaligned = sliceAt(f32, 3);
    expect(decodeTensor({ shape: ['6'], dtype: 'FLOAT32', data: unaligned }, opts).data.buffer).not.toBe(unaligned.buffer);
  });

  it('takes a 0-dim tensor as one element', () => {
    expect(decodeTensor({ shape: [], dtype: 'FLOAT32', data: Buffer.from(new Float32Array([7]).buffer) }, opts).data[0]).toBe(7);
  });

  it('encodes over the array memory without copying', () => {
    const data = new Float32Array([1, 2, 3]);
    const t = encodeTensor([3], data);
    expect(t).toMatchObject({ shape: ['3'], dtype: 'FLOAT32' });
    expect((t.data as Buffer).buffer).toBe(data.buffer);
  });
});

describe('copyBytes', () => {
  it('copies every byte into shared memory from any offset, through the bounce buffer or not', async () => {
    const { copyBytes } = await import('../../src/wire/tensor-codec.js');
    for (const size of [10, 4096, 4097, (1 << 20) + 13, 3 * (1 << 20) + 5]) {
      for (const skew of [0, 1, 3, 8]) {
        const source = new Uint8Array(size + skew).map((_, i) => (i * 131 + 7) & 255).subarray(skew);
        const shared = new Uint8Array(new SharedArrayBuffer(size));
        copyBytes(source, shared);
        expect(Buffer.from(shared.buffer).equals(Buffer.from(source)), `${size} bytes at offset ${skew}`).toBe(true);
        const plain = new Uint8Array(size);
        copyBytes(source, plain);
        expect(Buffer.from(plain.buffer).equals(Buffer.from(source))).toBe(true);
      }
    }
  });
});
