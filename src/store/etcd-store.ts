/**
 * The shared store: modules and group steps in etcd (v3 API, through the etcd3 client), under the
 * cluster's key prefix (one etcd3 namespace):
 *
 *   meta                                    {"format":1,"slots":256}
 *   members/<member>                        {"address":"host:port"}, on the member's lease
 *   slots/<slot>                            the owning member, on its lease (etcd-cluster.ts)
 *   modules/<slot>/<name>                   a module's state (JSON; tensors as base64 float32)
 *   steps/<slot>/<name>/<phase>/<step>      a completed group step
 *
 * with <slot> as three digits, <step> as twenty, and <name> %-encoded (encodeURIComponent), so
 * that no name is a prefix of another's keys.
 *
 * Every write is one transaction that compares, for each slot it touches, the mod revision of the
 * slot's key with the one this replica holds as its fence (set when it took the slot), and for
 * each module, the module key's mod revision with the one this replica last wrote or read. A
 * replica that has lost a slot can therefore never write it, and nothing is acknowledged before
 * etcd has committed it. Writes that arrive while a transaction is in flight go out together in
 * the next one (group commit).
 *
 * A transaction whose answer is lost leaves its outcome unknown. The store then settles it: it
 * puts the slot's key again under the old fence (so that the lost transaction, should it still
 * arrive, fails its compare), and reads back the modules it touched. Until that is done the slot's
 * writes are refused unchanged.
 */
import type { Etcd3, IOperation, Namespace } from 'etcd3';
import type { Logger } from 'pino';
import { bnError } from '../errors.js';
import type { ModuleSnapshot } from '../nn/batch-norm.js';
import type { ModuleConfig } from '../nn/config.js';
import { slotOf, SLOTS } from '../cluster/slots.js';
import { floatBytes, floatsOf, StoreRefusal, StoreUncertain, type Changes, type StepRecord, type Store, type Stored } from './store.js';

export const FORMAT = 1;
/** Most operations in one transaction (etcd's --max-txn-ops defaults to 128). */
const MAX_TXN_OPS = 96;

const pad = (n: number | bigint, width: number) => String(n).padStart(width, '0');
export const keys = {
  meta: 'meta',
  members: 'members/',
  member: (id: string) => `members/${id}`,
  slots: 'slots/',
  slot: (slot: number) => `slots/${pad(slot, 3)}`,
  slotFromKey: (key: string) => Number(key.slice('slots/'.length)),
  modules: 'modules/',
  modulesOf: (slot: number) => `modules/${pad(slot, 3)}/`,
  module: (name: string) => `modules/${pad(slotOf(name), 3)}/${encodeURIComponent(name)}`,
  nameFromModuleKey: (key: string) => decodeURIComponent(key.slice('modules/000/'.length)),
  stepsOf: (slot: number) => `steps/${pad(slot, 3)}/`,
  stepsOfModule: (name: string) => `steps/${pad(slotOf(name), 3)}/${encodeURIComponent(name)}/`,
  step: (name: string, phase: string, step: bigint) => `${keys.stepsOfModule(name)}${phase}/${pad(step, 20)}`,
};

// Values.

const f32 = (a: Float32Array | null) => floatBytes(a)?.toString('base64') ?? null;
const fromF32 = (text: string | null) => floatsOf(text === null ? null : Buffer.from(text, 'base64'));

interface ModuleValue {
  config: ModuleConfig;
  training: boolean;
  trackRunningStats: boolean;
  eps: number;
  momentum: number | null;
  weight: string | null;
  bias: string | null;
  runningMean: string | null;
  runningVar: string | null;
  numBatchesTracked: string | null;
}

export function encodeModule(s: ModuleSnapshot): string {
  const value: ModuleValue = {
    config: s.config,
    training: s.training,
    trackRunningStats: s.trackRunningStats,
    eps: s.eps,
    momentum: s.momentum,
    weight: f32(s.weight),
    bias: f32(s.bias),
    runningMean: f32(s.runningMean),
    runningVar: f32(s.runningVar),
    numBatchesTracked: s.numBatchesTracked === null ? null : String(s.numBatchesTracked),
  };
  return JSON.stringify(value);
}

