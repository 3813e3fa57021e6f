#!/usr/bin/env node
/**
 * normserve-rebalance: after the replica count changed, moves every module to the replica that
 * now owns it (src/cluster/rebalance.ts; docs/scale-out.md). Prints one line per module it had
 * to move and exits 0 when all moved, 1 when some conflicted or failed, 2 on a usage error.
 *
 *   node dist/src/cli/rebalance.js --peers a:50051,b:50051,c:50051 [--from d:50051] [--dry-run]
 *        [--prefer owner|source] [--token-file F] [--tls-ca F [--tls-cert F --tls-key F]] [--deadline-ms N]
 *
 * The token may also come from NORMSERVE_TOKEN.
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { credentials } from '@grpc/grpc-js';
import { parsePeers } from '../cluster/placement.js';
import { rebalance } from '../cluster/rebalance.js';

const USAGE = `Usage: normserve-rebalance --peers host:port,... [options]
  --peers        The replicas after the change, in ordinal order (the servers' --peers).
  --from         Replicas not in --peers that still hold modules (those being scaled away).
  --dry-run      Print what would move; change nothing.
  --prefer       owner|source: which copy wins when both replicas hold different state.
  --token-file   File with a bearer token that may read and write every module (or NORMSERVE_TOKEN).
  --tls-ca       PEM CA of the servers' certificates: connect with TLS.
  --tls-cert, --tls-key   Client certificate and key, for mutual TLS.
  --deadline-ms  Deadline of each call (default 30000).`;

function usage(message: string): never {
  process.stderr.write(`normserve-rebalance: ${message}\n\n${USAGE}\n`);
  process.exit(2);
}

async function main(): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        peers: { type: 'string' },
        from: { type: 'string' },
        'dry-run': { type: 'boolean' },
        prefer: { type: 'string' },
        'token-file': { type: 'string' },
        'tls-ca': { type: 'string' },
        'tls-cert': { type: 'string' },
        'tls-key': { type: 'string' },
        'deadline-ms': { type: 'string' },
        help: { type: 'boolean' },
      },
      strict: true,
    }));
  } catch (err) {
    usage((err as Error).message);
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  let peers: string[];
  let from: string[];
  try {
    peers = parsePeers(values.peers ?? '');
    from = parsePeers(values.from ?? '');
  } catch (err) {
    usage((err as Error).message);
  }
  if (peers.length === 0) usage('--peers is required');
  const prefer = values.prefer;
  if (prefer !== undefined && prefer !== 'owner' && prefer !== 'source') usage(`--prefer must be owner or source, not ${prefer}`);
  const deadlineMs = Number(values['deadline-ms'] ?? 30_000);
  if (!Number.isInteger(deadlineMs) || deadlineMs <= 0) usage('--deadline-ms must be a positive integer');
  const token = values['token-file'] ? readFileSync(values['token-file'], 'utf8').trim() : process.env.NORMSERVE_TOKEN;
  const read = (path: string | undefined) => (path === undefined ? null : readFileSync(path));
  const tls = values['tls-ca'] !== undefined ? credentials.createSsl(read(values['tls-ca']), read(values['tls-key']), read(values['tls-cert'])) : undefined;

  let bad = 0;
  const reports = await rebalance({
    peers,
    from,
    dryRun: values['dry-run'] ?? false,
    ...(prefer && { prefer }),
    client: { deadlineMs, ...(token && { token }), ...(tls && { credentials: tls }) },
    onMove: (r) => {
      if (r.outcome === 'conflict' || r.outcome === 'failed') bad++;
      process.stdout.write(`${r.outcome}\t${r.name}\t${r.from} -> ${r.to}${r.error ? `\t${r.error}` : ''}\n`);
    },
  });
  process.stdout.write(`${reports.length} module(s) not on their owner; ${reports.length - bad} handled, ${bad} conflicted or failed\n`);
  return bad === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`normserve-rebalance: ${(err as Error).message}\n`);
    process.exit(1);
  },
);
