/**
 * The Helm chart's templates, rendered here without helm by the subset renderer in
 * scripts/chart/ (a faithful implementation of the Go template and Sprig features the chart uses;
 * real helm runs in scripts/check-deploy.sh). For the default and the production-like values:
 * the objects must equal the expected manifests in test/fixtures/chart/ (so a template change
 * fails until the fixtures are regenerated on purpose), pass Kubernetes' schemas
 * (kubernetes-models), fit together (selectors, ports, probes, volumes), and hand the server an
 * environment its own configuration loader accepts, on every pod: SQLite on the pod's volume, or
 * etcd at the endpoints the values name or the bundled etcd's members. The bundled etcd's own
 * command line is started on Debian's etcd.
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Deployment } from 'kubernetes-models/apps/v1/Deployment';
import { StatefulSet } from 'kubernetes-models/apps/v1/StatefulSet';
import { NetworkPolicy } from 'kubernetes-models/networking.k8s.io/v1/NetworkPolicy';
import { PodDisruptionBudget } from 'kubernetes-models/policy/v1/PodDisruptionBudget';
import { Pod } from 'kubernetes-models/v1/Pod';
import { Service } from 'kubernetes-models/v1/Service';
import { ServiceAccount } from 'kubernetes-models/v1/ServiceAccount';
import { ServiceMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor';
import { parse } from 'yaml';
import { describe, expect, it } from 'vitest';
import { compareManifests, objectsByName } from '../../scripts/chart/compare.js';
import { renderChart } from '../../scripts/chart/helm.js';
import { CHART_DIR, FIXTURES_DIR, RELEASE, renderScenario, scenarios } from '../../scripts/chart/render.js';
import { freePorts } from '../../bench/server-process.js';
import { loadConfig, parseStore, SETTINGS } from '../../src/config.js';

type K8s = any;
const MODELS: Record<string, new (data: K8s) => { validate(): void }> = {
  'apps/v1/StatefulSet': StatefulSet,
  'apps/v1/Deployment': Deployment,
  'v1/Service': Service,
  'v1/ServiceAccount': ServiceAccount,
  'v1/Pod': Pod,
  'policy/v1/PodDisruptionBudget': PodDisruptionBudget,
  'networking.k8s.io/v1/NetworkPolicy': NetworkPolicy,
  'monitoring.coreos.com/v1/ServiceMonitor': ServiceMonitor,
};

const SCENARIOS = [...scenarios()];
const values = (file: string): K8s => merged(parse(readFileSync(join(CHART_DIR, 'values.yaml'), 'utf8')), parse(readFileSync(file, 'utf8')) ?? {});

/**
 * The objects of a rendering, by kind: normserve's workload (the StatefulSet of store.type
 * sqlite or the Deployment of etcd) and its container, and the bundled etcd's StatefulSet.
 */
function objects(text: string) {
  const all = [...objectsByName(text).values()] as K8s[];
  const of = (kind: string) => all.filter((o) => o.kind === kind);
  const isEtcd = (o: K8s) => o.metadata.labels['app.kubernetes.io/component'] === 'store';
  const workloads = [...of('StatefulSet'), ...of('Deployment')].filter((o) => !isEtcd(o));
  expect(workloads, 'one normserve workload').toHaveLength(1);
  const sts = workloads[0];
  const etcd = of('StatefulSet').find(isEtcd);
  return { all, of, sts, container: sts.spec.template.spec.containers[0], etcd, isEtcd };
}

/** The environment a pod's container gets, $(POD_NAME) and $(POD_IP) expanded as the kubelet does. */
function podEnv(container: K8s, pod: string, ip = '10.1.0.7'): Record<string, string> {
  const env: Record<string, string> = {};
  const fields: Record<string, string> = { 'metadata.name': pod, 'status.podIP': ip };
  for (const e of container.env as { name: string; value?: string; valueFrom?: { fieldRef?: { fieldPath: string } } }[]) {
    const field = e.valueFrom?.fieldRef?.fieldPath;
    env[e.name] = field !== undefined ? fields[field]! : (e.value ?? '').replace(/\$\((\w+)\)/g, (_, n: string) => env[n] ?? '');
  }
  return env;
}

