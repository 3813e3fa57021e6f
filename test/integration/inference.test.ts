/**
 * The Open Inference Protocol (inference.GRPCInferenceService) through real servers, with grpc-js
 * stubs built from its proto and with requests built as tritonclient builds them (in Python):
 * every RPC; answers equal to Forward's in eval mode bit for bit, while the module trains and
 * without changing it; every error with its status and message; tokens, --max-calls and the
 * drain as for normserve's own calls (ownership across replicas: etcd-cluster.test.ts).
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import {
  credentials,
  InterceptingCall,
  loadPackageDefinition,
  Metadata,
  status,
  type GrpcObject,
  type Interceptor,
  type ServiceClientConstructor,
  type ServiceError,
} from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient, type ModuleSpec } from '../../src/client/client.js';
import type { GRPCInferenceServiceClient } from '../../src/generated/inference/GRPCInferenceService.js';
import type { ModelInferRequest, _inference_ModelInferRequest_InferInputTensor as InputTensor } from '../../src/generated/inference/ModelInferRequest.js';
import type { ModelInferResponse__Output } from '../../src/generated/inference/ModelInferResponse.js';
import type { ModelMetadataResponse__Output } from '../../src/generated/inference/ModelMetadataResponse.js';
import { grpcObject } from '../../src/wire/proto.js';
import { channelData } from '../support/data.js';
import { capturedLogger } from '../support/log-capture.js';
import { rejection } from '../support/rejection.js';
import { startTestServer, type TestServer } from '../support/server.js';

const PACKAGE_VERSION = (JSON.parse(readFileSync('package.json', 'utf8')) as { version: string }).version;
const dir = mkdtempSync(join(tmpdir(), 'normserve-inference-'));

const servers: TestServer[] = [];
const stubs: GRPCInferenceServiceClient[] = [];
const clients: NormserveClient[] = [];
afterAll(async () => {
  for (const s of stubs) s.close();
  for (const c of clients) c.close();
  for (const s of servers) await s.stop();
});

async function serve(overrides: Parameters<typeof startTestServer>[0] = {}, logger?: Parameters<typeof startTestServer>[1]): Promise<TestServer> {
  const s = await startTestServer(overrides, logger);
  servers.push(s);
  return s;
}

function connect(address: string, interceptors: Interceptor[] = []): GRPCInferenceServiceClient {
  const stub = new grpcObject.inference.GRPCInferenceService(address, credentials.createInsecure(), { interceptors });
  stubs.push(stub);
  return stub;
}

function normserve(address: string, token?: string): NormserveClient {
  const c = new NormserveClient(address, token === undefined ? {} : { token });
  clients.push(c);
  return c;
}

/** One unary call on a raw stub. */
function rpc<Res>(stub: GRPCInferenceServiceClient, method: string, request: object, metadata = new Metadata()): Promise<Res> {
  return new Promise((resolve, reject) => {
    const fn = (stub as unknown as Record<string, (...args: unknown[]) => unknown>)[method]!;
    fn.call(stub, request, metadata, (err: ServiceError | null, res: Res) => (err ? reject(err) : resolve(res)));
  });
}

const infer = (stub: GRPCInferenceServiceClient, request: ModelInferRequest, metadata?: Metadata) =>
  rpc<ModelInferResponse__Output>(stub, 'ModelInfer', request, metadata);

const bytes = (x: Float32Array) => Buffer.from(x.buffer, x.byteOffset, x.byteLength);
/** Bit-for-bit comparable. */
const base64 = (x: Float32Array | Buffer) => (Buffer.isBuffer(x) ? x : bytes(x)).toString('base64');

/** Deterministic data of `shape` (N, C, ...). */
function data(shape: readonly number[], seed: number): Float32Array {
  const spatial = shape.slice(2).reduce((a, b) => a * b, 1);
  return channelData(shape[0]!, shape[1]!, spatial, 0.5, 3, seed);
}

/** A ModelInferRequest as tritonclient sends one: raw little-endian bytes, input 'input' of FP32. */
function request(name: string, shape: readonly number[], x: Float32Array, extra: Partial<ModelInferRequest> = {}, input: Partial<InputTensor> = {}): ModelInferRequest {
  return { model_name: name, inputs: [{ name: 'input', datatype: 'FP32', shape: [...shape], ...input }], raw_input_contents: [bytes(x)], ...extra };
}

