/**
 * The connections a client keeps to one replica, and which call goes on which.
 *
 * Two Node.js HTTP/2 ends deadlock when both have a write pending on one connection: Node stops
 * reading a session's socket while one of its writes is in progress, and with the 16 MiB windows
 * normserve opens, each end may send more than the sockets' buffers hold (docs/load.md). That
 * happens when tensors move both ways at once on one connection, which calls that overlap do (one
 * call's request going out while another's answer comes in). So a call that moves a tensor above
 * `shareBytes` gets a connection to itself for as long as it runs, and calls below it share one
 * while the tensor bytes they carry stay within `shareBytes` (HTTP/2's default window, which any
 * socket's buffers hold). A call's request and answer never move at once: the server answers a
 * tensor call, unary or streamed, after it has read all of the request. Calls whose answer alone
 * may be large (GetState) count as small: sharing only with small calls, whose requests never
 * leave the client's end with a write pending, they move bytes one way.
 *
 * Connections are opened when every open one is taken and kept for reuse; grpc-js closes the TCP
 * connection under one idle past `grpc.client_idle_timeout_ms` and opens it again on the next call.
 */

import { HTTP2_DEFAULT_WINDOW } from '../wire/transport.js';

/** Tensor bytes below which calls share a connection: HTTP/2's default window. */
export const SHARE_BYTES = HTTP2_DEFAULT_WINDOW;

interface Line<S> {
  readonly stubs: S;
  /** Calls on it now. */
  calls: number;
  /** Tensor bytes those calls carry, one way. */
  bytes: number;
}

/** A call's hold on one connection: its stubs, and `release` once the call has ended. */
export interface ConnectionLease<S> {
  readonly stubs: S;
  release(): void;
}

export class ConnectionPool<S> {
  readonly #lines: Line<S>[] = [];
  readonly #open: () => S;
  readonly #close: (stubs: S) => void;
  readonly #shareBytes: number;
  #closed = false;

  /** `open` makes the stubs of a new connection; `close` closes them. One connection is opened at once. */
  constructor(open: () => S, close: (stubs: S) => void, shareBytes = SHARE_BYTES) {
    this.#open = open;
    this.#close = close;
    this.#shareBytes = shareBytes;
    this.#lines.push({ stubs: open(), calls: 0, bytes: 0 });
  }

  /** A connection for a call that moves `bytes` of tensor each way: the first that can take it, or a new one. */
  lease(bytes: number): ConnectionLease<S> {
    // A closed pool opens nothing: the call goes to a closed channel, which grpc-js refuses.
    if (this.#closed) return { stubs: this.#lines[0]!.stubs, release: () => {} };
    const shared = bytes <= this.#shareBytes;
    let line = this.#lines.find((l) => l.calls === 0 || (shared && l.bytes + bytes <= this.#shareBytes));
    if (!line) {
      line = { stubs: this.#open(), calls: 0, bytes: 0 };
      this.#lines.push(line);
    }
    line.calls++;
    line.bytes += bytes;
    let released = false;
    const held = line;
    return {
      stubs: held.stubs,
      release: () => {
        if (released) return;
        released = true;
        held.calls--;
        held.bytes -= bytes;
      },
    };
  }

  /** Closes every connection (grpc-js lets calls that are running finish). */
  close(): void {
    this.#closed = true;
    for (const line of this.#lines) this.#close(line.stubs);
  }
}