export function decodeModule(text: string): ModuleSnapshot {
  const v = JSON.parse(text) as ModuleValue;
  return {
    config: v.config,
    training: v.training,
    trackRunningStats: v.trackRunningStats,
    eps: v.eps,
    momentum: v.momentum,
    weight: fromF32(v.weight),
    bias: fromF32(v.bias),
    runningMean: fromF32(v.runningMean),
    runningVar: fromF32(v.runningVar),
    numBatchesTracked: v.numBatchesTracked === null ? null : BigInt(v.numBatchesTracked),
  };
}

const encodeStep = (r: StepRecord) => JSON.stringify({ keys: Object.fromEntries(r.keys), result: r.result });

function decodeStep(key: string, text: string): StepRecord {
  const [, , encoded, phase, step] = key.split('/');
  const v = JSON.parse(text) as { keys: Record<string, string>; result: string };
  return {
    module: decodeURIComponent(encoded!),
    phase: phase as StepRecord['phase'],
    step: BigInt(step!),
    keys: new Map(Object.entries(v.keys).map(([k, id]) => [Number(k), id])),
    result: v.result,
  };
}

// Errors.

/** grpc-js's words for a call that never left: the channel had no connection. */
const NOT_SENT = /No connection established/;

function isTransport(err: unknown): boolean {
  return err instanceof Error && /^GRPC\w*(Unavailable|DeadlineExceeded|Cancelled|Unknown|Internal)Error$/.test(err.constructor.name);
}

export interface EtcdStoreOptions {
  readonly endpoints: string;
  readonly keepSteps: number;
  readonly logger: Logger;
  /** The member and lease that own this replica's slots (for the fence). */
  readonly owner: () => { member: string; lease: string };
  /** A slot's fence failed: another replica owns it now, or this one must reload it. */
  readonly onFenced: (slot: number) => void;
  /** How long a write waits for the outcome of a transaction whose answer was lost. */
  readonly settleWaitMs?: number;
}

interface Pending {
  readonly changes: Changes;
  readonly slots: ReadonlySet<number>;
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
  /** Sent on its own (after a batch it was in failed its compares). */
  readonly alone: boolean;
}

export class EtcdStore implements Store {
  readonly location: string;
  readonly #ns: Namespace;
  readonly #opts: EtcdStoreOptions;
  /** Per slot this replica holds: the mod revision of its slot key, compared by every write. */
  readonly #fences = new Map<number, string>();
  /** Per slot being settled after a lost answer: done when the fence is renewed. */
  readonly #settling = new Map<number, Promise<void>>();
  /** Per module of a held slot: its key's mod revision as last written or read ('0': none). */
  readonly #revisions = new Map<string, string>();
  /** Per module and phase: the steps stored, oldest first, for trimming. */
  readonly #steps = new Map<string, bigint[]>();
  #queue: Pending[] = [];
  #inFlight = false;
  #closed = false;

  constructor(client: Etcd3, namespace: string, opts: EtcdStoreOptions) {
    this.location = `etcd ${opts.endpoints} ${namespace}`;
    this.#ns = client.namespace(namespace);
    this.#opts = opts;
  }

  get namespace(): Namespace {
    return this.#ns;
  }

  // Slots.

