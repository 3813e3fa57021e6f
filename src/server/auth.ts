/**
 * Bearer-token authentication with per-token rights on module-name prefixes, so that tenants
 * cannot see or touch each other's modules. Off unless --auth-tokens-file names a file:
 *
 *   { "tokens": [
 *       { "id": "team-a-trainer",
 *         "sha256": "<hex SHA-256 of the token>",
 *         "grants": [ { "prefix": "team-a/", "access": "write" } ] } ] }
 *
 * `read` allows GetModule, ListModules (which shows only readable modules) and GetState; `write`
 * also allows everything that creates, changes or deletes a module, and the group calls. The file
 * holds hashes, never tokens. Health checks and reflection need no token.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { Metadata } from '@grpc/grpc-js';
import { z } from 'zod';
import { bnError } from '../errors.js';

export type Access = 'read' | 'write';

const TokensFile = z.object({
  tokens: z
    .array(
      z.object({
        id: z.string().min(1),
        sha256: z.string().regex(/^[0-9a-f]{64}$/, 'must be 64 lowercase hex digits (the SHA-256 of the token)'),
        grants: z.array(z.object({ prefix: z.string(), access: z.enum(['read', 'write']) })).min(1),
      }),
    )
    .min(1),
});

export interface Principal {
  readonly id: string;
  /** Whether this principal may do `access` on the module `name`. */
  can(access: Access, name: string): boolean;
}

/** Anyone, when authentication is off. */
const EVERYONE: Principal = { id: 'anonymous', can: () => true };

interface Token {
  readonly id: string;
  readonly digest: Buffer;
  readonly grants: readonly { prefix: string; access: Access }[];
}

export class Authenticator {
  readonly #tokens: Token[] | null;

  private constructor(tokens: z.infer<typeof TokensFile>['tokens'] | null) {
    this.#tokens = tokens?.map((t) => ({ id: t.id, digest: Buffer.from(t.sha256, 'hex'), grants: t.grants })) ?? null;
  }

  static disabled(): Authenticator {
    return new Authenticator(null);
  }

  /** Reads and checks a tokens file; throws with the file and the problem. */
  static fromFile(path: string): Authenticator {
    let parsed: unknown;
    try {
      parsed = JSON.parse(readFileSync(path, 'utf8'));
    } catch (err) {
      throw new Error(`cannot read the tokens file ${path}: ${(err as Error).message}`);
    }
    const result = TokensFile.safeParse(parsed);
    if (!result.success) throw new Error(`invalid tokens file ${path}: ${result.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
    return new Authenticator(result.data.tokens);
  }

  get enabled(): boolean {
    return this.#tokens !== null;
  }

  /** The caller, from its `authorization: Bearer <token>` header. */
  authenticate(metadata: Metadata): Principal {
    if (this.#tokens === null) return EVERYONE;
    const header = metadata.get('authorization')[0];
    const match = typeof header === 'string' ? /^Bearer (\S+)$/i.exec(header) : null;
    if (!match) throw bnError('BN_ERR_UNAUTHENTICATED', { why: 'no bearer token: send the header authorization: Bearer <token>' });
    const digest = createHash('sha256').update(match[1]!).digest();
    // Compare with every token, in constant time each, so that timing tells nothing.
    let found: Token | undefined;
    for (const t of this.#tokens) if (timingSafeEqual(t.digest, digest)) found = t;
    if (!found) throw bnError('BN_ERR_UNAUTHENTICATED', { why: 'the bearer token is not known' });
    const grants = found.grants;
    return {
      id: found.id,
      can: (access, name) => grants.some((g) => name.startsWith(g.prefix) && (g.access === 'write' || access === 'read')),
    };
  }
}