/** Helm's merge of values files over values.yaml, deep for maps. */
function merged(base: K8s, over: K8s): K8s {
  if (typeof base !== 'object' || base === null || Array.isArray(base) || typeof over !== 'object' || over === null || Array.isArray(over)) return over;
  const out: K8s = { ...base };
  for (const [k, v] of Object.entries(over)) out[k] = merged(base[k], v);
  return out;
}

describe.each(SCENARIOS)('chart rendered with ci/%s-values.yaml', (name, file) => {
  const text = renderScenario(file);
  const { all, of, sts, container, etcd, isEtcd } = objects(text);
  const v = values(file);
  const sqlite = v.store.type === 'sqlite';

  it('equals the expected manifests in test/fixtures/chart (regenerate with node dist/scripts/chart/render.js --write)', () => {
    expect(compareManifests(text, readFileSync(join(FIXTURES_DIR, `${name}.yaml`), 'utf8'))).toEqual([]);
  });

  it('passes Kubernetes\' schemas, object by object', () => {
    for (const o of all) {
      const Model = MODELS[`${o.apiVersion}/${o.kind}`];
      expect(Model, `a model for ${o.apiVersion} ${o.kind}`).toBeDefined();
      expect(() => new Model!(o).validate(), `${o.kind}/${o.metadata.name}`).not.toThrow();
    }
  });

  it('fits together: services, budget and monitor select the pods; ports, probes and volumes match', () => {
    const labelsSelect = (labels: Record<string, string>) => (selector: Record<string, string>) => Object.entries(selector).every(([k, x]) => labels[k] === x);
    const selects = labelsSelect(sts.spec.template.metadata.labels);
    expect(sts.kind).toBe(sqlite ? 'StatefulSet' : 'Deployment');
    expect(selects(sts.spec.selector.matchLabels)).toBe(true);
    // The workload's selector is immutable: only the stable labels.
    expect(Object.keys(sts.spec.selector.matchLabels).sort()).toEqual(['app.kubernetes.io/instance', 'app.kubernetes.io/name']);
    const services = of('Service').filter((s: K8s) => !isEtcd(s));
    expect(services.map((s: K8s) => s.metadata.name).sort()).toEqual(['normserve', 'normserve-headless']);
    const headless = services.find((s: K8s) => s.spec.clusterIP === 'None');
    if (sqlite) expect(sts.spec.serviceName).toBe(headless.metadata.name);
    const portNames = new Map((container.ports as { name: string; containerPort: number }[]).map((p) => [p.name, p.containerPort]));
    for (const s of services) {
      expect(selects(s.spec.selector)).toBe(true);
      for (const p of s.spec.ports) expect(portNames.get(p.targetPort), `${s.metadata.name} ${p.name}`).toBe(p.port);
    }
    for (const pdb of of('PodDisruptionBudget').filter((o: K8s) => !isEtcd(o))) expect(selects(pdb.spec.selector.matchLabels)).toBe(true);
    for (const sm of of('ServiceMonitor')) {
      const target = services.find((s: K8s) => Object.entries(sm.spec.selector.matchLabels).every(([k, x]) => s.metadata.labels[k] === x) && s.spec.clusterIP !== 'None');
      expect(target.spec.ports.map((p: K8s) => p.name)).toContain(sm.spec.endpoints[0].port);
    }
    // Native gRPC probes on the plaintext health port: liveness and startup ask for `liveness`, readiness for the API.
    for (const probe of ['startupProbe', 'livenessProbe', 'readinessProbe']) expect(container[probe].grpc.port).toBe(portNames.get('health'));
    expect([container.livenessProbe.grpc.service, container.startupProbe.grpc.service, container.readinessProbe.grpc.service]).toEqual([
      'liveness',
      'liveness',
      'normserve.v1.BatchNormService',
    ]);
    const volumes = new Set([...(sts.spec.template.spec.volumes ?? []), ...(sts.spec.volumeClaimTemplates ?? []).map((c: K8s) => c.metadata)].map((x: K8s) => x.name));
    for (const m of container.volumeMounts) expect(volumes, m.mountPath).toContain(m.name);
    // Only SQLite keeps anything on a volume; etcd-mode pods are interchangeable.
    expect(volumes.has('data')).toBe(sqlite);
    expect((sts.spec.volumeClaimTemplates ?? []).length > 0).toBe(sqlite && v.persistence.enabled);
    // `helm test` asks a pod's health port through the headless Service, which publishes pod addresses.
    const test = of('Pod')[0];
    expect(test.spec.containers[0].env).toContainEqual({ name: 'NORMSERVE_HOST', value: headless.metadata.name });
    expect(test.spec.containers[0].env).toContainEqual({ name: 'NORMSERVE_HEALTH_PORT', value: String(portNames.get('health')) });
    // The bundled etcd is there exactly when asked for.
    expect(etcd !== undefined).toBe(v.store.type === 'etcd' && v.etcd.bundled.enabled);
  });

  it('runs non-root on a read-only root, and gives the drain time to finish before the kill', () => {
    const pod = sts.spec.template.spec;
    expect(pod.securityContext).toMatchObject({ runAsNonRoot: true, runAsUser: 65532, fsGroup: 65532 });
    expect(container.securityContext).toMatchObject({ readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: { drop: ['ALL'] } });
    const preStop = container.lifecycle?.preStop?.sleep?.seconds ?? 0;
    expect(pod.terminationGracePeriodSeconds * 1000).toBeGreaterThan(preStop * 1000 + (v.config.shutdownGraceMs ?? SETTINGS.shutdownGraceMs.default));
  });

  it('gives every pod an environment the server accepts: every setting once, its store and its address', () => {
    const names = (container.env as { name: string }[]).map((e) => e.name);
    expect(new Set(names).size).toBe(names.length);
    for (const s of Object.values(SETTINGS)) expect(names, s.env).toContain(s.env);
    const replicas = sts.spec.replicas as number;
    expect(replicas).toBe(sqlite ? 1 : v.replicaCount);
    for (let i = 0; i < replicas; i++) {
      const ip = `10.1.0.${i + 7}`;
      const config = loadConfig([], podEnv(container, `${sts.metadata.name}-${i}`, ip))!;
      expect(config.maxModules).toBe(v.config.maxModules ?? SETTINGS.maxModules.default);
      expect(config.leaseTtlSeconds).toBe(v.config.leaseTtlSeconds);
      const mounted = (path: string) => path === '' || container.volumeMounts.some((m: K8s) => path.startsWith(`${m.mountPath}/`));
      for (const path of [config.tlsCert, config.tlsKey, config.tlsClientCa, config.authTokensFile]) expect(mounted(path), path).toBe(true);
      const store = parseStore(config.store);
      if (store.kind === 'sqlite') {
        expect(sqlite).toBe(true);
        expect(store.dir).toBe(container.volumeMounts.find((m: K8s) => m.name === 'data').mountPath);
        expect(config.advertiseAddress).toBe('');
        continue;
      }
      expect(v.store.type).toBe('etcd');
      expect(store.prefix).toBe(`/${v.etcd.prefix}/`);
      // Other replicas send this pod's callers to the pod's own IP and gRPC port.
      expect(config.advertiseAddress).toBe(`${ip}:${config.port}`);
      if (etcd === undefined) {
        expect(store.endpoints).toEqual(v.etcd.endpoints);
        continue;
      }
      // Every member of the bundled etcd, by its stable name under the members' headless Service.
      const members = of('Service').find((s: K8s) => isEtcd(s) && s.spec.clusterIP === 'None');
      expect(etcd.spec.serviceName).toBe(members.metadata.name);
      const client = members.spec.ports.find((p: K8s) => p.name === 'client').port;
      expect(store.endpoints).toEqual(
        Array.from({ length: etcd.spec.replicas }, (_, m) => `${etcd.metadata.name}-${m}.${members.metadata.name}.${RELEASE.namespace}.svc.cluster.local:${client}`),
      );
    }
  });

});