/** A module trained for three steps, so that its running statistics and counter are not the defaults. */
async function trained(client: NormserveClient, name: string, spec: ModuleSpec, shape: readonly number[]): Promise<void> {
  await client.createModule(name, spec);
  for (let step = 1; step <= 3; step++) await client.forward(name, { shape: [...shape], data: data(shape, step) });
}

async function fingerprint(client: NormserveClient, name: string) {
  return { module: await client.getModule(name), state: await client.getState(name) };
}

describe('one server', () => {
  let server: TestServer;
  let stub: GRPCInferenceServiceClient;
  let client: NormserveClient;
  beforeAll(async () => {
    server = await serve();
    stub = connect(server.address);
    client = normserve(server.address);
  });

  describe('the server', () => {
    it('is live and ready, and names itself with no extensions', async () => {
      expect(await rpc(stub, 'ServerLive', {})).toEqual({ live: true });
      expect(await rpc(stub, 'ServerReady', {})).toEqual({ ready: true });
      expect(await rpc(stub, 'ServerMetadata', {})).toEqual({ name: 'normserve', version: PACKAGE_VERSION, extensions: [] });
    });

    it('reports the service through grpc.health.v1 and server reflection', async () => {
      expect(await client.health('inference.GRPCInferenceService')).toBe('SERVING');
      const require = createRequire(import.meta.url);
      const protoDir = join(dirname(require.resolve('@grpc/reflection')), '..', 'proto');
      const def = loadSync('grpc/reflection/v1/reflection.proto', { includeDirs: [protoDir], keepCase: true });
      const Reflection = (loadPackageDefinition(def) as unknown as { grpc: { reflection: { v1: GrpcObject } } }).grpc.reflection.v1.ServerReflection as ServiceClientConstructor;
      const reflection = new Reflection(server.address, credentials.createInsecure());
      const services = await new Promise<string[]>((resolve, reject) => {
        const call = (reflection as unknown as { ServerReflectionInfo: () => NodeJS.ReadWriteStream & { end(): void } }).ServerReflectionInfo();
        call.on('data', (r: { list_services_response?: { service: { name: string }[] } }) => resolve(r.list_services_response!.service.map((s) => s.name)));
        call.on('error', reject);
        call.write({ list_services: '' } as never);
        call.end();
      });
      reflection.close();
      expect(services).toContain('inference.GRPCInferenceService');
    });
  });

  describe('models', () => {
    beforeAll(async () => {
      await client.createModule('meta/1d', { kind: 'BATCH_NORM_1D', numFeatures: 3 });
      await client.createModule('meta/2d', { kind: 'BATCH_NORM_2D', numFeatures: 4 });
      await client.createModule('meta/3d', { kind: 'BATCH_NORM_3D', numFeatures: 5 });
      await client.createModule('meta/sync', { kind: 'SYNC_BATCH_NORM', numFeatures: 6, worldSize: 2 });
    });

    it('are ready when the module exists, in version "" or "1"', async () => {
      for (const version of [undefined, '', '1']) {
        expect(await rpc(stub, 'ModelReady', { name: 'meta/2d', version }), String(version)).toEqual({ ready: true });
      }
      expect(await rpc(stub, 'ModelReady', { name: 'meta/none' })).toEqual({ ready: false });
    });

    it('describe one FP32 input and output of the rank the kind takes, -1 for every size but the channels', async () => {
      const expected = { 'meta/1d': [-1, 3, -1], 'meta/2d': [-1, 4, -1, -1], 'meta/3d': [-1, 5, -1, -1, -1], 'meta/sync': [-1, 6, -1] };
      for (const [name, dims] of Object.entries(expected)) {
        const shape = dims.map(String);
        expect(await rpc<ModelMetadataResponse__Output>(stub, 'ModelMetadata', { name, version: '1' })).toEqual({
          name,
          versions: ['1'],
          platform: 'normserve',
          inputs: [{ name: 'input', datatype: 'FP32', shape }],
          outputs: [{ name: 'output', datatype: 'FP32', shape }],
          properties: {},
        });
      }
    });

    it('answer NOT_FOUND for an unknown model, and for any version but "1"', async () => {
      const unknown = await rejection(rpc(stub, 'ModelMetadata', { name: 'meta/none' }));
      expect(unknown).toMatchObject({
        code: status.NOT_FOUND,
        reason: 'BN_ERR_INFER_MODEL_NOT_FOUND',
        message: "model 'meta/none' not found: models are this server's modules, and none is named so (ModelReady tells whether one is)",
      });
      for (const method of ['ModelReady', 'ModelMetadata']) {
        expect(await rejection(rpc(stub, method, { name: 'meta/2d', version: '2' })), method).toMatchObject({
          code: status.NOT_FOUND,
          reason: 'BN_ERR_INFER_VERSION',
          message: "model 'meta/2d' has no version '2': its one version is '1' (an empty version means '1')",
        });
      }
    });
  });

  describe('ModelInfer', () => {
    const CASES = [
      { kind: 'BATCH_NORM_1D', shape: [4, 3, 5] },
      { kind: 'BATCH_NORM_1D', shape: [6, 3] },
      { kind: 'BATCH_NORM_2D', shape: [2, 3, 4, 4] },
      { kind: 'BATCH_NORM_3D', shape: [2, 2, 3, 2, 2] },
      { kind: 'SYNC_BATCH_NORM', shape: [2, 3, 4] },
    ] as const;

    it.each(CASES)('$kind on $shape: running statistics while training, bit for bit what Forward gives in eval, nothing changed', async ({ kind, shape }) => {
      const name = `eq/${kind}/${shape.length}`;
      await trained(client, name, { kind, numFeatures: shape[1] }, shape);
      const before = await fingerprint(client, name);
      expect(before.module).toMatchObject({ training: true, numBatchesTracked: 3n });
      const x = data(shape, 99);
      const answer = await infer(stub, request(name, shape, x, { id: 'request-7', outputs: [{ name: 'output' }] }));
      expect(answer).toMatchObject({
        model_name: name,
        model_version: '1',
        id: 'request-7',
        parameters: {},
        outputs: [{ name: 'output', datatype: 'FP32', shape: shape.map(String), parameters: {}, contents: null }],
      });
      expect(answer.raw_output_contents).toHaveLength(1);
      expect(await fingerprint(client, name)).toEqual(before);

      await client.eval(name);
      const y = await client.forward(name, { shape: [...shape], data: x });
      expect(base64(answer.raw_output_contents[0]!)).toBe(base64(y.data));
    });

    it('normalises with the batch statistics of a module without running statistics, as eval does', async () => {
      const shape = [3, 2, 4];
      await client.createModule('eq/untracked', { kind: 'BATCH_NORM_1D', numFeatures: 2, trackRunningStats: false });
      const x = data(shape, 5);
      const answer = await infer(stub, request('eq/untracked', shape, x));
      await client.eval('eq/untracked');
      expect(base64(answer.raw_output_contents[0]!)).toBe(base64((await client.forward('eq/untracked', { shape, data: x })).data));
    });

    it('reads raw bytes at any byte offset in the message (ids of 0 to 7 characters move them)', async () => {
      const shape = [2, 4, 32, 32];
      await trained(client, 'offsets/bn', { kind: 'BATCH_NORM_2D', numFeatures: 4 }, shape);
      const x = data(shape, 11);
      const answers = new Set<string>();
      for (let length = 0; length < 8; length++) {
        const answer = await infer(stub, request('offsets/bn', shape, x, { id: 'i'.repeat(length) }));
        expect(answer.id).toBe('i'.repeat(length));
        answers.add(base64(answer.raw_output_contents[0]!));
      }
      await client.eval('offsets/bn');
      expect([...answers]).toEqual([base64((await client.forward('offsets/bn', { shape, data: x })).data)]);
    });

    it('takes typed contents.fp32_contents as well, answers raw all the same, and ignores request parameters', async () => {
      const shape = [2, 3, 2, 2];
      await trained(client, 'typed/bn', { kind: 'BATCH_NORM_2D', numFeatures: 3 }, shape);
      const x = data(shape, 3);
      const fromRaw = await infer(stub, request('typed/bn', shape, x));
      const typed = request('typed/bn', shape, x, { raw_input_contents: [], parameters: { priority: { int64_param: 1 }, timeout: { int64_param: 5000 } } }, {
        contents: { fp32_contents: Array.from(x) },
      });
      const fromTyped = await infer(stub, typed);
      expect(fromTyped.outputs[0]!.contents).toBeNull();
      expect(base64(fromTyped.raw_output_contents[0]!)).toBe(base64(fromRaw.raw_output_contents[0]!));
    });

    it("answers docs/inference.md's grpcurl-style example as the page says", async () => {
      const page = readFileSync('docs/inference.md', 'utf8');
      const sent = JSON.parse(/grpcurl -plaintext -d '([\s\S]*?)' localhost:50051 inference\.GRPCInferenceService\/ModelInfer/.exec(page)![1]!) as ModelInferRequest;
      const expected = JSON.parse(/answers\n\n```json\n([\s\S]*?)```/.exec(page)![1]!) as object;
      await client.createModule('resnet/bn1', { kind: 'BATCH_NORM_1D', numFeatures: 3 });
      await client.eval('resnet/bn1');
      const answer = await infer(stub, sent);
      expect({ ...answer, raw_output_contents: answer.raw_output_contents.map((b) => b.toString('base64')) }).toMatchObject(expected);
    });

    it('answers an empty batch with an empty output', async () => {
      await client.createModule('empty/bn', { kind: 'BATCH_NORM_2D', numFeatures: 3 });
      const answer = await infer(stub, request('empty/bn', [0, 3, 2, 2], new Float32Array(0)));
      expect(answer.outputs[0]!.shape).toEqual(['0', '3', '2', '2']);
      expect(answer.raw_output_contents).toEqual([Buffer.alloc(0)]);
    });
  });

  describe('ModelInfer errors', () => {
    const name = 'err/bn';
    const shape = [2, 3, 1, 1];
    const x = data(shape, 1);
    let before: Awaited<ReturnType<typeof fingerprint>>;
    beforeAll(async () => {
      await trained(client, name, { kind: 'BATCH_NORM_2D', numFeatures: 3 }, shape);
      // Its twin in eval mode gives Forward's messages without a training forward's counter step.
      await trained(client, 'err/twin', { kind: 'BATCH_NORM_2D', numFeatures: 3 }, shape);
      await client.eval('err/twin');
      await client.createModule('err/group', { kind: 'SYNC_BATCH_NORM', numFeatures: 3, worldSize: 2, trackRunningStats: false });
      before = await fingerprint(client, name);
    });

    const contents = "; send its data either as raw_input_contents[0] (FP32, little-endian) or as contents.fp32_contents";
    const invalid: [string, ModelInferRequest, string, string][] = [
      ['no input', request(name, shape, x, { inputs: [] }), 'BN_ERR_INFER_INPUTS', "model 'err/bn' takes one input, named 'input' (ModelMetadata lists it); the request has 0 inputs"],
      [
        'two inputs',
        request(name, shape, x, { inputs: [{ name: 'input', datatype: 'FP32', shape }, { name: 'input', datatype: 'FP32', shape }] }),
        'BN_ERR_INFER_INPUTS',
        "model 'err/bn' takes one input, named 'input' (ModelMetadata lists it); the request has 2 inputs",
      ],
      ['another input name', request(name, shape, x, {}, { name: 'INPUT__0' }), 'BN_ERR_INFER_INPUTS', "model 'err/bn' takes one input, named 'input' (ModelMetadata lists it); the request has an input named 'INPUT__0'"],
      ['FP64', request(name, shape, x, { raw_input_contents: [Buffer.alloc(48)] }, { datatype: 'FP64' }), 'BN_ERR_INFER_DATATYPE', "input 'input' has datatype 'FP64'; model 'err/bn' takes FP32"],
      ['lower-case fp32', request(name, shape, x, {}, { datatype: 'fp32' }), 'BN_ERR_INFER_DATATYPE', "input 'input' has datatype 'fp32'; model 'err/bn' takes FP32"],
      ['raw and typed', request(name, shape, x, {}, { contents: { fp32_contents: Array.from(x) } }), 'BN_ERR_INFER_CONTENTS', `input 'input' has data in both raw_input_contents and contents${contents}`],
      ['two raw entries', request(name, shape, x, { raw_input_contents: [bytes(x), bytes(x)] }), 'BN_ERR_INFER_CONTENTS', `input 'input' is the only input, but raw_input_contents has 2 entries${contents}`],
      [
        'int_contents',
        request(name, shape, x, { raw_input_contents: [] }, { contents: { int_contents: [1, 2, 3, 4, 5, 6] } }),
        'BN_ERR_INFER_CONTENTS',
        `input 'input' has values in contents.int_contents, which does not hold FP32${contents}`,
      ],
      ['no data', request(name, shape, x, { raw_input_contents: [] }), 'BN_ERR_INFER_CONTENTS', `input 'input' has no data${contents}`],
      [
        'raw bytes short',
        request(name, shape, x, { raw_input_contents: [bytes(x).subarray(4)] }),
        'BN_ERR_INFER_DATA_SIZE',
        "raw_input_contents[0] has 20 bytes, but input 'input' of shape [2, 3, 1, 1] and datatype FP32 needs 24 bytes (6 elements of 4 bytes)",
      ],
      [
        'typed values short',
        request(name, shape, x, { raw_input_contents: [] }, { contents: { fp32_contents: [1, 2, 3, 4, 5] } }),
        'BN_ERR_INFER_DATA_SIZE',
        "contents.fp32_contents has 5 values, but input 'input' of shape [2, 3, 1, 1] and datatype FP32 needs 6 values",
      ],
      ['a negative dimension', request(name, [-1, 3, 1, 1], x), 'BN_ERR_INVALID_TENSOR', 'invalid tensor inputs[0]: dimension 0 is -1; dimensions must be 0 or more'],
      ['another output', request(name, shape, x, { outputs: [{ name: 'output' }, { name: 'probabilities' }] }), 'BN_ERR_INFER_OUTPUT', "model 'err/bn' has one output, named 'output'; the request asks for 'probabilities'"],
      [
        'input in shared memory',
        request(name, shape, x, {}, { parameters: { shared_memory_region: { string_param: 'region' } } }),
        'BN_ERR_INFER_PARAMETER',
        "input 'input' sets the parameter 'shared_memory_region', but this server does not implement the shared-memory extension; leave it out",
      ],
      [
        'classification',
        request(name, shape, x, { outputs: [{ name: 'output', parameters: { classification: { int64_param: 2 } } }] }),
        'BN_ERR_INFER_PARAMETER',
        "output 'output' sets the parameter 'classification', but this server does not implement the classification extension; leave it out",
      ],
    ];

    it.each(invalid)('INVALID_ARGUMENT for %s', async (_what, req, reason, message) => {
      expect(await rejection(infer(stub, req))).toMatchObject({ code: status.INVALID_ARGUMENT, reason, message });
      expect(await fingerprint(client, name)).toEqual(before);
    });

    it('names the field at fault in a google.rpc.BadRequest', async () => {
      const err = await rejection(infer(stub, request(name, shape, x, {}, { datatype: 'FP16' })));
      expect(err.fieldViolations).toEqual([{ field: 'inputs[0].datatype', description: "input 'input' has datatype 'FP16'; model 'err/bn' takes FP32" }]);
    });

    it("refuses a wrong rank or channel count with Forward's own errors", async () => {
      for (const wrong of [[2, 3, 4], [2, 4, 1, 1]]) {
        const viaForward = await rejection(client.forward('err/twin', { shape: wrong, data: data(wrong, 1) }));
        const viaInfer = await rejection(infer(stub, request(name, wrong, data(wrong, 1))));
        expect(viaInfer).toMatchObject({ code: status.INVALID_ARGUMENT, reason: viaForward.reason, message: viaForward.message, pythonType: viaForward.pythonType });
      }
      expect((await rejection(infer(stub, request(name, [2, 3, 4], data([2, 3, 4], 1))))).message).toBe('expected 4D input (got 3D input)');
      expect((await rejection(infer(stub, request(name, [2, 4, 1, 1], data([2, 4, 1, 1], 1))))).message).toBe('running_mean should contain 4 elements not 3');
      expect(await fingerprint(client, name)).toEqual(before);
    });

    it('answers NOT_FOUND for an unknown model or version, RESOURCE_EXHAUSTED past max_tensor_elements', async () => {
      expect(await rejection(infer(stub, request('err/none', shape, x)))).toMatchObject({
        code: status.NOT_FOUND,
        reason: 'BN_ERR_INFER_MODEL_NOT_FOUND',
        message: "model 'err/none' not found: models are this server's modules, and none is named so (ModelReady tells whether one is)",
      });
      expect(await rejection(infer(stub, request(name, shape, x, { model_version: '3' })))).toMatchObject({
        code: status.NOT_FOUND,
        reason: 'BN_ERR_INFER_VERSION',
        message: "model 'err/bn' has no version '3': its one version is '1' (an empty version means '1')",
      });
      expect(await rejection(infer(stub, request(name, [1, 3, 4096, 4096], new Float32Array(0))))).toMatchObject({
        code: status.RESOURCE_EXHAUSTED,
        reason: 'BN_ERR_TENSOR_TOO_LARGE',
        message: 'inputs[0] has 50331648 elements, over the limit max_tensor_elements=16777216',
      });
      expect(await fingerprint(client, name)).toEqual(before);
    });

    it('refuses a SyncBatchNorm group that pools batch statistics in eval: one rank cannot answer alone', async () => {
      expect(await rejection(infer(stub, request('err/group', shape, x)))).toMatchObject({
        code: status.FAILED_PRECONDITION,
        reason: 'BN_ERR_USE_SYNC',
        message: "module 'err/group' is a SyncBatchNorm group of 2 ranks that pools its statistics in this mode: use SyncBatchNormService.SyncForward",
      });
    });
  });

  describe('a client built like tritonclient (Python)', () => {
    it('reads the server and the model, and gets through InferResult.as_numpy what Forward gives in eval', async () => {
      const name = 'py/bn';
      const shape = [4, 3, 5];
      await trained(client, name, { kind: 'BATCH_NORM_1D', numFeatures: 3 }, shape);
      const before = await fingerprint(client, name);
      const x = data(shape, 42);
      const file = join(dir, 'input.f32');
      writeFileSync(file, bytes(x));
      // Asynchronously: the server answers from this process.
      const { stdout } = await promisify(execFile)('/usr/bin/python3', ['test/python/infer_client.py', server.address, name, file, shape.join(',')]);
      const result = JSON.parse(stdout) as { infer: { data: string } };
      expect(result).toMatchObject({
        server_live: true,
        server_ready: true,
        server_metadata: { name: 'normserve', version: PACKAGE_VERSION, extensions: [] },
        model_ready: true,
        model_metadata: {
          name,
          versions: ['1'],
          platform: 'normserve',
          inputs: [{ name: 'input', datatype: 'FP32', shape: [-1, 3, -1] }],
          outputs: [{ name: 'output', datatype: 'FP32', shape: [-1, 3, -1] }],
        },
        infer: {
          model_name: name,
          model_version: '1',
          id: 'py-1',
          outputs: [{ name: 'output', datatype: 'FP32', shape }],
          typed_contents: [false],
          dtype: 'float32',
          shape,
        },
        unknown_model: {
          status: 'StatusCode.NOT_FOUND',
          message: "model 'py/bn-missing' not found: models are this server's modules, and none is named so (ModelReady tells whether one is)",
        },
      });
      expect(await fingerprint(client, name)).toEqual(before);
      await client.eval(name);
      expect(result.infer.data).toBe(base64((await client.forward(name, { shape, data: x })).data));
    });
  });
});

