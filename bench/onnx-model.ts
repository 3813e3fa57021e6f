/**
 * ONNX models for bench/peers.ts, written in TypeScript: a minimal subset of onnx.proto (the
 * messages and fields a graph of standard operators needs, with onnx.proto's own field numbers),
 * defined in code with protobufjs, and the three BatchNorm graphs the benchmark runs on
 * onnxruntime: a training forward, an eval forward and a training backward.
 *
 * Why in code: the benchmark should need nothing but the repository's dependencies (no Python,
 * no onnx package, no model files to keep in step with the shapes).
 *
 * Semantics: ONNX's BatchNormalization is not PyTorch's. Its `momentum` weighs the old running
 * value (ONNX momentum 0.9 is PyTorch momentum 0.1), and in training mode it updates running_var
 * with the biased batch variance where PyTorch uses the unbiased one. The models are speed
 * anchors; bench/peers.ts checks each against the ONNX definition before it times them.
 */
import protobuf from 'protobufjs';

const { Enum, Field, Root, Type } = protobuf;

/** ModelProto.ir_version: IR version 8 (ONNX 1.10 to 1.12), which carries opset 15. */
export const IR_VERSION = 8;
/** The default domain's opset: BatchNormalization-15, ReduceSum-13 (axes input), ReduceMean-13 (axes attribute). */
export const OPSET = 15;

/** TensorProto.DataType values used here. */
export const DataType = { FLOAT: 1, INT64: 7 } as const;
type DataTypeValue = (typeof DataType)[keyof typeof DataType];

/** AttributeProto.AttributeType values. */
const AttributeType = { FLOAT: 1, INT: 2, STRING: 3, TENSOR: 4, FLOATS: 6, INTS: 7 } as const;

/** The subset of onnx.proto (onnx/onnx.proto, proto2) this file writes. */
function defineSchema(): protobuf.Root {
  const root = new Root();
  const repeated = 'repeated';

  const opset = new Type('OperatorSetIdProto').add(new Field('domain', 1, 'string')).add(new Field('version', 2, 'int64'));

  const dimension = new Type('Dimension').add(new Field('dim_value', 1, 'int64')).add(new Field('dim_param', 2, 'string'));
  const shape = new Type('TensorShapeProto').add(dimension).add(new Field('dim', 1, 'Dimension', repeated));

  const tensorType = new Type('Tensor').add(new Field('elem_type', 1, 'int32')).add(new Field('shape', 2, 'TensorShapeProto'));
  const typeProto = new Type('TypeProto').add(tensorType).add(new Field('tensor_type', 1, 'Tensor'));

  const valueInfo = new Type('ValueInfoProto').add(new Field('name', 1, 'string')).add(new Field('type', 2, 'TypeProto'));

  const tensor = new Type('TensorProto')
    .add(new Field('dims', 1, 'int64', repeated))
    .add(new Field('data_type', 2, 'int32'))
    .add(new Field('float_data', 4, 'float', repeated, undefined, { packed: true }))
    .add(new Field('int64_data', 7, 'int64', repeated, undefined, { packed: true }))
    .add(new Field('name', 8, 'string'))
    .add(new Field('raw_data', 9, 'bytes'));

  const attribute = new Type('AttributeProto')
    .add(new Enum('AttributeType', { UNDEFINED: 0, ...AttributeType }))
    .add(new Field('name', 1, 'string'))
    .add(new Field('f', 2, 'float'))
    .add(new Field('i', 3, 'int64'))
    .add(new Field('s', 4, 'bytes'))
    .add(new Field('ints', 8, 'int64', repeated))
    .add(new Field('type', 20, 'AttributeType'));

  const node = new Type('NodeProto')
    .add(new Field('input', 1, 'string', repeated))
    .add(new Field('output', 2, 'string', repeated))
    .add(new Field('name', 3, 'string'))
    .add(new Field('op_type', 4, 'string'))
    .add(new Field('attribute', 5, 'AttributeProto', repeated))
    .add(new Field('domain', 7, 'string'));

  const graph = new Type('GraphProto')
    .add(new Field('node', 1, 'NodeProto', repeated))
    .add(new Field('name', 2, 'string'))
    .add(new Field('initializer', 5, 'TensorProto', repeated))
    .add(new Field('input', 11, 'ValueInfoProto', repeated))
    .add(new Field('output', 12, 'ValueInfoProto', repeated));

  const model = new Type('ModelProto')
    .add(new Field('ir_version', 1, 'int64'))
    .add(new Field('producer_name', 2, 'string'))
    .add(new Field('graph', 7, 'GraphProto'))
    .add(new Field('opset_import', 8, 'OperatorSetIdProto', repeated));

  root.define('onnx').add(opset).add(shape).add(typeProto).add(valueInfo).add(tensor).add(attribute).add(node).add(graph).add(model);
  root.resolveAll();
  return root;
}

