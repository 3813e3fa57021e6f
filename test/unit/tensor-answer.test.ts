/**
 * Answers serialised with their tensor written by hand (wire/tensor-answer.ts) decode, with
 * grpc-js's own deserialisers and with protobufjs, to what the ordinary serialiser gives for the
 * same message.
 */
import { describe, expect, it } from 'vitest';
import type { MethodDefinition } from '@grpc/grpc-js';
import { batchNormService, syncBatchNormService } from '../../src/wire/proto.js';
import { answerBytes, answerSerializer, withAnswerSerializers, withAnswerTensor } from '../../src/wire/tensor-answer.js';
import { encodeTensor } from '../../src/wire/tensor-codec.js';
import { HEAD_ROOM, NativeKernels } from '../../src/kernels/native/native-kernels.js';

type Method = MethodDefinition<object, object>;
const forward = batchNormService.Forward as unknown as Method;
const backward = batchNormService.Backward as unknown as Method;
/** Served as the native backend's tensors are: every byte before a test tensor is its own. */
const served = withAnswerSerializers(batchNormService, { Forward: 'output', Backward: 'grad_input' }, (t) => t.byteOffset) as unknown as Record<string, Method>;
const servedWithoutRoom = withAnswerSerializers(batchNormService, { Forward: 'output', Backward: 'grad_input' }) as unknown as Record<string, Method>;

const values = (n: number, seed: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.37 + seed) * 100);
/** A tensor in shared memory, with `room` bytes before it (the native backend leaves HEAD_ROOM). */
const shared = (data: Float32Array, room = 0) => {
  const out = new Float32Array(new SharedArrayBuffer(room + data.byteLength), room, data.length);
  out.set(data);
  return out;
};
/** A decoded message without Tensor.padding, which carries nothing. */
const withoutPadding = (message: unknown): unknown =>
  JSON.parse(JSON.stringify(message, (key, value) => (key === 'padding' ? undefined : value)));