describe('with bearer tokens', () => {
  const tokens = { a: 'token-of-team-a', admin: 'token-of-operators' };
  const sha = (t: string) => createHash('sha256').update(t).digest('hex');
  const bearer = (token: string) => {
    const m = new Metadata();
    m.set('authorization', `Bearer ${token}`);
    return m;
  };
  let stub: GRPCInferenceServiceClient;
  const shape = [2, 2];
  const x = Float32Array.of(1, 2, 3, 4);

  beforeAll(async () => {
    writeFileSync(
      join(dir, 'tokens.json'),
      JSON.stringify({
        tokens: [
          { id: 'team-a', sha256: sha(tokens.a), grants: [{ prefix: 'team-a/', access: 'read' }] },
          { id: 'operators', sha256: sha(tokens.admin), grants: [{ prefix: '', access: 'write' }] },
        ],
      }),
    );
    const server = await serve({ authTokensFile: join(dir, 'tokens.json') });
    stub = connect(server.address);
    const admin = normserve(server.address, tokens.admin);
    for (const name of ['team-a/bn', 'team-b/bn']) await admin.createModule(name, { kind: 'BATCH_NORM_1D', numFeatures: 2 });
  });

  it('refuses model and metadata calls without a token (UNAUTHENTICATED), but not liveness and readiness', async () => {
    const calls: [string, object][] = [
      ['ModelInfer', request('team-a/bn', shape, x)],
      ['ModelReady', { name: 'team-a/bn' }],
      ['ModelMetadata', { name: 'team-a/bn' }],
      ['ServerMetadata', {}],
    ];
    for (const [method, req] of calls) {
      expect(await rejection(rpc(stub, method, req)), method).toMatchObject({
        code: status.UNAUTHENTICATED,
        message: 'no bearer token: send the header authorization: Bearer <token>',
      });
    }
    expect(await rpc(stub, 'ServerLive', {})).toEqual({ live: true });
    expect(await rpc(stub, 'ServerReady', {})).toEqual({ ready: true });
  });

  it('serves a token that may read the model, and refuses one that may not (PERMISSION_DENIED)', async () => {
    const answer = await infer(stub, request('team-a/bn', shape, x), bearer(tokens.a));
    expect(answer.outputs[0]!.shape).toEqual(['2', '2']);
    for (const [method, req] of [
      ['ModelInfer', request('team-b/bn', shape, x)],
      ['ModelReady', { name: 'team-b/bn' }],
      ['ModelMetadata', { name: 'team-b/bn' }],
    ] as const) {
      expect(await rejection(rpc(stub, method, req, bearer(tokens.a))), method).toMatchObject({
        code: status.PERMISSION_DENIED,
        reason: 'BN_ERR_PERMISSION_DENIED',
        message: "token team-a may not read module 'team-b/bn'",
      });
    }
  });
});

