/**
 * The client's side of a shared-memory region: a file under a directory the server allows
 * (typically the tmpfs /dev/shm), sized once, into which tensors are written and from which
 * answers are read, by offset. Register it with `NormserveClient.registerRegion`.
 */
import { closeSync, ftruncateSync, openSync, readSync, unlinkSync, writeSync } from 'node:fs';

export class SharedMemoryFile {
  readonly #fd: number;
  #closed = false;

  private constructor(
    readonly path: string,
    readonly byteSize: number,
    fd: number,
  ) {
    this.#fd = fd;
  }

  /** Creates (or truncates) the file at `path` with `byteSize` bytes. */
  static create(path: string, byteSize: number): SharedMemoryFile {
    const fd = openSync(path, 'w+', 0o600);
    ftruncateSync(fd, byteSize);
    return new SharedMemoryFile(path, byteSize, fd);
  }

  /** Writes the tensor's bytes at `offset`. */
  write(offset: number, data: Float32Array): void {
    this.#bounds(offset, data.byteLength);
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    for (let done = 0; done < bytes.length; ) done += writeSync(this.#fd, bytes, done, bytes.length - done, offset + done);
  }

  /** Reads `count` float32 values at `offset`, into `into` when it has exactly that many. */
  read(offset: number, count: number, into?: Float32Array): Float32Array {
    this.#bounds(offset, count * 4);
    if (into && into.length !== count) throw new Error(`normserve client: the answer has ${count} values, the array given for it ${into.length}`);
    const out = into ?? new Float32Array(count);
    const bytes = new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
    for (let done = 0; done < bytes.length; ) {
      const n = readSync(this.#fd, bytes, done, bytes.length - done, offset + done);
      if (n === 0) throw new Error(`normserve client: ${this.path} ends before byte ${offset + bytes.length}`);
      done += n;
    }
    return out;
  }

  /** Closes the file; with `unlink`, removes it too. */
  close(unlink = false): void {
    if (this.#closed) return;
    this.#closed = true;
    closeSync(this.#fd);
    if (unlink) unlinkSync(this.path);
  }

  #bounds(offset: number, bytes: number): void {
    if (this.#closed) throw new Error(`normserve client: ${this.path} is closed`);
    if (offset < 0 || offset + bytes > this.byteSize) throw new Error(`normserve client: ${bytes} bytes at ${offset} do not fit ${this.path} (${this.byteSize} bytes)`);
  }
}