describe('answers with their tensor written by the serialiser', () => {
  const shapes: number[][] = [[2, 3, 4, 5], [7, 1], [0, 3], [1], [], [3, 2 ** 31 + 5, 0], [1, 300, 1]];
  for (const shape of shapes) {
    it(`decode as the ordinary serialiser's Forward answer of shape [${shape.join(', ')}]`, () => {
      const n = shape.reduce((a, b) => a * b, 1);
      const data = shared(values(n, shape.length));
      const ordinary = forward.responseSerialize({ output: encodeTensor(shape, data), context_id: 'ctx-7' });
      const handwritten = served.Forward!.responseSerialize(withAnswerTensor({ output: null, context_id: 'ctx-7' }, { shape, data }));
      expect(forward.responseDeserialize(handwritten)).toEqual(forward.responseDeserialize(ordinary));
      // protobufjs also writes an empty data field, which the hand-written form leaves out.
      if (n > 0) expect(handwritten.length).toBe(ordinary.length);
    });
  }

  for (const room of [HEAD_ROOM, 60, 64]) {
    it(`are written in place before a tensor with ${room} bytes of room, framed between equally aligned offsets`, () => {
      const data = shared(values(2 * 3 * 64, room), room);
      const ordinary = forward.responseSerialize({ output: encodeTensor([2, 3, 64], data), context_id: 'a-context' });
      const inPlace = served.Forward!.responseSerialize(withAnswerTensor({ output: null, context_id: 'a-context' }, { shape: [2, 3, 64], data }));
      expect(inPlace.buffer).toBe(data.buffer);
      expect(inPlace.byteOffset + inPlace.length).toBe(data.byteOffset + data.byteLength);
      // grpc-js puts the message 5 bytes into its frame: source and target then agree modulo 8.
      expect(inPlace.byteOffset % 8).toBe(5);
      expect(withoutPadding(forward.responseDeserialize(inPlace))).toEqual(withoutPadding(forward.responseDeserialize(ordinary)));
      const padding = (forward.responseDeserialize(inPlace) as { output: { padding: Buffer } }).output.padding;
      expect(padding.length).toBeLessThan(8);
      expect(padding.every((b) => b === 0)).toBe(true);
    });
  }

  it('never write before a tensor whose backend grants no room, and then copy it', () => {
    const data = shared(values(2 * 3 * 64, 7), HEAD_ROOM);
    const before = new Uint8Array(data.buffer, 0, HEAD_ROOM).fill(0xab);
    const out = servedWithoutRoom.Forward!.responseSerialize(withAnswerTensor({ output: null, context_id: 'a' }, { shape: [2, 3, 64], data }));
    expect(out.buffer).not.toBe(data.buffer);
    expect(before.every((b) => b === 0xab)).toBe(true);
    const ordinary = forward.responseSerialize({ output: encodeTensor([2, 3, 64], data), context_id: 'a' });
    expect(forward.responseDeserialize(out)).toEqual(forward.responseDeserialize(ordinary));
  });

  it('grant the native backend room before its own shared tensors only', async () => {
    const kernels = new NativeKernels({ threads: 2, inlineBelow: 16 });
    try {
      const own = kernels.allocate(64);
      expect(kernels.headRoom(own)).toBe(HEAD_ROOM);
      expect(kernels.headRoom(own.subarray(1))).toBe(0);
      expect(kernels.headRoom(shared(values(64, 1), HEAD_ROOM))).toBe(0);
      expect(kernels.headRoom(kernels.allocate(8))).toBe(0);
    } finally {
      await kernels.dispose();
    }
  });

  it('fall back to a copy where the room before a shared tensor is too small', () => {
    const data = shared(values(12, 1), 8);
    const out = served.Forward!.responseSerialize(withAnswerTensor({ output: null, context_id: 'a-context-id-longer-than-the-room' }, { shape: [3, 4], data }));
    expect(out.buffer).not.toBe(data.buffer);
    const ordinary = forward.responseSerialize({ output: encodeTensor([3, 4], data), context_id: 'a-context-id-longer-than-the-room' });
    expect(forward.responseDeserialize(out)).toEqual(forward.responseDeserialize(ordinary));
  });

  it('leave the other fields of a Backward answer as they are', () => {
    const data = shared(values(24, 3));
    const weight = encodeTensor([4], Float32Array.of(1, 2, 3, 4));
    const bias = encodeTensor([4], Float32Array.of(-1, 0, 1, 2));
    const ordinary = backward.responseSerialize({ grad_input: encodeTensor([2, 4, 3], data), grad_weight: weight, grad_bias: bias });
    const handwritten = served.Backward!.responseSerialize(withAnswerTensor({ grad_input: null, grad_weight: weight, grad_bias: bias }, { shape: [2, 4, 3], data }));
    expect(backward.responseDeserialize(handwritten)).toEqual(backward.responseDeserialize(ordinary));
  });

  it('put the data on an 8-byte boundary, and a later answer reuses the buffer without touching what was framed', () => {
    const serialize = answerSerializer(forward.responseSerialize as (value: object) => Buffer, 1);
    const a = values(1000, 1);
    const first = serialize(withAnswerTensor({ output: null, context_id: 'x' }, { shape: [10, 100], data: shared(a) }));
    const framed = Buffer.from(first);
    const second = serialize(withAnswerTensor({ output: null, context_id: 'longer context id' }, { shape: [10, 100], data: shared(values(1000, 2)) }));
    expect(second.buffer).toBe(first.buffer);
    const decoded = forward.responseDeserialize(framed) as { output: { data: Buffer } };
    expect(Array.from(new Float32Array(new Uint8Array(decoded.output.data).buffer))).toEqual(Array.from(a));
    // The data ends the message: its start is the message's end minus its length.
    expect((second.byteOffset + second.length - 4000) % 8).toBe(0);
  });

  it('pass messages without an attached tensor to the ordinary serialiser', () => {
    const message = { output: encodeTensor([2], Float32Array.of(1, 2)), context_id: '' };
    expect(served.Forward!.responseSerialize(message)).toEqual(forward.responseSerialize(message));
  });

  it('count the attached tensor in the call log', () => {
    expect(answerBytes(withAnswerTensor({}, { shape: [3], data: new Float32Array(3) }))).toBe(12);
    expect(answerBytes({ output: null })).toBe(0);
  });

  it('refuse a method or field the service does not have, and a field that is not a Tensor', () => {
    expect(() => withAnswerSerializers(batchNormService, { Nope: 'output' })).toThrow(/no method Nope/);
    expect(() => withAnswerSerializers(batchNormService, { Forward: 'context_id' })).toThrow(/no Tensor field context_id/);
    expect(() => withAnswerSerializers(syncBatchNormService, { SyncForward: 'output', SyncBackward: 'grad_input' })).not.toThrow();
  });
});