describe('limits and the drain', () => {
  const shape = [2, 2];
  const x = Float32Array.of(1, 2, 3, 4);
  const until = async (condition: () => boolean) => {
    while (!condition()) await new Promise((r) => setTimeout(r, 1));
  };

  it('counts ModelInfer under --max-calls like any call', async () => {
    const server = await serve({ maxCalls: 1 });
    const stub = connect(server.address);
    await normserve(server.address).createModule('busy', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    let release!: () => void;
    const holder = server.running.registry.exclusive('busy', () => new Promise<void>((r) => (release = r)));
    const inflight = infer(stub, request('busy', shape, x));
    await until(() => server.running.inFlight() === 1);
    expect(await rejection(rpc(stub, 'ModelMetadata', { name: 'busy' }))).toMatchObject({
      code: status.RESOURCE_EXHAUSTED,
      reason: 'BN_ERR_TOO_MANY_CALLS',
      message: '1 calls are being handled already, the limit max_calls=1; retry later',
    });
    release();
    await holder;
    expect((await inflight).outputs[0]!.shape).toEqual(['2', '2']);
  });

  it('stays live but not ready while draining, and refuses new inference with UNAVAILABLE', async () => {
    const server = await serve();
    await normserve(server.address).createModule('drain/bn', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    // Calls whose messages wait for the gate: their streams are open before the drain begins, so
    // the server still handles them after it has stopped taking new ones.
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    const held: Interceptor = (options, nextCall) =>
      new InterceptingCall(nextCall(options), { sendMessage: (message, next) => void gate.then(() => next(message)) });
    const stub = connect(server.address);
    expect(await rpc(stub, 'ServerReady', {})).toEqual({ ready: true });
    const waiting = connect(server.address, [held]);
    await new Promise<void>((resolve, reject) => waiting.waitForReady(Date.now() + 5000, (err) => (err ? reject(err) : resolve())));
    const live = rpc(waiting, 'ServerLive', {});
    const ready = rpc(waiting, 'ServerReady', {});
    const inferred = rejection(infer(waiting, request('drain/bn', shape, x)));
    await new Promise((r) => setTimeout(r, 100));
    const stopped = server.running.shutdown(5000);
    open();
    expect(await live).toEqual({ live: true });
    expect(await ready).toEqual({ ready: false });
    expect(await inferred).toMatchObject({ code: status.UNAVAILABLE, reason: 'BN_ERR_SHUTTING_DOWN', message: 'the server is shutting down; retry on another replica' });
    await stopped;
  });
});

describe('the call log', () => {
  it('names the module of every model call, ModelInfer\'s model_name included', async () => {
    const captured = capturedLogger('info');
    const s = await serve({}, captured.logger);
    await normserve(s.address).createModule('logged/bn', { kind: 'BATCH_NORM_2D', numFeatures: 2 });
    const stub = connect(s.address);
    await infer(stub, request('logged/bn', [1, 2, 1, 1], Float32Array.of(1, 2)));
    await rpc(stub, 'ModelMetadata', { name: 'logged/bn' });
    const calls = captured.lines.filter((l) => l.msg === 'call' && String(l.method).startsWith('/inference.'));
    expect(calls.map((l) => [l.method, l.module, l.status])).toEqual([
      ['/inference.GRPCInferenceService/ModelInfer', 'logged/bn', 'OK'],
      ['/inference.GRPCInferenceService/ModelMetadata', 'logged/bn', 'OK'],
    ]);
  });
});