  /**
   * Takes a slot this replica's member now owns (its key put at `fence`) and reads its modules
   * and steps, all as of one revision.
   */
  async openSlot(slot: number, fence: string): Promise<Stored> {
    const [modules, steps] = await Promise.all([
      this.#ns.getAll().prefix(keys.modulesOf(slot)).exec(),
      this.#ns.getAll().prefix(keys.stepsOf(slot)).exec(),
    ]);
    const stored: Stored = { modules: [], steps: [] };
    for (const kv of modules.kvs) {
      const name = keys.nameFromModuleKey(kv.key.toString());
      this.#revisions.set(name, kv.mod_revision);
      stored.modules.push({ name, snapshot: decodeModule(kv.value.toString()) });
    }
    for (const kv of steps.kvs) {
      const record = decodeStep(kv.key.toString(), kv.value.toString());
      stored.steps.push(record);
      this.#stepList(record.module, record.phase).push(record.step);
    }
    for (const list of this.#steps.values()) list.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    this.#fences.set(slot, fence);
    return stored;
  }

  /** Forgets a slot this replica no longer owns: its writes are refused from now on. */
  closeSlot(slot: number): void {
    this.#fences.delete(slot);
    for (const name of [...this.#revisions.keys()]) if (slotOf(name) === slot) this.#revisions.delete(name);
    for (const key of [...this.#steps.keys()]) if (slotOf(key.slice(0, key.lastIndexOf('\0'))) === slot) this.#steps.delete(key);
  }

  /** The fence of a held slot, after the slot's key was put again (a renewal by the cluster). */
  refence(slot: number, fence: string): void {
    if (this.#fences.has(slot)) this.#fences.set(slot, fence);
  }

  // Reads across the cluster.

  /**
   * The modules of every slot that `visible` allows, after `after` in name order: `limit` of them
   * as stored, and whether more follow.
   */
  async list(after: string, limit: number, visible: (name: string) => boolean): Promise<{ modules: { name: string; snapshot: ModuleSnapshot }[]; more: boolean }> {
    const all = (await this.#ns.getAll().prefix(keys.modules).keys()).map((key) => ({ key, name: keys.nameFromModuleKey(key) }));
    const names = all.filter((m) => m.name > after && visible(m.name)).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    const page = names.slice(0, limit);
    const values = await Promise.all(page.map((m) => this.#ns.get(m.key).string()));
    // A module deleted between the two reads is left out.
    const modules = page.flatMap((m, i) => (values[i] === null ? [] : [{ name: m.name, snapshot: decodeModule(values[i]!) }]));
    return { modules, more: names.length > limit };
  }

  // Writes.

  write(changes: Changes): Promise<void> {
    if (this.#closed) return Promise.reject(new StoreRefusal('the store is closed', bnError('BN_ERR_SHUTTING_DOWN', {})));
    const slots = new Set<number>([
      ...(changes.modules ?? []).map((m) => slotOf(m.name)),
      ...(changes.deleted ?? []).map(slotOf),
      ...(changes.steps ?? []).map((s) => slotOf(s.module)),
    ]);
    for (const slot of slots) {
      const refusal = this.#refusal(slot, [...names(changes)][0] ?? '');
      if (refusal) return Promise.reject(refusal);
    }
    return new Promise<void>((resolve, reject) => {
      this.#queue.push({ changes, slots, resolve, reject, alone: false });
      this.#flush();
    });
  }

  async close(): Promise<void> {
    this.#closed = true;
    while (this.#inFlight || this.#queue.length > 0) await new Promise((r) => setTimeout(r, 5));
  }

  /** Why a write to `slot` cannot go out now, or undefined. */
  #refusal(slot: number, name: string): StoreRefusal | undefined {
    if (!this.#fences.has(slot)) {
      return new StoreRefusal(`slot ${slot} is not held`, bnError('BN_ERR_SLOT_MOVING', { name, slot, why: 'this replica no longer owns' }));
    }
    if (this.#settling.has(slot)) {
      return new StoreRefusal(
        `slot ${slot} is settling a write`,
        bnError('BN_ERR_STORE', { detail: `etcd did not answer a write to slot ${slot}; its outcome is being confirmed` }),
      );
    }
    return undefined;
  }

  #flush(): void {
    if (this.#inFlight || this.#queue.length === 0) return;
    const batch: Pending[] = [];
    const seen = new Set<string>();
    let ops = 0;
    const rest: Pending[] = [];
    for (const p of this.#queue) {
      const refusal = [...p.slots].map((s) => this.#refusal(s, [...names(p.changes)][0] ?? '')).find(Boolean);
      if (refusal) {
        p.reject(refusal);
        continue;
      }
      const these = [...names(p.changes)];
      const cost = this.#cost(p.changes) + p.slots.size;
      const fits = batch.length === 0 || (!p.alone && !batch[0]!.alone && ops + cost <= MAX_TXN_OPS && these.every((n) => !seen.has(n)));
      if (!fits) {
        rest.push(p);
        continue;
      }
      batch.push(p);
      ops += cost;
      for (const n of these) seen.add(n);
    }
    this.#queue = rest;
    if (batch.length === 0) return;
    this.#inFlight = true;
    void this.#commit(batch).finally(() => {
      this.#inFlight = false;
      this.#flush();
    });
  }

  #cost(c: Changes): number {
    return (c.modules?.length ?? 0) * 2 + (c.deleted?.length ?? 0) * 3 + (c.steps?.length ?? 0) * 2;
  }

  async #commit(batch: Pending[]): Promise<void> {
    const slots = new Set<number>(batch.flatMap((p) => [...p.slots]));
    const plan = this.#plan(batch.map((p) => p.changes));
    const [first, ...more] = [...slots];
    let txn = this.#ns.if(keys.slot(first!), 'Mod', '==', this.#fences.get(first!)!);
    for (const slot of more) txn = txn.and(keys.slot(slot), 'Mod', '==', this.#fences.get(slot)!);
    for (const [name, revision] of plan.expected) txn = txn.and(keys.module(name), 'Mod', '==', revision);
    let result: Awaited<ReturnType<typeof txn.commit>>;
    try {
      result = await txn.then(...plan.ops).commit();
    } catch (err) {
      if (!isTransport(err) || NOT_SENT.test((err as Error).message)) {
        const why = `etcd at ${this.#opts.endpoints}: ${(err as Error).message}`;
        for (const p of batch) p.reject(new StoreRefusal(why, bnError('BN_ERR_STORE', { detail: why })));
        return;
      }
      this.#uncertain(batch, plan, err as Error);
      return;
    }
    if (result.succeeded) {
      plan.apply(result.header.revision);
      for (const p of batch) p.resolve();
      return;
    }
    if (batch.length > 1) {
      // One compare failed: send each on its own to find whose.
      this.#queue.unshift(...batch.map((p) => ({ ...p, alone: true })));
      return;
    }
    await this.#diagnose(batch[0]!);
  }

  /** A write alone whose compare failed: its slot moved, or the module changed under this replica. */
  async #diagnose(p: Pending): Promise<void> {
    const name = [...names(p.changes)][0] ?? '';
    for (const slot of p.slots) {
      const kv = await this.#ns.get(keys.slot(slot)).exec().catch(() => undefined);
      const current = kv?.kvs[0];
      if (current?.mod_revision !== this.#fences.get(slot)) {
        this.#opts.logger.warn({ slot, owner: current?.value.toString() }, 'slot lost: its key changed under this replica');
        this.#opts.onFenced(slot);
        p.reject(new StoreRefusal(`slot ${slot} moved`, bnError('BN_ERR_SLOT_MOVING', { name, slot, why: 'has moved to another replica' })));
        return;
      }
    }
    const slot = slotOf(name);
    this.#opts.logger.error({ slot, module: name }, "a module's key changed in etcd under its owner; reloading the slot");
    this.#opts.onFenced(slot);
    p.reject(new StoreRefusal('module changed in etcd', bnError('BN_ERR_SLOT_MOVING', { name, slot, why: 'is being reloaded from etcd' })));
  }

  /**
   * The transaction's answer was lost. The writes of its slots are refused until the store knows
   * the outcome; each waiter gets its own outcome if it comes within settleWaitMs, and otherwise
   * a StoreUncertain that settles later.
   */
  #uncertain(batch: Pending[], plan: Plan, err: Error): void {
    const slots = new Set<number>(batch.flatMap((p) => [...p.slots]));
    const touched = [...new Set(batch.flatMap((p) => [...names(p.changes)]))];
    this.#opts.logger.warn({ err, slots: [...slots], modules: touched }, 'etcd did not answer a write; confirming its outcome');
    const outcome = this.#settle(slots, touched);
    // Set before the next batch is built: the slots' writes are refused until the outcome is known.
    for (const slot of slots) this.#settling.set(slot, outcome.then(() => undefined, () => undefined));
    void outcome
      .finally(() => {
        for (const slot of slots) this.#settling.delete(slot);
      })
      .catch(() => undefined);
    void this.#answer(batch, plan, err, outcome);
  }

  async #answer(batch: Pending[], plan: Plan, err: Error, outcome: Promise<Settled>): Promise<void> {
    const waited = await Promise.race([outcome.catch(() => undefined), new Promise<undefined>((r) => setTimeout(() => r(undefined), this.#opts.settleWaitMs ?? 2000).unref())]);
    for (const p of batch) {
      if (waited === undefined) {
        const stored = outcome.then((o) => new Map([...names(p.changes)].map((n) => [n, o.modules.get(n) ?? null])));
        p.reject(new StoreUncertain(`etcd at ${this.#opts.endpoints} did not answer: ${err.message}`, stored));
      } else if (plan.committedIn(p.changes, waited.revisions)) {
        p.resolve();
      } else {
        const why = `etcd at ${this.#opts.endpoints} did not answer, and the change is not there: ${err.message}`;
        p.reject(new StoreRefusal(why, bnError('BN_ERR_STORE', { detail: why })));
      }
    }
  }

  /**
   * Renews the fences of `slots` (so that a transaction still on its way fails), then reads back
   * `touched`: their revisions and states as stored. Retries until etcd answers or the store closes.
   */
  async #settle(slots: ReadonlySet<number>, touched: readonly string[]): Promise<Settled> {
    let backoff = 100;
    for (;;) {
      try {
        const { member, lease } = this.#opts.owner();
        for (const slot of slots) {
          const fence = this.#fences.get(slot);
          if (fence === undefined) continue;
          const renewed = await this.#ns
            .if(keys.slot(slot), 'Mod', '==', fence)
            .then(this.#ns.put(keys.slot(slot)).value(member).lease(lease))
            .commit();
          if (renewed.succeeded) this.#fences.set(slot, renewed.header.revision);
          else this.#opts.onFenced(slot);
        }
        const revisions = new Map<string, string>();
        const modules = new Map<string, ModuleSnapshot | null>();
        for (const name of touched) {
          const [module, steps] = await Promise.all([this.#ns.get(keys.module(name)).exec(), this.#ns.getAll().prefix(keys.stepsOfModule(name)).keys()]);
          const kv = module.kvs[0];
          revisions.set(name, kv?.mod_revision ?? '0');
          modules.set(name, kv ? decodeModule(kv.value.toString()) : null);
          if (this.#fences.has(slotOf(name))) {
            this.#revisions.set(name, kv?.mod_revision ?? '0');
            for (const phase of ['forward', 'backward'] as const) this.#steps.delete(`${name}\0${phase}`);
            for (const key of steps) {
              const [, , , phase, step] = key.split('/');
              this.#stepList(name, phase as StepRecord['phase']).push(BigInt(step!));
            }
          }
        }
        return { revisions, modules };
      } catch (err) {
        if (this.#closed) throw err;
        await new Promise((r) => setTimeout(r, backoff));
        backoff = Math.min(2000, backoff * 2);
      }
    }
  }

  #stepList(module: string, phase: StepRecord['phase']): bigint[] {
    const key = `${module}\0${phase}`;
    let list = this.#steps.get(key);
    if (!list) this.#steps.set(key, (list = []));
    return list;
  }

  /** The compares, operations and bookkeeping of a batch's changes. */
  #plan(changes: readonly Changes[]): Plan {
    const expected = new Map<string, string>();
    const ops: IOperation[] = [];
    const after: (() => void)[] = [];
    const puts = new Set<string>();
    const deletes = new Set<string>();
    const stepPuts: StepRecord[] = [];
    for (const c of changes) {
      for (const { name, snapshot } of c.modules ?? []) {
        expected.set(name, this.#revisions.get(name) ?? '0');
        ops.push(this.#ns.put(keys.module(name)).value(encodeModule(snapshot)));
        puts.add(name);
      }
      for (const name of c.deleted ?? []) {
        expected.set(name, this.#revisions.get(name) ?? '0');
        ops.push(this.#ns.delete().key(keys.module(name)), this.#ns.delete().prefix(keys.stepsOfModule(name)));
        deletes.add(name);
      }
      for (const r of c.steps ?? []) {
        ops.push(this.#ns.put(keys.step(r.module, r.phase, r.step)).value(encodeStep(r)));
        const stored = this.#stepList(r.module, r.phase);
        const kept = [...stored.filter((s) => s !== r.step), r.step].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
        const dropped = kept.slice(0, Math.max(0, kept.length - this.#opts.keepSteps));
        for (const s of dropped) ops.push(this.#ns.delete().key(keys.step(r.module, r.phase, s)));
        stepPuts.push(r);
        after.push(() => {
          const list = this.#stepList(r.module, r.phase);
          list.splice(0, list.length, ...kept.slice(dropped.length));
        });
      }
    }
    return {
      expected,
      ops,
      apply: (revision) => {
        for (const name of puts) this.#revisions.set(name, revision);
        for (const name of deletes) {
          this.#revisions.set(name, '0');
          for (const phase of ['forward', 'backward'] as const) this.#steps.delete(`${name}\0${phase}`);
        }
        for (const f of after) f();
      },
      committedIn: (c, revisions) => {
        const changed = [...(c.modules ?? []).map((m) => m.name), ...(c.deleted ?? [])];
        // A step alone is committed when its key is there (#settle has read the steps back).
        if (changed.length === 0) return (c.steps ?? []).every((r) => this.#stepList(r.module, r.phase).includes(r.step));
        return changed.every((name) => (revisions.get(name) ?? '0') !== expected.get(name));
      },
    };
  }
}

/** What a lost answer turned out to be: the touched modules' revisions and states as stored. */
interface Settled {
  readonly revisions: ReadonlyMap<string, string>;
  readonly modules: ReadonlyMap<string, ModuleSnapshot | null>;
}

interface Plan {
  /** Per module: the mod revision its key must still have. */
  readonly expected: ReadonlyMap<string, string>;
  readonly ops: IOperation[];
  /** Records a committed transaction at `revision`. */
  apply(revision: string): void;
  /** Whether `changes` are in the store, by the revisions read back after a lost answer. */
  committedIn(changes: Changes, revisions: ReadonlyMap<string, string>): boolean;
}

function* names(c: Changes): Iterable<string> {
  for (const m of c.modules ?? []) yield m.name;
  for (const d of c.deleted ?? []) yield d;
  for (const s of c.steps ?? []) if (!(c.modules ?? []).some((m) => m.name === s.module)) yield s.module;
}

/** The cluster's keys were written by a normserve of another format. */
export class FormatError extends Error {
  override readonly name = 'FormatError';
}

/** Checks (or writes, in an empty namespace) the cluster's format; refuses a different one. */
export async function checkFormat(ns: Namespace): Promise<void> {
  const meta = JSON.stringify({ format: FORMAT, slots: SLOTS });
  await ns.if(keys.meta, 'Create', '==', 0).then(ns.put(keys.meta).value(meta)).commit();
  const found = await ns.get(keys.meta).string();
  if (found !== meta) throw new FormatError(`etcd holds a normserve cluster of another format under this prefix (${found}); this normserve writes ${meta}: use another --store prefix, or the normserve that wrote it`);
}
