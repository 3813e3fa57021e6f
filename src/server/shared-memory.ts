/**
 * Shared-memory regions for co-located clients, in the spirit of Triton's system shared-memory
 * extension: a client creates a file under the directory the operator allows (--shm-dir, such as
 * the tmpfs /dev/shm), registers a byte range of it, and names offsets in it instead of sending
 * tensor bytes. Node has no mmap, so the server moves the bytes with pread and pwrite on the
 * registered file: one copy from the page cache into the backend's memory and one back, made on
 * libuv's thread pool, off the event loop.
 */
import { constants } from 'node:fs';
import { open, realpath, type FileHandle } from 'node:fs/promises';
import { isAbsolute, relative, sep } from 'node:path';
import { bnError } from '../errors.js';

export interface RegionInfo {
  readonly name: string;
  readonly path: string;
  readonly offset: number;
  readonly byteSize: number;
}

interface OpenRegion extends RegionInfo {
  readonly file: FileHandle;
  /** The principal that registered it: the only one that may use it. */
  readonly owner: string;
  /** Reads and writes in progress; an unregistered region's file closes after the last. */
  users: number;
  unregistered: boolean;
}

export interface Ref {
  readonly region: string;
  readonly offset: string | number;
}

const NAME = /^[A-Za-z0-9._\-/]{1,128}$/;

export class RegionRegistry {
  readonly #dir: string;
  readonly #max: number;
  readonly #regions = new Map<string, OpenRegion>();

  /** `dir` '' turns shared memory off. */
  constructor(dir: string, maxRegions = 1024) {
    this.#dir = dir;
    this.#max = maxRegions;
  }

  get size(): number {
    return this.#regions.size;
  }

  get enabled(): boolean {
    return this.#dir !== '';
  }

  /** The directory regions must lie under ('' when shared memory is off). */
  get dir(): string {
    return this.#dir;
  }

