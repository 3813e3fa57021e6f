/**
 * Membership and ownership through etcd. Each replica (a member) holds one lease; its member key
 * and the keys of the slots it owns live on that lease. A slot is owned by whoever created its key
 * (a transaction that succeeds only while the key is absent), so two replicas never own one slot.
 *
 * Every replica watches the member and slot keys and steers towards the rule of slots.ts: it
 * takes the free slots it should own, and hands over the slots another member should own, first
 * refusing their calls, then letting their running operations finish, then deleting their keys.
 * When a replica dies its lease expires, its keys go, and the survivors take its slots over from
 * the state in etcd. A replica shut down with SIGTERM revokes its lease after its calls have
 * drained, so that its slots move at once.
 *
 * A replica serves a slot only while its lease is confirmed: once etcd has not confirmed it for a
 * lease's time to live, another replica may own the slot already, and calls are refused unchanged.
 */
import { Etcd3, type Lease, type Namespace, type Watcher } from 'etcd3';
import { noop } from 'cockatiel';
import type { Logger } from 'pino';
import { bnError, type NormserveError } from '../errors.js';
import { checkFormat, EtcdStore, FormatError, keys } from '../store/etcd-store.js';
import type { Stored } from '../store/store.js';
import { preferredOwner, slotOf, SLOTS } from './slots.js';

export interface ClusterOptions {
  /** etcd's client endpoints, host:port. */
  readonly endpoints: readonly string[];
  /** The key prefix of this cluster. */
  readonly prefix: string;
  /** This replica's member id, unique to this process. */
  readonly member: string;
  readonly leaseTtlSeconds: number;
  /** How long one etcd request may take. */
  readonly requestTimeoutMs: number;
  readonly keepSteps: number;
  readonly logger: Logger;
}

/** What the server does when a slot comes to this replica or leaves it. */
export interface SlotHooks {
  /** The slot's modules and steps, as stored, are this replica's from now on. */
  open(slot: number, stored: Stored): void;
  /**
   * The slot is no longer this replica's: end what waits on its modules (with `error(name)`, which
   * says where they went) and let them go once their running operations are done.
   */
  close(slot: number, error: (name: string) => NormserveError): Promise<void>;
}

type Held = 'opening' | 'serving' | 'closing';

interface Owner {
  readonly member: string;
  readonly modRevision: string;
}

/** Slots opened at once while taking over. */
const OPEN_CONCURRENCY = 16;
/** A lease counts as confirmed until this long before etcd would let it expire. */
const LEASE_MARGIN_MS = 500;

export class EtcdCluster {
  readonly store: EtcdStore;
  readonly #client: Etcd3;
  readonly #ns: Namespace;
  readonly #opts: ClusterOptions;
  #hooks: SlotHooks = { open: () => {}, close: async () => {} };
  /** The address clients reach this replica at (set by join). */
  #address = '';
  readonly #members = new Map<string, string>();
  readonly #owners = new Map<number, Owner>();
  readonly #held = new Map<number, Held>();
  readonly #watchers: Watcher[] = [];
  #lease: Lease | undefined;
  #leaseId = '';
  /** Until when this replica's lease is confirmed (ms since the epoch). */
  #validUntil = 0;
  #firedAt = 0;
  #reconciling: Promise<void> = Promise.resolve();
  #again = false;
  #leaving = false;
  #joined = false;
  #timer: NodeJS.Timeout | undefined;

