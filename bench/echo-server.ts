/**
 * bench/peers.ts's transport baseline, run as its own process (`node dist/bench/echo-server.js`):
 * a grpc-js server built exactly as normserve builds its own (`createGrpcServer` with the default
 * message limit and HTTP/2 window of src/config.ts) that serves one unary method,
 * normserve.bench.Echo/Echo (bench/echo.proto). It takes a normserve.v1.ForwardRequest and
 * answers a ForwardResponse whose output is the request's input tensor, the same bytes; and
 * EchoStream, which takes a ForwardStream's head and chunks and sends them back once all are in.
 *
 * So an Echo call pays everything a Forward pays on the wire (HTTP/2 framing and flow control,
 * protobuf decoding of the request and encoding of a reply of the same size, the event loop of a
 * separate process) and nothing of normserve's own work (validation, the module, the kernels,
 * durability, logging). Prints one JSON line `{"msg":"echo listening","port":N}` on stdout once it
 * listens on 127.0.0.1 (port 0 picks a free one, or pass one as the first argument); exits on
 * SIGTERM or SIGINT.
 */
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  loadPackageDefinition,
  ServerCredentials,
  type sendUnaryData,
  type ServerUnaryCall,
  type ServerDuplexStream,
  type ServiceClientConstructor,
  type UntypedServiceImplementation,
} from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { SETTINGS } from '../src/config.js';
import type { ForwardRequest__Output } from '../src/generated/normserve/v1/ForwardRequest.js';
import type { ForwardResponse } from '../src/generated/normserve/v1/ForwardResponse.js';
import type { ForwardStreamRequest__Output } from '../src/generated/normserve/v1/ForwardStreamRequest.js';
import type { ForwardStreamResponse } from '../src/generated/normserve/v1/ForwardStreamResponse.js';
import { LOADER_OPTIONS, PROTO_DIR } from '../src/wire/proto.js';
import { createGrpcServer } from '../src/wire/transport.js';

/** bench/ of the source tree, beside proto/ (tsc does not copy echo.proto into dist/). */
const BENCH_DIR = join(PROTO_DIR, '..', 'bench');

/**
 * The Echo service's client constructor (its `.service` is the server's definition), loaded with
 * normserve's own proto-loader options so that both servers decode and encode messages alike.
 */
export function loadEchoService(): ServiceClientConstructor {
  const definition = loadSync('echo.proto', { ...LOADER_OPTIONS, includeDirs: [BENCH_DIR, PROTO_DIR] });
  const root = loadPackageDefinition(definition) as unknown as { normserve: { bench: { Echo: ServiceClientConstructor } } };
  return root.normserve.bench.Echo;
}

async function main(): Promise<void> {
  const server = createGrpcServer({ maxMessageBytes: SETTINGS.maxMessageBytes.default, flowControlWindow: SETTINGS.flowControlWindow.default });
  const handlers = {
    Echo(call: ServerUnaryCall<ForwardRequest__Output, ForwardResponse>, callback: sendUnaryData<ForwardResponse>) {
      callback(null, { output: call.request.input, context_id: '' });
    },
    EchoStream(call: ServerDuplexStream<ForwardStreamRequest__Output, ForwardStreamResponse>) {
      // As ForwardStream does: the whole tensor in, then the answer out with backpressure.
      let head: ForwardStreamResponse | undefined;
      const chunks: Buffer[] = [];
      call.on('data', (m: ForwardStreamRequest__Output) => {
        if (m.part === 'head') head = { head: { output: m.head!.input, context_id: '' } };
        else chunks.push(m.chunk!);
      });
      call.on('end', () => {
        void (async () => {
          const write = (m: ForwardStreamResponse) => new Promise<void>((done) => (call.write(m) ? done() : call.once('drain', () => done())));
          await write(head!);
          for (const chunk of chunks) await write({ chunk });
          call.end();
        })();
      });
    },
  };
  server.addService(loadEchoService().service, handlers as unknown as UntypedServiceImplementation);
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(`127.0.0.1:${Number(process.argv[2] ?? 0)}`, ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound)));
  });
  process.stdout.write(`${JSON.stringify({ msg: 'echo listening', port })}\n`);
  const stop = () => server.tryShutdown(() => process.exit(0));
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

// Run as a program; imported (by bench/peers.ts, for the client), it only defines the service.
if (process.argv[1] === fileURLToPath(import.meta.url)) await main();
