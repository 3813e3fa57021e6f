/**
 * Moving modules to their owners after the replica count changed: each replica's modules that
 * another replica now owns are copied there through the public API (configuration, training
 * flag, buffers set to None, then the state_dict), checked to be bit-equal on arrival, and only
 * then deleted where they were. Safe to run again after a crash at any point: a module found on
 * both replicas with equal state was copied already and only its old copy goes; with different
 * state it is reported and left alone, unless `prefer` says which copy wins.
 *
 * What is not moved: forwards saved for a backward (their backward fails with
 * BN_ERR_CONTEXT_NOT_FOUND on the new owner) and the results of finished SyncBatchNorm steps kept
 * for retries. Resize between training steps (docs/scale-out.md).
 */
import type { ClientOptions, ModuleInfo, StateDict } from '../client/client.js';
import { NormserveClient, NormserveClientError, specOf } from '../client/client.js';
import { ownerIndex } from './placement.js';

export interface RebalanceOptions {
  /** The replicas' addresses after the change, in ordinal order (the servers' --peers). */
  peers: readonly string[];
  /** Replicas that are leaving (scale-down) or otherwise not in `peers` and still hold modules. */
  from?: readonly string[];
  /** Report what would move, change nothing. */
  dryRun?: boolean;
  /** When a module is on both replicas with different state: keep the owner's or the old holder's copy. Default: neither, report it. */
  prefer?: 'owner' | 'source';
  /** Credentials, token and deadline for the calls (the token needs read and write on every module). */
  client?: Omit<ClientOptions, 'peers' | 'followOwner'>;
  /** Called once per module that is not where it belongs, with what was done. */
  onMove?: (report: MoveReport) => void;
}

export interface MoveReport {
  name: string;
  from: string;
  to: string;
  /**
   * moved: copied and the old copy deleted. already-there: the owner had an equal copy; the old
   * one was deleted. conflict: both had different state, nothing changed. replaced: per `prefer`,
   * one copy won. planned: --dry-run. failed: see `error`; nothing was deleted.
   */
  outcome: 'moved' | 'already-there' | 'conflict' | 'replaced' | 'planned' | 'failed';
  error?: string;
}

/** Moves every module to its owner; resolves to the reports (also given to `onMove`). */
export async function rebalance(options: RebalanceOptions): Promise<MoveReport[]> {
  const { peers } = options;
  if (peers.length === 0) throw new Error('rebalance needs the peers list (the servers\' --peers)');
  const clients = new Map<string, NormserveClient>();
  const client = (address: string) => {
    let c = clients.get(address);
    if (!c) clients.set(address, (c = new NormserveClient(address, { ...options.client, followOwner: false })));
    return c;
  };
  const reports: MoveReport[] = [];
  try {
    for (const source of [...new Set([...peers, ...(options.from ?? [])])]) {
      for (const info of await listAll(client(source))) {
        const owner = peers[ownerIndex(info.name, peers.length)]!;
        if (owner === source) continue;
        const report = await move(info.name, client(source), client(owner), { from: source, to: owner }, options);
        reports.push(report);
        options.onMove?.(report);
      }
    }
  } finally {
    for (const c of clients.values()) c.close();
  }
  return reports;
}

async function listAll(client: NormserveClient): Promise<ModuleInfo[]> {
  const all: ModuleInfo[] = [];
  let token = '';
  do {
    const page = await client.listModules(1000, token);
    all.push(...page.modules);
    token = page.nextPageToken;
  } while (token !== '');
  return all;
}

interface Copy {
  info: ModuleInfo;
  state: StateDict;
}

async function read(client: NormserveClient, name: string): Promise<Copy | null> {
  try {
    return { info: await client.getModule(name), state: await client.getState(name) };
  } catch (err) {
    if (err instanceof NormserveClientError && err.reason === 'BN_ERR_MODULE_NOT_FOUND') return null;
    throw err;
  }
}

async function move(
  name: string,
  source: NormserveClient,
  target: NormserveClient,
  where: { from: string; to: string },
  options: RebalanceOptions,
): Promise<MoveReport> {
  const report = (outcome: MoveReport['outcome'], error?: string): MoveReport => ({ name, ...where, outcome, ...(error && { error }) });
  try {
    const copy = await read(source, name);
    if (copy === null) return report('failed', `module '${name}' vanished from ${where.from} while listed`);
    const existing = await read(target, name);
    if (options.dryRun) return report(existing === null ? 'planned' : sameCopy(existing, copy) ? 'planned' : 'conflict');
    if (existing !== null) {
      if (sameCopy(existing, copy)) {
        await source.deleteModule(name);
        return report('already-there');
      }
      if (options.prefer === undefined) return report('conflict', `${where.to} has a different copy; rerun with --prefer owner or --prefer source`);
      if (options.prefer === 'owner') {
        await source.deleteModule(name);
        return report('replaced');
      }
      await target.deleteModule(name);
    }
    await write(target, name, copy);
    const arrived = await read(target, name);
    if (arrived === null || !sameCopy(arrived, copy)) return report('failed', `the copy on ${where.to} does not match the original; the original was kept`);
    await source.deleteModule(name);
    return report(existing === null ? 'moved' : 'replaced');
  } catch (err) {
    return report('failed', (err as Error).message);
  }
}

/** Recreates a module from what GetModule and GetState tell about it. */
async function write(client: NormserveClient, name: string, { info, state }: Copy): Promise<void> {
  await client.createModule(name, specOf(info));
  const cleared = [
    ...(info.hasRunningMean ? [] : (['running_mean'] as const)),
    ...(info.hasRunningVar ? [] : (['running_var'] as const)),
    ...(info.numBatchesTracked === null ? (['num_batches_tracked'] as const) : []),
  ];
  await client.updateModule(name, { training: info.training, trackRunningStats: info.trackRunningStats, clearBuffers: [...cleared] });
  await client.loadState(name, state, { strict: true });
}

function sameCopy(a: Copy, b: Copy): boolean {
  return JSON.stringify(describe(a.info)) === JSON.stringify(describe(b.info)) && sameState(a.state, b.state);
}

const describe = (info: ModuleInfo) => ({ ...info, numBatchesTracked: info.numBatchesTracked?.toString() ?? null });

function sameState(a: StateDict, b: StateDict): boolean {
  const keys = new Set([...Object.keys(a), ...Object.keys(b)]) as Set<keyof StateDict>;
  for (const key of keys) {
    const x = a[key];
    const y = b[key];
    if (x === undefined || y === undefined) return false;
    if (typeof x === 'bigint' || typeof y === 'bigint') {
      if (x !== y) return false;
      continue;
    }
    if (x.length !== y.length) return false;
    const bx = new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
    const by = new Uint8Array(y.buffer, y.byteOffset, y.byteLength);
    if (!Buffer.from(bx).equals(by)) return false;
  }
  return true;
}
