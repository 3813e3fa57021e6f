/**
 * Shared-memory regions through a real server: Forward and Backward through a file under the
 * allowed directory give the results of the wire; bounds, paths, owners and the off switch are
 * enforced, and a refused call changes nothing.
 */
import { mkdirSync, mkdtempSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import { SharedMemoryFile } from '../../src/client/shared-memory.js';
import type { Config } from '../../src/config.js';
import { Status } from '../../src/errors.js';
import { channelData } from '../support/data.js';
import { rejection } from '../support/rejection.js';
import { startTestServer, type TestServer } from '../support/server.js';

const servers: TestServer[] = [];
const clients: NormserveClient[] = [];
const files: SharedMemoryFile[] = [];

async function start(overrides: Partial<Config> = {}) {
  const server = await startTestServer(overrides);
  servers.push(server);
  const client = new NormserveClient(server.address);
  clients.push(client);
  await client.createModule('bn', { kind: 'BATCH_NORM_2D', numFeatures: 8 });
  return { server, client };
}

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const f of files.splice(0)) f.close();
  await Promise.all(servers.splice(0).map((s) => s.stop()));
});

const SHAPE = [4, 8, 32, 32];
const BYTES = 4 * 8 * 32 * 32 * 4;
const input = (seed = 1) => ({ shape: SHAPE, data: channelData(4, 8, 1024, 2, 3, seed) });

function shmDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'normserve-shm-'));
  mkdirSync(join(dir, 'sub'));
  return dir;
}

describe('shared-memory regions', () => {
  it('carry Forward and Backward with the results of the wire', async () => {
    const dir = shmDir();
    const viaShm = await start({ shmDir: dir });
    const viaWire = await start();
    const file = SharedMemoryFile.create(join(dir, 'sub', 'r0'), 3 * BYTES + 100);
    files.push(file);
    const info = await viaShm.client.registerRegion('r0', file.path, 2 * BYTES + 64, 100);
    expect(info).toMatchObject({ name: 'r0', offset: 100, byteSize: 2 * BYTES + 64 });
    expect((await viaShm.client.listRegions()).map((r) => r.name)).toEqual(['r0']);

    const region = { name: 'r0', file, fileOffset: 100, inputOffset: 0, outputOffset: BYTES + 64 };
    const a = await viaShm.client.forward('bn', input(), { saveForBackward: true, region });
    const b = await viaWire.client.forward('bn', input(), { saveForBackward: true });
    expect(a.shape).toEqual(SHAPE);
    expect(Buffer.from(a.data.buffer).equals(Buffer.from(b.data.buffer))).toBe(true);
    // The answer went to the file, at the place named (the region starts 100 bytes in).
    expect(Buffer.from(file.read(100 + BYTES + 64, 8).buffer).equals(Buffer.from(b.data.buffer, 0, 32))).toBe(true);

    const into = new Float32Array(SHAPE.reduce((p, d) => p * d, 1));
    const ga = await viaShm.client.backward('bn', a.contextId, input(5), { region: { ...region, into } });
    expect(ga.gradInput.data).toBe(into);
    const gb = await viaWire.client.backward('bn', b.contextId, input(5));
    expect(Buffer.from(ga.gradInput.data.buffer).equals(Buffer.from(gb.gradInput.data.buffer))).toBe(true);
    expect(Array.from(ga.gradWeight!)).toEqual(Array.from(gb.gradWeight!));
    expect(await viaShm.client.getState('bn')).toEqual(await viaWire.client.getState('bn'));

    await viaShm.client.unregisterRegion('r0');
    expect(await viaShm.client.listRegions()).toEqual([]);
    const gone = await rejection(viaShm.client.forward('bn', input(), { region }));
    expect(gone.code).toBe(Status.NOT_FOUND);
  });

  it('refuses offsets out of bounds before any work, and changes nothing', async () => {
    const dir = shmDir();
    const { client } = await start({ shmDir: dir });
    const file = SharedMemoryFile.create(join(dir, 'r1'), 2 * BYTES);
    files.push(file);
    await client.registerRegion('r1', file.path, 2 * BYTES);
    for (const [inputOffset, outputOffset] of [
      [BYTES + 4, 0],
      [0, BYTES + 4],
    ] as const) {
      file.write(0, input().data);
      const err = await rejection(client.forward('bn', input(), { region: { name: 'r1', file: { write: () => undefined, read: () => new Float32Array(0) } as unknown as SharedMemoryFile, inputOffset, outputOffset } }));
      expect(err.code).toBe(Status.INVALID_ARGUMENT);
      expect(err.reason).toBe('BN_ERR_REGION_BOUNDS');
      expect(err.message).toMatch(/do not fit region 'r1'/);
    }
    expect((await client.getModule('bn')).numBatchesTracked).toBe(0n);
  });

  it('registers only regular files inside the allowed directory, within the file, under unique names', async () => {
    const dir = shmDir();
    const { client } = await start({ shmDir: dir });
    const outside = join(mkdtempSync(join(tmpdir(), 'normserve-other-')), 'f');
    writeFileSync(outside, Buffer.alloc(1024));
    symlinkSync(outside, join(dir, 'link'));
    writeFileSync(join(dir, 'ok'), Buffer.alloc(1024));
    const cases: [string, string, number, number, number, RegExp][] = [
      ['a file outside', outside, 0, 16, Status.INVALID_ARGUMENT, /outside the shared-memory directory/],
      ['a link to outside', join(dir, 'link'), 0, 16, Status.INVALID_ARGUMENT, /outside the shared-memory directory/],
      ['../ out of it', join(dir, 'sub', '..', '..', 'x'), 0, 16, Status.INVALID_ARGUMENT, /ENOENT|outside/],
      ['the directory itself', dir, 0, 16, Status.INVALID_ARGUMENT, /outside|regular file/],
      ['a missing file', join(dir, 'missing'), 0, 16, Status.INVALID_ARGUMENT, /ENOENT/],
      ['past the end', join(dir, 'ok'), 1000, 100, Status.INVALID_ARGUMENT, /past the end of the 1024-byte file/],
    ];
    for (const [what, path, offset, size, code, pattern] of cases) {
      const err = await rejection(client.registerRegion('r', path, size, offset));
      expect(err.code, what).toBe(code);
      expect(err.message, what).toMatch(pattern);
    }
    await client.registerRegion('r', join(dir, 'ok'), 1024);
    expect((await rejection(client.registerRegion('r', join(dir, 'ok'), 1024))).code).toBe(Status.ALREADY_EXISTS);
    expect((await rejection(client.registerRegion('bad name!', join(dir, 'ok'), 1024))).code).toBe(Status.INVALID_ARGUMENT);
  });

  it('is off unless the operator names a directory', async () => {
    const { client } = await start();
    const err = await rejection(client.registerRegion('r', '/dev/shm/x', 16));
    expect(err.code).toBe(Status.FAILED_PRECONDITION);
    expect(err.message).toContain('--shm-dir');
  });
});