  async register(owner: string, name: string, path: string, offset: number, byteSize: number): Promise<RegionInfo> {
    if (!this.enabled) throw bnError('BN_ERR_SHM_DISABLED', {});
    if (!NAME.test(name)) throw bnError('BN_ERR_REGION_NAME', { name });
    if (this.#regions.has(name)) throw bnError('BN_ERR_REGION_EXISTS', { name });
    if (this.#regions.size >= this.#max) throw bnError('BN_ERR_REGION_LIMIT', { limit: this.#max });
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(byteSize) || byteSize <= 0) {
      throw bnError('BN_ERR_REGION_BOUNDS', { detail: `offset ${offset} and byte_size ${byteSize}: byte_size must be positive` });
    }
    // The real path, links resolved, must lie inside the allowed directory.
    let real: string;
    let root: string;
    try {
      root = await realpath(this.#dir);
      real = await realpath(path);
    } catch (err) {
      throw bnError('BN_ERR_REGION_PATH', { path, detail: (err as NodeJS.ErrnoException).code ?? (err as Error).message, dir: this.#dir });
    }
    const rel = relative(root, real);
    if (rel === '' || rel.startsWith('..') || isAbsolute(rel) || rel.split(sep).includes('..')) {
      throw bnError('BN_ERR_REGION_PATH', { path, detail: 'it is outside the shared-memory directory', dir: this.#dir });
    }
    // O_NOFOLLOW, and the checks on the open handle: a link swapped in after realpath is refused.
    let file: FileHandle;
    try {
      file = await open(real, constants.O_RDWR | constants.O_NOFOLLOW);
    } catch (err) {
      throw bnError('BN_ERR_REGION_PATH', { path, detail: (err as NodeJS.ErrnoException).code ?? (err as Error).message, dir: this.#dir });
    }
    const info = await file.stat();
    const refuse = async (err: Error) => {
      await file.close();
      return err;
    };
    if (!info.isFile()) throw await refuse(bnError('BN_ERR_REGION_PATH', { path, detail: 'it is not a regular file', dir: this.#dir }));
    if (offset + byteSize > info.size) {
      throw await refuse(bnError('BN_ERR_REGION_BOUNDS', { detail: `offset ${offset} + byte_size ${byteSize} is past the end of the ${info.size}-byte file` }));
    }
    if (this.#regions.has(name)) {
      // Registered meanwhile by a concurrent call.
      await file.close();
      throw bnError('BN_ERR_REGION_EXISTS', { name });
    }
    const region: OpenRegion = { name, path: real, offset, byteSize, file, owner, users: 0, unregistered: false };
    this.#regions.set(name, region);
    return strip(region);
  }

  /** Forgets the region at once; its file closes when the calls using it now have finished. */
  async unregister(owner: string, name: string): Promise<void> {
    const region = this.#get(owner, name);
    this.#regions.delete(name);
    region.unregistered = true;
    if (region.users === 0) await region.file.close();
  }

  list(owner: string): RegionInfo[] {
    return [...this.#regions.values()].filter((r) => r.owner === owner).map(strip).sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Checks that `bytes` bytes fit at `offset` in the region (before any work is done). */
  check(owner: string, ref: Ref, bytes: number, field: string): void {
    this.#locate(owner, ref, bytes, field);
  }

  /** Reads `target.byteLength` bytes at the reference into `target`. */
  async read(owner: string, ref: Ref, target: Uint8Array, field: string): Promise<void> {
    const { region, at } = this.#locate(owner, ref, target.byteLength, field);
    await this.#using(region, async () => {
      let done = 0;
      while (done < target.byteLength) {
        const { bytesRead } = await region.file.read(target, done, target.byteLength - done, at + done);
        if (bytesRead === 0) throw bnError('BN_ERR_REGION_BOUNDS', { detail: `region '${region.name}' ends early: its file was truncated` });
        done += bytesRead;
      }
    });
  }

  /** Writes `source` at the reference. */
  async write(owner: string, ref: Ref, source: Uint8Array, field: string): Promise<void> {
    const { region, at } = this.#locate(owner, ref, source.byteLength, field);
    await this.#using(region, async () => {
      let done = 0;
      while (done < source.byteLength) {
        const { bytesWritten } = await region.file.write(source, done, source.byteLength - done, at + done);
        done += bytesWritten;
      }
    });
  }

  async #using(region: OpenRegion, io: () => Promise<void>): Promise<void> {
    region.users++;
    try {
      await io();
    } finally {
      region.users--;
      if (region.unregistered && region.users === 0) await region.file.close().catch(() => undefined);
    }
  }

  async close(): Promise<void> {
    const all = [...this.#regions.values()];
    this.#regions.clear();
    for (const r of all) r.unregistered = true;
    await Promise.all(all.filter((r) => r.users === 0).map((r) => r.file.close().catch(() => undefined)));
  }

  #get(owner: string, name: string): OpenRegion {
    const region = this.#regions.get(name);
    // Another principal's region is answered as unknown: names do not leak between tenants.
    if (!region || region.owner !== owner) throw bnError('BN_ERR_REGION_UNKNOWN', { name });
    return region;
  }

  #locate(owner: string, ref: Ref, bytes: number, field: string): { region: OpenRegion; at: number } {
    if (!this.enabled) throw bnError('BN_ERR_SHM_DISABLED', {});
    const region = this.#get(owner, ref.region);
    const offset = Number(ref.offset);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + bytes > region.byteSize) {
      throw bnError('BN_ERR_REGION_BOUNDS', {
        detail: `${field}: ${bytes} bytes at offset ${ref.offset} do not fit region '${region.name}' of ${region.byteSize} bytes`,
      });
    }
    return { region, at: region.offset + offset };
  }
}

function strip({ name, path, offset, byteSize }: RegionInfo): RegionInfo {
  return { name, path, offset, byteSize };
}
