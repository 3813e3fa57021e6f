/** A Store that keeps everything in memory, for unit tests of the layers above the store. */
import { pino } from 'pino';
import { Persistence } from '../../src/store/persistence.js';
import type { Changes, Store, Stored } from '../../src/store/store.js';

export class MemoryStore implements Store {
  readonly location = 'memory';
  readonly writes: Changes[] = [];
  failNext = false;

  load(): Stored {
    return { modules: [], steps: [] };
  }

  async write(changes: Changes): Promise<void> {
    if (this.failNext) {
      this.failNext = false;
      throw new Error('disk full');
    }
    this.writes.push(changes);
  }

  async close(): Promise<void> {}
}

export function memoryPersistence(store = new MemoryStore()): Persistence {
  return new Persistence(store, { durability: 'strict', checkpointMs: 1000, logger: pino({ level: 'silent' }) });
}