describe('the bundled etcd (ci/etcd-bundled-values.yaml)', () => {
  const file = SCENARIOS.find(([name]) => name === 'etcd-bundled')![1];
  const { of, sts, etcd, isEtcd } = objects(renderScenario(file));
  const v = values(file);

  it('bundles an etcd that bootstraps: members, quorum budget, compaction and quota, reachable only by normserve', () => {
    const spec = etcd.spec.template.spec;
    const labels = etcd.spec.template.metadata.labels;
    const selects = (selector: Record<string, string>) => Object.entries(selector).every(([k, x]) => labels[k] === x);
    expect(selects(etcd.spec.selector.matchLabels)).toBe(true);
    // normserve's Services and budget must not select etcd's pods, nor etcd's normserve's.
    for (const s of of('Service').filter((o: K8s) => !isEtcd(o))) expect(selects(s.spec.selector)).toBe(false);
    expect(etcd.spec.podManagementPolicy).toBe('Parallel');
    const members = of('Service').find((s: K8s) => isEtcd(s));
    expect(members.spec.publishNotReadyAddresses).toBe(true);
    expect(selects(members.spec.selector)).toBe(true);
    const args: string[] = spec.containers[0].args;
    const flag = (name: string) => args.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
    const n = etcd.spec.replicas as number;
    expect(flag('initial-cluster')!.split(',')).toHaveLength(n);
    expect(flag('auto-compaction-mode')).toBe('periodic');
    expect(flag('auto-compaction-retention')).toBe(v.etcd.bundled.autoCompactionRetention);
    expect(Number(flag('quota-backend-bytes'))).toBe(v.etcd.bundled.quotaBackendBytes);
    const pdb = of('PodDisruptionBudget').find((o: K8s) => isEtcd(o));
    expect(pdb.spec.minAvailable).toBe(Math.floor(n / 2) + 1);
    expect(selects(pdb.spec.selector.matchLabels)).toBe(true);
    expect(spec.containers[0].volumeMounts[0].name).toBe(etcd.spec.volumeClaimTemplates[0].metadata.name);
    expect(flag('data-dir')!.startsWith(`${spec.containers[0].volumeMounts[0].mountPath}/`)).toBe(true);
    if (v.networkPolicy.enabled) {
      const policy = of('NetworkPolicy').find((o: K8s) => isEtcd(o));
      const clientPeers = policy.spec.ingress.find((r: K8s) => r.ports[0].port === 2379).from.map((f: K8s) => f.podSelector.matchLabels);
      expect(clientPeers).toContainEqual(sts.spec.selector.matchLabels);
    }
  });

  it("starts Debian's etcd with the bundled etcd's command line (one member, names bound to 127.0.0.1)", async () => {
    // The same flags on one member, its names replaced by loopback ports: proves etcd takes every
    // flag (Debian ships 3.4, the image 3.5; these flags are the same in both) and that the
    // probes' health path answers.
    const one = objects(renderScenario(file, { 'etcd.bundled.replicas': 1 })).etcd;
    const [client, peer, metrics] = await freePorts(3);
    const dir = mkdtempSync(join(tmpdir(), 'normserve-chart-etcd-'));
    const local = (one.spec.template.spec.containers[0].args as string[]).map((a) =>
      a
        .replace('$(POD_NAME)', `${one.metadata.name}-0`)
        .replace(/http:\/\/[^,]*:2379/g, `http://127.0.0.1:${client}`)
        .replace(/http:\/\/[^,]*:2380/g, `http://127.0.0.1:${peer}`)
        .replace(/http:\/\/[^,]*:2381/g, `http://127.0.0.1:${metrics}`)
        .replace('--data-dir=/var/lib/etcd', `--data-dir=${dir}`),
    );
    const child = spawn('etcd', local, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    try {
      const probe = one.spec.template.spec.containers[0].readinessProbe.httpGet.path as string;
      const deadline = Date.now() + 20_000;
      let status = 0;
      while (status !== 200 && Date.now() < deadline && child.exitCode === null) {
        status = await fetch(`http://127.0.0.1:${metrics}${probe}`).then((r) => r.status, () => 0);
        if (status !== 200) await new Promise((r) => setTimeout(r, 100));
      }
      expect(status, stderr.slice(-2000)).toBe(200);
    } finally {
      const exited = child.exitCode === null ? once(child, 'exit') : Promise.resolve();
      child.kill('SIGTERM');
      await exited;
      rmSync(dir, { recursive: true, force: true });
    }
  }, 30_000);
});

describe('the chart', () => {
  const render = (set: Record<string, unknown>) => renderChart(CHART_DIR, { ...RELEASE, set });
  const etcd = { 'store.type': 'etcd', 'etcd.endpoints': ['etcd.platform:2379'] };

  it('refuses values that cannot work, saying what to change', () => {
    const refusals: [Record<string, unknown>, string][] = [
      [{ terminationGracePeriodSeconds: 10 }, 'terminationGracePeriodSeconds (10 s) must exceed preStopSleepSeconds plus config.shutdownGraceMs (10000 ms)'],
      [{ preStopSleepSeconds: 25 }, 'terminationGracePeriodSeconds (30 s) must exceed preStopSleepSeconds plus config.shutdownGraceMs (35000 ms)'],
      [{ 'tls.enabled': true }, 'tls.enabled needs tls.secretName'],
      [{ 'tls.clientAuth': true }, 'tls.clientAuth needs tls.enabled'],
      [{ 'auth.enabled': true }, 'auth.enabled needs auth.existingSecret'],
      [{ replicaCount: 3 }, 'replicaCount 3 needs store.type etcd'],
      [{ 'etcd.bundled.enabled': true }, 'etcd.bundled.enabled needs store.type etcd'],
      [{ 'store.type': 'etcd' }, 'store.type etcd needs an etcd: list its client endpoints (host:2379) in etcd.endpoints, or set etcd.bundled.enabled'],
      [{ ...etcd, 'etcd.bundled.enabled': true }, 'store.type etcd takes etcd.endpoints or etcd.bundled.enabled, not both'],
      [{ ...etcd, 'config.durability': 'relaxed' }, 'config.durability relaxed is for store.type sqlite'],
      [{ ...etcd, 'config.durability': 'process' }, 'config.durability process is for store.type sqlite'],
      [{ 'store.type': 'etcd', 'etcd.bundled.enabled': true, 'etcd.bundled.replicas': 4 }, "at '/etcd/bundled/replicas': must be equal to one of the allowed values"],
      [{ 'store.type': 'redis' }, '/store/type'],
      [{ 'etcd.endpoints': ['http://etcd:2379'] }, '/etcd/endpoints/0'],
      [{ replicaCount: 'two' }, 'replicaCount'],
    ];
    for (const [set, message] of refusals) expect(() => render(set), JSON.stringify(set)).toThrow(message);
  });

  it('prints how to connect in its notes: port-forward for SQLite, owners and scaling for etcd; warns without persistence', () => {
    const { notes } = render({ 'persistence.enabled': false });
    expect(notes).toContain('normserve.ml.svc.cluster.local:50051');
    expect(notes).toContain('port-forward service/normserve 50051:50051');
    expect(notes).toContain('WARNING: persistence.enabled is false');
    const { of } = objects(render({ 'persistence.enabled': false }).manifests.map((m) => `---\n${m.text}\n`).join(''));
    expect(of('StatefulSet')[0].spec.volumeClaimTemplates).toBeUndefined();
    expect(of('StatefulSet')[0].spec.template.spec.volumes).toContainEqual({ name: 'data', emptyDir: {} });
    const scaled = render({ ...etcd, replicaCount: 4, 'persistence.enabled': false }).notes;
    expect(scaled).toContain('4 replica(s) sharing their modules through etcd (etcd.platform:2379, keys under /normserve/)');
    expect(scaled).toContain('kubectl scale deployment/normserve --replicas N');
    expect(scaled).not.toContain('WARNING');
    expect(scaled).not.toContain('port-forward');
  });
});
