/**
 * The scale-out rule (src/cluster/placement.ts): the same owner from any language, few moves when
 * the replica count changes, an even spread, and the check each replica makes.
 */
import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { ownerIndex, parsePeers, Placement, statefulSetPeers } from '../../src/cluster/placement.js';
import { ConfigError, loadConfig } from '../../src/config.js';
import { NormserveError, Status } from '../../src/errors.js';

const names = (n: number, prefix = 'model/layer') => Array.from({ length: n }, (_, i) => `${prefix}${i}.bn`);

describe('ownerIndex', () => {
  it('matches the rule as docs/scale-out.md writes it in Python', () => {
    // The documented rule, run by another implementation: any client can place modules alike.
    const python = `
import hashlib, json, sys
def owner(name, n):
    return max(range(n), key=lambda i: (hashlib.sha256(name.encode() + b"\\0" + str(i).encode()).digest(), -i))
names = json.loads(sys.stdin.read())
print(json.dumps([[owner(name, n) for n in range(1, 8)] for name in names]))
`;
    const sample = [...names(150), 'ünïcode/模块', 'a', '_', 'x'.repeat(256)];
    const expected = JSON.parse(execFileSync('/usr/bin/python3', ['-c', python], { input: JSON.stringify(sample) }).toString()) as number[][];
    expect(sample.map((name) => [1, 2, 3, 4, 5, 6, 7].map((n) => ownerIndex(name, n)))).toEqual(expected);
  });

  it('moves only what the new replica wins when one is added, and only the leaving replica\'s when one goes', () => {
    const all = names(4000);
    for (const n of [1, 2, 3, 5]) {
      let moved = 0;
      for (const name of all) {
        const before = ownerIndex(name, n);
        const after = ownerIndex(name, n + 1);
        if (before !== after) {
          moved++;
          expect(after).toBe(n);
        }
      }
      // About 1/(n+1) of the modules move.
      expect(moved / all.length).toBeGreaterThan(0.8 / (n + 1));
      expect(moved / all.length).toBeLessThan(1.2 / (n + 1));
    }
  });

  it('spreads modules evenly', () => {
    const counts = [0, 0, 0, 0, 0];
    for (const name of names(5000)) counts[ownerIndex(name, 5)]!++;
    for (const c of counts) expect(Math.abs(c - 1000)).toBeLessThan(120);
  });

  it('refuses a replica count below 1', () => {
    expect(() => ownerIndex('a', 0)).toThrow(RangeError);
    expect(() => ownerIndex('a', 1.5)).toThrow(RangeError);
  });
});

describe('Placement', () => {
  const peers = ['h0:1', 'h1:1', 'h2:1'];
  const mine = names(200).filter((n) => ownerIndex(n, 3) === 1);
  const theirs = names(200).filter((n) => ownerIndex(n, 3) === 2);

  it('lets the owner serve and refuses others with the owner\'s address', () => {
    const held = new Set<string>();
    const p = new Placement(peers, 'h1:1', (n) => held.has(n));
    for (const n of mine) expect(() => p.check(n, 'owner')).not.toThrow();
    const err = (() => {
      try {
        p.check(theirs[0]!, 'owner');
      } catch (e) {
        return e as NormserveError;
      }
      throw new Error('not refused');
    })();
    expect(err.code).toBe('BN_ERR_NOT_OWNER');
    expect(err.status).toBe(Status.FAILED_PRECONDITION);
    expect(err.metadata).toEqual({ owner: 'h2:1', owner_index: '2', replicas: '3' });
    expect(err.message).toContain(`module '${theirs[0]}' belongs to replica 2 of 3 at h2:1, not to this one (h1:1)`);
  });

  it('serves reads of a copy it still holds, never writes', () => {
    const held = new Set([theirs[0]!]);
    const p = new Placement(peers, 'h1:1', (n) => held.has(n));
    expect(() => p.check(theirs[0]!, 'held')).not.toThrow();
    expect(() => p.check(theirs[0]!, 'owner')).toThrow(/belongs to replica 2/);
    expect(() => p.check(theirs[1]!, 'held')).toThrow(/belongs to replica 2/);
  });

  it('owns everything without peers or with one', () => {
    for (const p of [new Placement([], '', () => false), new Placement(['only:1'], 'only:1', () => false)]) {
      for (const n of theirs) expect(() => p.check(n, 'owner')).not.toThrow();
      expect(p.replicas).toBe(1);
    }
  });

  it('owns nothing outside its peers list, while it still serves reads and deletes of what it holds', () => {
    const held = new Set([mine[0]!]);
    const p = new Placement(peers, 'h3:1', (n) => held.has(n));
    expect(p.owns).toBe(false);
    expect(() => p.check(mine[0]!, 'held')).not.toThrow();
    expect(() => p.check(mine[0]!, 'owner')).toThrow(`module '${mine[0]}' belongs to replica 1 of 3 at h1:1, not to this one (a replica outside the peers list)`);
    expect(() => new Placement(['only:1'], 'other:1', () => false).check('x', 'owner')).toThrow(/belongs to replica 0 of 1 at only:1/);
  });
});

describe('peer lists', () => {
  it('parses host:port lists and refuses anything else', () => {
    expect(parsePeers('')).toEqual([]);
    expect(parsePeers('a:1, b.c:2,[::1]:3')).toEqual(['a:1', 'b.c:2', '[::1]:3']);
    expect(() => parsePeers('a')).toThrow("peer address 'a' is not host:port");
    expect(() => parsePeers('a:1,a:1')).toThrow('peer address a:1 appears twice');
    expect(() => parsePeers('a:1,')).toThrow("peer address '' is not host:port");
  });

  it('builds a StatefulSet\'s pod addresses', () => {
    expect(statefulSetPeers({ statefulSet: 'ns', service: 'ns-headless', namespace: 'ml', replicas: 2, port: 50051 })).toEqual([
      'ns-0.ns-headless.ml.svc.cluster.local:50051',
      'ns-1.ns-headless.ml.svc.cluster.local:50051',
    ]);
  });

  it('is checked with the other settings at start', () => {
    const load = (env: NodeJS.ProcessEnv) => () => loadConfig([], env);
    expect(load({ NORMSERVE_PEERS: 'a:1,b:1', NORMSERVE_SELF_ADDRESS: 'b:1' })()).toMatchObject({ peers: 'a:1,b:1', selfAddress: 'b:1' });
    // Outside the list: a replica being scaled away (it owns nothing).
    expect(load({ NORMSERVE_PEERS: 'a:1,b:1', NORMSERVE_SELF_ADDRESS: 'c:1' })()).toMatchObject({ selfAddress: 'c:1' });
    expect(load({ NORMSERVE_PEERS: 'a:1,b:1' })).toThrow(ConfigError);
    expect(load({ NORMSERVE_PEERS: 'a:1,b:1' })).toThrow("--peers needs --self-address (NORMSERVE_SELF_ADDRESS): this replica's own address, as written in --peers");
    expect(load({ NORMSERVE_SELF_ADDRESS: 'a:1' })).toThrow('--self-address is only meaningful with --peers');
    expect(load({ NORMSERVE_PEERS: 'a:1,a' })).toThrow("invalid --peers (NORMSERVE_PEERS): peer address 'a' is not host:port");
  });
});
