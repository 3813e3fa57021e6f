/**
 * Shared memory chosen automatically: for a replica on this machine (a loopback address) whose
 * server allows regions under `dir` (its --shm-dir), tensors above a size travel through files
 * there instead of the wire. Each call leases a region (a file holding its input, then its
 * answer, registered with the replica once and reused); a replica that refuses regions is
 * remembered and served over the wire from then on.
 */
import { join } from 'node:path';
import { SharedMemoryFile } from './shared-memory.js';
import type { RegionUse } from './client.js';

export interface AutoSharedMemory {
  /** The server's --shm-dir (e.g. /dev/shm), as this client sees it. */
  dir: string;
  /** Tensors above this many bytes use a region (default 1 MiB). */
  aboveBytes?: number;
}

/** What the pool needs from the client: registration with one particular replica. */
export interface RegionCalls {
  register(address: string, name: string, path: string, byteSize: number): Promise<unknown>;
  unregister(address: string, name: string): Promise<unknown>;
}

interface Region {
  name: string;
  file: SharedMemoryFile;
}

const LOOPBACK = /^(localhost|127(\.\d{1,3}){3}|\[::1\]|unix:.*)(:\d+)?$/;

let instances = 0;

export class RegionPool {
  readonly #free = new Map<string, Region[]>();
  readonly #all = new Map<string, Region[]>();
  /** Replicas that refused a region: served over the wire from then on. */
  readonly #refused = new Set<string>();
  readonly #prefix = `auto-${process.pid}-${instances++}`;
  #made = 0;

  constructor(
    readonly options: Required<AutoSharedMemory>,
    private readonly calls: RegionCalls,
  ) {}

  /** Whether a tensor of `bytes` to `address` goes through shared memory. */
  wants(address: string, bytes: number): boolean {
    return bytes > this.options.aboveBytes && LOOPBACK.test(address) && !this.#refused.has(address);
  }

  /**
   * A region of at least 2 × `bytes` (input, then answer) registered with `address`, and its
   * release; null when the replica refuses regions (remembered).
   */
  async lease(address: string, bytes: number): Promise<{ use: Omit<RegionUse, 'into'>; release(): void } | null> {
    const free = this.#free.get(address) ?? [];
    let region = free.find((r) => r.file.byteSize >= 2 * bytes);
    if (region) free.splice(free.indexOf(region), 1);
    else {
      region = (await this.#make(address, 2 * bytes)) ?? undefined;
      if (!region) return null;
    }
    const leased = region;
    return {
      use: { name: leased.name, file: leased.file, inputOffset: 0, outputOffset: bytes },
      release: () => {
        const list = this.#free.get(address) ?? [];
        list.push(leased);
        this.#free.set(address, list);
      },
    };
  }

  async #make(address: string, byteSize: number): Promise<Region | null> {
    const name = `${this.#prefix}-${this.#made++}`;
    const path = join(this.options.dir, `normserve-${name}`);
    const file = SharedMemoryFile.create(path, byteSize);
    try {
      await this.calls.register(address, name, path, byteSize);
    } catch {
      file.close(true);
      this.#refused.add(address);
      return null;
    }
    const region = { name, file };
    this.#all.set(address, [...(this.#all.get(address) ?? []), region]);
    return region;
  }

  /** Unregisters every region and removes its file. */
  async close(): Promise<void> {
    const all = [...this.#all.entries()];
    this.#all.clear();
    this.#free.clear();
    await Promise.allSettled(all.flatMap(([address, regions]) => regions.map((r) => this.calls.unregister(address, r.name))));
    for (const [, regions] of all) for (const r of regions) r.file.close(true);
  }
}