const ModelProto = defineSchema().lookupType('onnx.ModelProto');

// ---- A small graph builder ------------------------------------------------------------------

export interface ValueSpec {
  readonly name: string;
  readonly dims: readonly number[];
  /** Default FLOAT. */
  readonly type?: DataTypeValue;
}

export type Attribute =
  | { readonly name: string; readonly float: number }
  | { readonly name: string; readonly int: number }
  | { readonly name: string; readonly ints: readonly number[] };

export interface NodeSpec {
  readonly op: string;
  readonly inputs: readonly string[];
  readonly outputs: readonly string[];
  readonly attributes?: readonly Attribute[];
}

/** A constant: float values (stored as raw little-endian bytes) or int64 values. */
export type InitializerSpec =
  | { readonly name: string; readonly dims: readonly number[]; readonly floats: Float32Array }
  | { readonly name: string; readonly dims: readonly number[]; readonly int64s: readonly number[] };

export interface GraphSpec {
  readonly name: string;
  readonly inputs: readonly ValueSpec[];
  readonly outputs: readonly ValueSpec[];
  readonly nodes: readonly NodeSpec[];
  readonly initializers?: readonly InitializerSpec[];
}

function valueInfo(v: ValueSpec) {
  return {
    name: v.name,
    type: { tensor_type: { elem_type: v.type ?? DataType.FLOAT, shape: { dim: v.dims.map((d) => ({ dim_value: d })) } } },
  };
}

function attribute(a: Attribute) {
  if ('float' in a) return { name: a.name, type: AttributeType.FLOAT, f: a.float };
  if ('int' in a) return { name: a.name, type: AttributeType.INT, i: a.int };
  return { name: a.name, type: AttributeType.INTS, ints: [...a.ints] };
}

function initializer(t: InitializerSpec) {
  if ('floats' in t) {
    return { name: t.name, dims: [...t.dims], data_type: DataType.FLOAT, raw_data: new Uint8Array(t.floats.buffer, t.floats.byteOffset, t.floats.byteLength) };
  }
  return { name: t.name, dims: [...t.dims], data_type: DataType.INT64, int64_data: [...t.int64s] };
}

/** The serialised ModelProto of one graph, IR version 8, default-domain opset 15. */
export function encodeModel(g: GraphSpec): Uint8Array {
  const message = {
    ir_version: IR_VERSION,
    producer_name: 'normserve-bench',
    opset_import: [{ domain: '', version: OPSET }],
    graph: {
      name: g.name,
      node: g.nodes.map((n, i) => ({
        name: `${n.op.toLowerCase()}_${i}`,
        op_type: n.op,
        domain: '',
        input: [...n.inputs],
        output: [...n.outputs],
        attribute: (n.attributes ?? []).map(attribute),
      })),
      initializer: (g.initializers ?? []).map(initializer),
      input: g.inputs.map(valueInfo),
      output: g.outputs.map(valueInfo),
    },
  };
  const problem = ModelProto.verify(message);
  if (problem) throw new Error(`onnx-model: invalid ModelProto: ${problem}`);
  return ModelProto.encode(ModelProto.fromObject(message)).finish();
}

// ---- The BatchNorm models -------------------------------------------------------------------

/** Shape of a per-channel tensor that broadcasts against (N, C, *): [1, C, 1, …]. */
export function channelShape(shape: readonly number[]): number[] {
  return shape.map((d, i) => (i === 1 ? d : 1));
}

/** Every axis but the channel axis (1): the axes BatchNorm reduces over. */
export function reduceAxes(shape: readonly number[]): number[] {
  return shape.map((_, i) => i).filter((i) => i !== 1);
}