  /** The cluster's client and store; nothing is sent before join(). */
  constructor(opts: ClusterOptions) {
    this.#opts = opts;
    this.#client = new Etcd3({
      hosts: [...opts.endpoints],
      // Nothing is retried behind normserve's back: a repeated transaction could apply twice.
      faultHandling: { global: noop, host: () => noop },
      dialTimeout: opts.requestTimeoutMs,
      defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + opts.requestTimeoutMs }),
    });
    this.#ns = this.#client.namespace(opts.prefix);
    this.store = new EtcdStore(this.#client, opts.prefix, {
      endpoints: opts.endpoints.join(','),
      keepSteps: opts.keepSteps,
      logger: opts.logger,
      owner: () => ({ member: opts.member, lease: this.#leaseId }),
      onFenced: (slot) => void this.#lost(slot, 'its key changed in etcd'),
    });
  }

  /**
   * Joins the cluster as the replica clients reach at `address`: checks the cluster's format,
   * takes a lease, registers the member, reads and watches the members and slots, and takes the
   * free slots this replica should own.
   */
  async join(address: string, hooks: SlotHooks): Promise<void> {
    this.#address = address;
    this.#hooks = hooks;
    // etcd may not be up yet (it can start beside this replica): keep trying, not serving meanwhile.
    for (let backoff = 200; ; backoff = Math.min(5000, backoff * 2)) {
      if (this.#leaving) return;
      try {
        await checkFormat(this.#ns);
        await this.#grant();
        await this.#watch();
        break;
      } catch (err) {
        if (err instanceof FormatError) {
          this.#client.close();
          throw err;
        }
        this.#opts.logger.warn({ err, endpoints: this.#opts.endpoints, retry_ms: backoff }, 'cannot join the cluster in etcd yet; retrying');
        for (const w of this.#watchers.splice(0)) await w.cancel().catch(() => undefined);
        await this.#lease?.revoke().catch(() => undefined);
        this.#lease = undefined;
        await new Promise((r) => setTimeout(r, backoff));
      }
    }
    this.#joined = true;
    await this.reconcile();
    // Watches miss nothing, but a transaction lost to a network fault can leave a slot unsteered
    // until the next event: look again now and then.
    this.#timer = setInterval(() => void this.reconcile(), Math.max(1000, (this.#opts.leaseTtlSeconds * 1000) / 2));
    this.#timer.unref();
  }

  get member(): string {
    return this.#opts.member;
  }

  /** Whether this replica has joined and etcd confirms its lease now: readiness. */
  get confirmed(): boolean {
    return this.#joined && Date.now() < this.#validUntil - LEASE_MARGIN_MS;
  }

  /** The slots this replica serves. */
  get serving(): number {
    let n = 0;
    for (const h of this.#held.values()) if (h === 'serving') n++;
    return n;
  }

  get members(): ReadonlyMap<string, string> {
    return this.#members;
  }

  /**
   * Throws unless this replica may serve calls on `name` now: BN_ERR_NOT_OWNER with the owner's
   * address, or BN_ERR_SLOT_MOVING (retry) while the slot has no owner that can serve it.
   */
  check(name: string): void {
    const slot = slotOf(name);
    const held = this.#held.get(slot);
    if (held === 'serving') {
      if (Date.now() < this.#validUntil - LEASE_MARGIN_MS) return;
      throw bnError('BN_ERR_SLOT_MOVING', { name, slot, why: `this replica cannot serve while etcd (${this.#opts.endpoints.join(',')}) does not confirm its lease` });
    }
    if (held === 'opening') throw bnError('BN_ERR_SLOT_MOVING', { name, slot, why: 'this replica is taking over' });
    const owner = held === 'closing' ? preferredOwner(slot, this.#members.keys()) : this.#owners.get(slot)?.member;
    if (owner === this.#opts.member) {
      throw bnError('BN_ERR_SLOT_MOVING', { name, slot, why: `this replica is joining etcd (${this.#opts.endpoints.join(',')}) again to take over` });
    }
    const address = owner === undefined ? undefined : this.#members.get(owner);
    if (owner === undefined || address === undefined) {
      throw bnError('BN_ERR_SLOT_MOVING', { name, slot, why: held === 'closing' ? 'this replica is handing over' : 'has no owner at the moment; a replica is taking it over' });
    }
    throw bnError('BN_ERR_NOT_OWNER', { name, slot, member: owner, owner: address, self: `${this.#opts.member} at ${this.#address}` }).with({
      owner: address,
      member: owner,
      slot: String(slot),
    });
  }

  /**
   * Steers the slots towards the rule: takes the free ones this replica should own, hands over the
   * ones another member should. Runs one at a time; a call while one runs runs it again after.
   */
  reconcile(): Promise<void> {
    if (this.#leaving) return this.#reconciling;
    this.#again = true;
    this.#reconciling = this.#reconciling.then(async () => {
      while (this.#again && !this.#leaving) {
        this.#again = false;
        await this.#steer().catch((err: unknown) => this.#opts.logger.warn({ err }, 'steering slots failed; trying again'));
      }
    });
    return this.#reconciling;
  }

  /**
   * Leaves the cluster (at shutdown, after the calls have drained): lets go of every slot, then
   * revokes the lease, which deletes this member's keys at once so that others take its slots.
   */
  async leave(): Promise<void> {
    this.#leaving = true;
    clearInterval(this.#timer);
    await this.#reconciling;
    const error = (_name: string) => bnError('BN_ERR_SHUTTING_DOWN', {});
    for (const slot of this.#held.keys()) this.#held.set(slot, 'closing');
    await Promise.all([...this.#held.keys()].map((slot) => this.#hooks.close(slot, error)));
    await this.store.close();
    for (const w of this.#watchers) await w.cancel().catch(() => undefined);
    await this.#lease?.revoke().catch((err: unknown) => this.#opts.logger.warn({ err }, 'could not revoke the lease; its keys expire with it'));
    this.#client.close();
  }

  async #grant(): Promise<void> {
    const lease = this.#ns.lease(this.#opts.leaseTtlSeconds);
    const granted = Date.now();
    this.#leaseId = await lease.grant();
    this.#validUntil = granted + this.#opts.leaseTtlSeconds * 1000;
    lease.on('keepaliveFired', () => (this.#firedAt = Date.now()));
    lease.on('keepaliveSucceeded', (res) => {
      this.#validUntil = Math.max(this.#validUntil, this.#firedAt + Number(res.TTL) * 1000);
    });
    lease.on('lost', (err) => void this.#leaseLost(lease, err));
    this.#lease = lease;
    await lease.put(keys.member(this.#opts.member)).value(JSON.stringify({ address: this.#address }));
    this.#opts.logger.info({ member: this.#opts.member, lease: this.#leaseId, ttl_s: this.#opts.leaseTtlSeconds }, 'joined the cluster');
  }

  /** Reads the members and slots, then follows their changes from that revision on. */
  async #watch(): Promise<void> {
    const [members, slots] = await Promise.all([this.#ns.getAll().prefix(keys.members).exec(), this.#ns.getAll().prefix(keys.slots).exec()]);
    for (const kv of members.kvs) this.#putMember(kv.key.toString(), kv.value.toString());
    for (const kv of slots.kvs) this.#owners.set(keys.slotFromKey(kv.key.toString()), { member: kv.value.toString(), modRevision: kv.mod_revision });
    const from = (BigInt(members.header.revision > slots.header.revision ? slots.header.revision : members.header.revision) + 1n).toString();
    const watchMembers = await this.#ns.watch().prefix(keys.members).startRevision(from).create();
    watchMembers.on('put', (kv) => {
      this.#putMember(kv.key.toString(), kv.value.toString());
      void this.reconcile();
    });
    watchMembers.on('delete', (kv) => {
      this.#members.delete(kv.key.toString().slice(keys.members.length));
      void this.reconcile();
    });
    const watchSlots = await this.#ns.watch().prefix(keys.slots).startRevision(from).create();
    watchSlots.on('put', (kv) => {
      const slot = keys.slotFromKey(kv.key.toString());
      const member = kv.value.toString();
      this.#owners.set(slot, { member, modRevision: kv.mod_revision });
      if (member !== this.#opts.member && this.#held.has(slot)) void this.#lost(slot, `etcd says ${member} owns it`);
      void this.reconcile();
    });
    watchSlots.on('delete', (kv) => {
      const slot = keys.slotFromKey(kv.key.toString());
      this.#owners.delete(slot);
      if (this.#held.get(slot) === 'serving') void this.#lost(slot, 'its key was deleted (the lease expired?)');
      void this.reconcile();
    });
    for (const w of [watchMembers, watchSlots]) {
      w.on('disconnected', (err) => this.#opts.logger.warn({ err }, 'etcd watch disconnected; reconnecting'));
      w.on('connected', () => void this.reconcile());
    }
    this.#watchers.push(watchMembers, watchSlots);
  }

  #putMember(key: string, value: string): void {
    try {
      this.#members.set(key.slice(keys.members.length), (JSON.parse(value) as { address: string }).address);
    } catch {
      this.#opts.logger.warn({ key }, 'ignoring a member key that is not normserve JSON');
    }
  }

  async #steer(): Promise<void> {
    if (!this.confirmed) return;

    const me = this.#opts.member;
    const take: number[] = [];
    const give: number[] = [];
    for (let slot = 0; slot < SLOTS; slot++) {
      const preferred = preferredOwner(slot, this.#members.keys());
      const held = this.#held.get(slot);
      if (preferred === me && held === undefined && !this.#owners.has(slot)) take.push(slot);
      else if (preferred !== undefined && preferred !== me && held === 'serving') give.push(slot);
    }
    // Hand over first: a member that joins waits for these.
    await Promise.all(give.map((slot) => this.#handOver(slot)));
    for (let i = 0; i < take.length; i += OPEN_CONCURRENCY) {
      await Promise.all(take.slice(i, i + OPEN_CONCURRENCY).map((slot) => this.#take(slot)));
    }
    if (take.length > 0 || give.length > 0) {
      this.#opts.logger.info({ took: take.length, handed_over: give.length, serving: this.serving, members: this.#members.size }, 'slots steered');
    }
  }

  async #take(slot: number): Promise<void> {
    const txn = await this.#ns
      .if(keys.slot(slot), 'Create', '==', 0)
      .then(this.#ns.put(keys.slot(slot)).value(this.#opts.member).lease(this.#leaseId))
      .commit();
    if (!txn.succeeded) return;
    const fence = txn.header.revision;
    this.#owners.set(slot, { member: this.#opts.member, modRevision: fence });
    this.#held.set(slot, 'opening');
    try {
      const stored = await this.store.openSlot(slot, fence);
      if (this.#held.get(slot) !== 'opening') {
        // Lost while it was being read (#lost has let go of it).
        this.store.closeSlot(slot);
        return;
      }
      this.#hooks.open(slot, stored);
      this.#held.set(slot, 'serving');
    } catch (err) {
      // Not opened: give the slot back so that another replica (or a later attempt) takes it.
      this.#opts.logger.warn({ err, slot }, 'could not read a slot just taken; giving it back');
      this.#held.delete(slot);
      this.store.closeSlot(slot);
      await this.#ns.if(keys.slot(slot), 'Mod', '==', fence).then(this.#ns.delete().key(keys.slot(slot))).commit().catch(() => undefined);
    }
  }

  /** Refuses the slot's calls, lets its running operations finish, then deletes its key. */
  async #handOver(slot: number): Promise<void> {
    const fence = this.#owners.get(slot)?.modRevision;
    this.#held.set(slot, 'closing');
    await this.#hooks.close(slot, (name) => this.#refusal(name));
    this.store.closeSlot(slot);
    this.#held.delete(slot);
    if (fence !== undefined) {
      await this.#ns.if(keys.slot(slot), 'Mod', '==', fence).then(this.#ns.delete().key(keys.slot(slot))).commit();
    }
  }

  /** A held slot that is someone else's now, or whose fence failed: stop serving it at once. */
  async #lost(slot: number, why: string): Promise<void> {
    const held = this.#held.get(slot);
    if (held === undefined || held === 'closing') return;
    this.#opts.logger.warn({ slot, why }, 'lost a slot');
    this.#held.set(slot, 'closing');
    await this.#hooks.close(slot, (name) => this.#refusal(name));
    this.store.closeSlot(slot);
    this.#held.delete(slot);
    // Our key may still be there (a fence that failed on a module): delete it, so that the slot
    // is opened afresh from etcd.
    const owner = this.#owners.get(slot);
    if (owner?.member === this.#opts.member) {
      await this.#ns.if(keys.slot(slot), 'Mod', '==', owner.modRevision).then(this.#ns.delete().key(keys.slot(slot))).commit().catch(() => undefined);
    }
    void this.reconcile();
  }

  /** The error for a call on `name`, whose slot this replica lets go of. */
  #refusal(name: string): NormserveError {
    try {
      this.check(name);
    } catch (err) {
      return err as NormserveError;
    }
    return bnError('BN_ERR_SLOT_MOVING', { name, slot: slotOf(name), why: 'is moving' });
  }

  /** The lease is gone (etcd let it expire): every slot is lost; join again with a new one. */
  async #leaseLost(lease: Lease, err: Error): Promise<void> {
    if (this.#leaving || lease !== this.#lease) return;
    this.#opts.logger.error({ err }, 'the etcd lease was lost: letting go of every slot and joining again');
    this.#validUntil = 0;
    await Promise.all([...this.#held.keys()].map((slot) => this.#lost(slot, 'the lease was lost')));
    for (let backoff = 200; !this.#leaving; backoff = Math.min(5000, backoff * 2)) {
      try {
        // Should etcd still have the old lease, its keys go now rather than when it expires.
        await lease.revoke().catch(() => undefined);
        await this.#grant();
        break;
      } catch (e) {
        this.#opts.logger.warn({ err: e }, 'could not join the cluster again; retrying');
        await new Promise((r) => setTimeout(r, backoff));
      }
    }
    void this.reconcile();
  }
}
