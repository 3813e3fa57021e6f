/**
 * The HTTP/2 transport under grpc-js, tuned for tensors.
 *
 * HTTP/2's flow-control window is 64 KiB by default: a sender stops after 64 KiB until the
 * receiver acknowledges, so a 25 MB tensor takes about 400 round trips of the event loop. The
 * grpc-js client takes a window option (`grpc-node.flow_control_window`, grpc-node PR #2864);
 * the grpc-js 1.14 server has none (its support is grpc-node PR #3058, still open). Until a release
 * carries it, `createGrpcServer` applies the same two steps that PR does: the initial stream window
 * in the server's SETTINGS frame, and the connection window of each new session.
 */
import type { Http2Server, Http2Session, ServerOptions as Http2ServerOptions } from 'node:http2';
import { Server, type ChannelOptions, type ServerInterceptor } from '@grpc/grpc-js';

/** The window both ends advertise by default: 16 MiB per stream and per connection. */
export const DEFAULT_FLOW_CONTROL_WINDOW = 16 * 1024 * 1024;
/** HTTP/2's largest window (RFC 9113 §6.9.1). */
export const MAX_FLOW_CONTROL_WINDOW = 2 ** 31 - 1;
/** HTTP/2's own default (RFC 9113 §6.9.2). */
export const HTTP2_DEFAULT_WINDOW = 65_535;

export interface TransportOptions {
  /** Largest message received or sent, in bytes. */
  readonly maxMessageBytes: number;
  /** HTTP/2 flow-control window, in bytes; 65535 keeps HTTP/2's default. */
  readonly flowControlWindow: number;
  readonly interceptors?: ServerInterceptor[];
}

/** What grpc-js 1.14 keeps privately and this module relies on; checked at start. */
interface ServerInternals {
  commonServerOptions: Http2ServerOptions;
  createHttp2Server(credentials: unknown): Http2Server;
}

/** A grpc-js server with the message limits and, above HTTP/2's default, the larger window. */
export function createGrpcServer(options: TransportOptions): Server {
  const server = new Server({
    'grpc.max_receive_message_length': options.maxMessageBytes,
    'grpc.max_send_message_length': options.maxMessageBytes,
    interceptors: options.interceptors ?? [],
  });
  if (options.flowControlWindow > HTTP2_DEFAULT_WINDOW) raiseWindow(server, options.flowControlWindow);
  return server;
}

function raiseWindow(server: Server, window: number): void {
  const internals = server as unknown as Partial<ServerInternals>;
  const create = internals.createHttp2Server;
  if (typeof create !== 'function' || typeof internals.commonServerOptions !== 'object') {
    throw new Error(
      'this version of @grpc/grpc-js does not expose the HTTP/2 server options normserve raises; start with --flow-control-window 65535',
    );
  }
  const common = internals.commonServerOptions;
  common.settings = { ...common.settings, initialWindowSize: window };
  internals.createHttp2Server = (credentials: unknown) => {
    const http2Server = create.call(server, credentials);
    http2Server.on('session', (session: Http2Session) => {
      // The connection window is not part of SETTINGS; it is raised by a WINDOW_UPDATE.
      session.setLocalWindowSize(window);
    });
    return http2Server;
  };
}

/** Client channel options that match: unlimited message sizes and the same window. */
export function clientChannelOptions(flowControlWindow = DEFAULT_FLOW_CONTROL_WINDOW): ChannelOptions {
  return {
    'grpc.max_receive_message_length': -1,
    'grpc.max_send_message_length': -1,
    ...(flowControlWindow > HTTP2_DEFAULT_WINDOW ? { 'grpc-node.flow_control_window': flowControlWindow } : {}),
  };
}