/**
 * One BatchNormalization node. Inputs X (shape), scale, B, input_mean, input_var (each [C]).
 * Training (training_mode = 1): outputs Y, running_mean, running_var, normalising with the batch's
 * statistics and updating the running ones with ONNX's rule
 * (running = input · momentum + batch · (1 − momentum), batch variance biased).
 * Eval (training_mode = 0): output Y from input_mean and input_var.
 */
export function batchNormForwardModel(shape: readonly number[], opts: { training: boolean; momentum: number; epsilon: number }): Uint8Array {
  const c = shape[1]!;
  const perChannel = (name: string): ValueSpec => ({ name, dims: [c] });
  return encodeModel({
    name: opts.training ? 'batch_norm_train' : 'batch_norm_eval',
    inputs: [{ name: 'X', dims: shape }, perChannel('scale'), perChannel('B'), perChannel('input_mean'), perChannel('input_var')],
    outputs: [{ name: 'Y', dims: shape }, ...(opts.training ? [perChannel('running_mean'), perChannel('running_var')] : [])],
    nodes: [
      {
        op: 'BatchNormalization',
        inputs: ['X', 'scale', 'B', 'input_mean', 'input_var'],
        outputs: opts.training ? ['Y', 'running_mean', 'running_var'] : ['Y'],
        attributes: [
          { name: 'epsilon', float: opts.epsilon },
          { name: 'momentum', float: opts.momentum },
          { name: 'training_mode', int: opts.training ? 1 : 0 },
        ],
      },
    ],
  });
}

/**
 * The backward of a training forward (batch statistics) as primitive operators; ONNX has no
 * BatchNorm gradient operator outside its training domain. Inputs X and dY (shape), and the
 * forward's mean, invstd and the weight, each shaped [1, C, 1, …] to broadcast. With
 * S1 = Σ dY and S2 = Σ dY·(X − mean) over every axis but 1, and n values per channel:
 *   grad_input  = w·invstd·(dY − S1/n − (X − mean)·invstd²·S2/n)
 *   grad_weight = S2·invstd,  grad_bias = S1   (both [1, C, 1, …])
 */
export function batchNormBackwardModel(shape: readonly number[]): Uint8Array {
  const ch = channelShape(shape);
  const axes = reduceAxes(shape);
  const n = axes.reduce((p, a) => p * shape[a]!, 1);
  const mul = (a: string, b: string, out: string): NodeSpec => ({ op: 'Mul', inputs: [a, b], outputs: [out] });
  const sub = (a: string, b: string, out: string): NodeSpec => ({ op: 'Sub', inputs: [a, b], outputs: [out] });
  // ReduceSum-13 takes the axes as an int64 input, not an attribute.
  const reduceSum = (x: string, out: string): NodeSpec => ({ op: 'ReduceSum', inputs: [x, 'axes'], outputs: [out], attributes: [{ name: 'keepdims', int: 1 }] });
  return encodeModel({
    name: 'batch_norm_backward',
    inputs: [
      { name: 'X', dims: shape },
      { name: 'dY', dims: shape },
      { name: 'mean', dims: ch },
      { name: 'invstd', dims: ch },
      { name: 'weight', dims: ch },
    ],
    outputs: [
      { name: 'grad_input', dims: shape },
      { name: 'grad_weight', dims: ch },
      { name: 'grad_bias', dims: ch },
    ],
    initializers: [
      { name: 'axes', dims: [axes.length], int64s: axes },
      { name: 'inv_n', dims: [], floats: Float32Array.of(1 / n) },
    ],
    nodes: [
      sub('X', 'mean', 'xmu'),
      reduceSum('dY', 'grad_bias'), // S1
      mul('dY', 'xmu', 'dy_xmu'),
      reduceSum('dy_xmu', 's2'), // S2
      mul('s2', 'invstd', 'grad_weight'),
      // Per channel: a = w·invstd, k = S1/n, b = invstd²·S2/n.
      mul('weight', 'invstd', 'a'),
      mul('grad_bias', 'inv_n', 'k'),
      mul('invstd', 'invstd', 'invstd2'),
      mul('invstd2', 's2', 'invstd2_s2'),
      mul('invstd2_s2', 'inv_n', 'b'),
      // Per element: (dY − k − xmu·b)·a.
      mul('xmu', 'b', 'xmu_b'),
      sub('dY', 'k', 'dy_k'),
      sub('dy_k', 'xmu_b', 'inner'),
      mul('inner', 'a', 'grad_input'),
    ],
  });
}
