/**
 * TLS, mutual TLS and bearer tokens with per-prefix rights, through real servers. The test makes
 * its own certificate authorities and certificates with openssl, and its own tokens.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { credentials } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import { Status } from '../../src/errors.js';
import { startTestServer, type TestServer } from '../support/server.js';

const dir = mkdtempSync(join(tmpdir(), 'normserve-tls-'));
const path = (name: string) => join(dir, name);
const openssl = (...args: string[]) => execFileSync('openssl', args, { stdio: 'pipe' });

/** A CA, and a certificate it signs for `cn` (with localhost and 127.0.0.1 as names). */
function makeCa(name: string) {
  openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', `/CN=${name}`, '-keyout', path(`${name}.key`), '-out', path(`${name}.pem`));
}
function makeCert(ca: string, name: string) {
  writeFileSync(path(`${name}.ext`), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n');
  openssl('req', '-newkey', 'rsa:2048', '-nodes', '-subj', `/CN=${name}`, '-keyout', path(`${name}.key`), '-out', path(`${name}.csr`));
  openssl('x509', '-req', '-in', path(`${name}.csr`), '-CA', path(`${ca}.pem`), '-CAkey', path(`${ca}.key`), '-CAcreateserial', '-days', '2', '-extfile', path(`${name}.ext`), '-out', path(`${name}.pem`));
}
const pem = (name: string) => readFileSync(path(name));

beforeAll(() => {
  makeCa('ca');
  makeCa('other-ca');
  makeCert('ca', 'server');
  makeCert('ca', 'client');
  makeCert('other-ca', 'stranger');
});

const servers: TestServer[] = [];
const clients: NormserveClient[] = [];
afterAll(async () => {
  for (const c of clients) c.close();
  for (const s of servers) await s.stop();
});

async function serve(overrides: Parameters<typeof startTestServer>[0]) {
  const s = await startTestServer(overrides);
  servers.push(s);
  // TLS names the server "localhost": connect by that name.
  return s.address.replace('127.0.0.1', 'localhost');
}

function connect(address: string, options: ConstructorParameters<typeof NormserveClient>[1] = {}) {
  const c = new NormserveClient(address, { deadlineMs: 5000, ...options });
  clients.push(c);
  return c;
}

describe('TLS', () => {
  it('serves clients that trust its CA, and not plaintext clients', async () => {
    const address = await serve({ tlsCert: path('server.pem'), tlsKey: path('server.key') });
    const secure = connect(address, { credentials: credentials.createSsl(pem('ca.pem')) });
    expect(await secure.health()).toBe('SERVING');
    await secure.createModule('tls/m', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    await expect(connect(address).getModule('tls/m')).rejects.toMatchObject({ code: Status.UNAVAILABLE });
    await expect(connect(address, { credentials: credentials.createSsl(pem('other-ca.pem')) }).getModule('tls/m')).rejects.toMatchObject({
      code: Status.UNAVAILABLE,
    });
  });

  it('with a client CA, serves only clients with a certificate it signed (mutual TLS)', async () => {
    const address = await serve({ tlsCert: path('server.pem'), tlsKey: path('server.key'), tlsClientCa: path('ca.pem') });
    const withCert = connect(address, { credentials: credentials.createSsl(pem('ca.pem'), pem('client.key'), pem('client.pem')) });
    expect(await withCert.health()).toBe('SERVING');
    await expect(connect(address, { credentials: credentials.createSsl(pem('ca.pem')) }).health()).rejects.toMatchObject({ code: Status.UNAVAILABLE });
    const stranger = connect(address, { credentials: credentials.createSsl(pem('ca.pem'), pem('stranger.key'), pem('stranger.pem')) });
    await expect(stranger.health()).rejects.toMatchObject({ code: Status.UNAVAILABLE });
  });
});

describe('bearer tokens', () => {
  const tokens = { a: 'token-of-team-a', b: 'token-of-team-b', admin: 'token-of-operators' };
  const sha = (t: string) => createHash('sha256').update(t).digest('hex');
  let address: string;

  beforeAll(async () => {
    writeFileSync(
      path('tokens.json'),
      JSON.stringify({
        tokens: [
          { id: 'team-a', sha256: sha(tokens.a), grants: [{ prefix: 'team-a/', access: 'write' }] },
          { id: 'team-b', sha256: sha(tokens.b), grants: [{ prefix: 'team-b/', access: 'read' }, { prefix: 'shared/', access: 'write' }] },
          { id: 'operators', sha256: sha(tokens.admin), grants: [{ prefix: '', access: 'write' }] },
        ],
      }),
    );
    address = (await serve({ authTokensFile: path('tokens.json') })).replace('localhost', '127.0.0.1');
    const admin = connect(address, { token: tokens.admin });
    for (const name of ['team-a/bn', 'team-b/bn', 'shared/bn']) await admin.createModule(name, { kind: 'BATCH_NORM_1D', numFeatures: 2 });
  });

  it('refuses calls without a known token (UNAUTHENTICATED), but not health checks', async () => {
    await expect(connect(address).getModule('team-a/bn')).rejects.toMatchObject({
      code: Status.UNAUTHENTICATED,
      message: 'no bearer token: send the header authorization: Bearer <token>',
    });
    await expect(connect(address, { token: 'guess' }).getModule('team-a/bn')).rejects.toMatchObject({
      code: Status.UNAUTHENTICATED,
      message: 'the bearer token is not known',
    });
    expect(await connect(address).health()).toBe('SERVING');
  });

  it("keeps tenants out of each other's modules (PERMISSION_DENIED), before anything else is checked", async () => {
    const a = connect(address, { token: tokens.a });
    await a.forward('team-a/bn', { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) });
    await a.createModule('team-a/new', { kind: 'BATCH_NORM_2D', numFeatures: 1 });
    await expect(a.getModule('team-b/bn')).rejects.toMatchObject({
      code: Status.PERMISSION_DENIED,
      message: "token team-a may not read module 'team-b/bn'",
    });
    await expect(a.createModule('team-b/evil', { kind: 'BATCH_NORM_1D', numFeatures: 1 })).rejects.toMatchObject({ code: Status.PERMISSION_DENIED });
    await expect(a.deleteModule('no-such/module')).rejects.toMatchObject({ code: Status.PERMISSION_DENIED });
    await expect(a.gatherStats('team-b/bn', { step: 0, rank: 0, worldSize: 1 }, { count: 2, mean: [0, 0], var: [1, 1] })).rejects.toMatchObject({
      code: Status.PERMISSION_DENIED,
    });
  });

  it('gives read grants reads only, and lists only what a token may read', async () => {
    const b = connect(address, { token: tokens.b });
    expect((await b.getState('team-b/bn')).num_batches_tracked).toBe(0n);
    await expect(b.forward('team-b/bn', { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) })).rejects.toMatchObject({
      code: Status.PERMISSION_DENIED,
      message: "token team-b may not write module 'team-b/bn'",
    });
    await b.forward('shared/bn', { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) });
    // Streams check the module their head names.
    await expect(b.forward('team-b/bn', { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) }, { transport: 'stream' })).rejects.toMatchObject({
      code: Status.PERMISSION_DENIED,
      message: "token team-b may not write module 'team-b/bn'",
    });
    await b.forward('shared/bn', { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) }, { transport: 'stream' });
    await expect(connect(address).forward('shared/bn', { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) }, { transport: 'stream' })).rejects.toMatchObject({
      code: Status.UNAUTHENTICATED,
    });
    expect((await b.listModules()).modules.map((m) => m.name)).toEqual(['shared/bn', 'team-b/bn']);
    expect((await connect(address, { token: tokens.a }).listModules()).modules.map((m) => m.name)).toEqual(['team-a/bn', 'team-a/new']);
  });
});
