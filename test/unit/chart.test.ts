/**
 * The Helm chart's templates, rendered here without helm by the subset renderer in
 * scripts/chart/ (a faithful implementation of the Go template and Sprig features the chart uses;
 * real helm runs in scripts/check-deploy.sh). For the default and the production-like values:
 * the objects must equal the expected manifests in test/fixtures/chart/ (so a template change
 * fails until the fixtures are regenerated on purpose), pass Kubernetes' schemas
 * (kubernetes-models), fit together (selectors, ports, probes, volumes), and hand the server an
 * environment its own configuration loader accepts, on every pod.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
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
import { parsePeers } from '../../src/cluster/placement.js';
import { loadConfig, SETTINGS } from '../../src/config.js';

type K8s = any;
const MODELS: Record<string, new (data: K8s) => { validate(): void }> = {
  'apps/v1/StatefulSet': StatefulSet,
  'v1/Service': Service,
  'v1/ServiceAccount': ServiceAccount,
  'v1/Pod': Pod,
  'policy/v1/PodDisruptionBudget': PodDisruptionBudget,
  'networking.k8s.io/v1/NetworkPolicy': NetworkPolicy,
  'monitoring.coreos.com/v1/ServiceMonitor': ServiceMonitor,
};

const SCENARIOS = [...scenarios()];
const values = (file: string) => ({ ...(parse(readFileSync(join(CHART_DIR, 'values.yaml'), 'utf8')) as K8s), ...(parse(readFileSync(file, 'utf8')) as K8s) });

/** The objects of a rendering, by kind (and the StatefulSet's container). */
function objects(text: string) {
  const all = [...objectsByName(text).values()] as K8s[];
  const of = (kind: string) => all.filter((o) => o.kind === kind);
  const sts = of('StatefulSet')[0];
  return { all, of, sts, container: sts.spec.template.spec.containers[0] };
}

/** The environment a pod's container gets, $(POD_NAME) expanded as the kubelet does. */
function podEnv(container: K8s, pod: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const e of container.env as { name: string; value?: string; valueFrom?: unknown }[]) {
    env[e.name] = e.name === 'POD_NAME' ? pod : (e.value ?? '').replace(/\$\((\w+)\)/g, (_, n: string) => env[n] ?? '');
  }
  return env;
}

describe.each(SCENARIOS)('chart rendered with ci/%s-values.yaml', (name, file) => {
  const text = renderScenario(file);
  const { all, of, sts, container } = objects(text);
  const v = values(file);

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
    const podLabels = sts.spec.template.metadata.labels as Record<string, string>;
    const selects = (selector: Record<string, string>) => Object.entries(selector).every(([k, x]) => podLabels[k] === x);
    expect(selects(sts.spec.selector.matchLabels)).toBe(true);
    // The StatefulSet's selector is immutable: only the stable labels.
    expect(Object.keys(sts.spec.selector.matchLabels).sort()).toEqual(['app.kubernetes.io/instance', 'app.kubernetes.io/name']);
    const services = of('Service');
    expect(services.map((s: K8s) => s.metadata.name).sort()).toEqual(['normserve', 'normserve-headless']);
    const headless = services.find((s: K8s) => s.spec.clusterIP === 'None');
    expect(sts.spec.serviceName).toBe(headless.metadata.name);
    const portNames = new Map((container.ports as { name: string; containerPort: number }[]).map((p) => [p.name, p.containerPort]));
    for (const s of services) {
      expect(selects(s.spec.selector)).toBe(true);
      for (const p of s.spec.ports) expect(portNames.get(p.targetPort), `${s.metadata.name} ${p.name}`).toBe(p.port);
    }
    for (const pdb of of('PodDisruptionBudget')) expect(selects(pdb.spec.selector.matchLabels)).toBe(true);
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
  });

  it('runs non-root on a read-only root, and gives the drain time to finish before the kill', () => {
    const pod = sts.spec.template.spec;
    expect(pod.securityContext).toMatchObject({ runAsNonRoot: true, runAsUser: 65532, fsGroup: 65532 });
    expect(container.securityContext).toMatchObject({ readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: { drop: ['ALL'] } });
    const preStop = container.lifecycle?.preStop?.sleep?.seconds ?? 0;
    expect(pod.terminationGracePeriodSeconds * 1000).toBeGreaterThan(preStop * 1000 + (v.config.shutdownGraceMs ?? SETTINGS.shutdownGraceMs.default));
  });

  it('gives every pod an environment the server accepts: every setting once, its own address among the peers', () => {
    const names = (container.env as { name: string }[]).map((e) => e.name);
    expect(new Set(names).size).toBe(names.length);
    for (const s of Object.values(SETTINGS)) expect(names, s.env).toContain(s.env);
    const replicas = sts.spec.replicas as number;
    for (let i = 0; i < replicas; i++) {
      const pod = `${sts.metadata.name}-${i}`;
      const config = loadConfig([], podEnv(container, pod))!;
      const peers = parsePeers(config.peers);
      expect(peers).toHaveLength(replicas);
      expect(peers.indexOf(config.selfAddress)).toBe(i);
      expect(config.selfAddress).toBe(`${pod}.${sts.spec.serviceName}.${RELEASE.namespace}.svc.cluster.local:${config.port}`);
      expect(config.maxModules).toBe(v.config.maxModules ?? SETTINGS.maxModules.default);
      const mounted = (path: string) => path === '' || container.volumeMounts.some((m: K8s) => path.startsWith(`${m.mountPath}/`));
      for (const path of [config.tlsCert, config.tlsKey, config.tlsClientCa, config.authTokensFile]) expect(mounted(path), path).toBe(true);
      expect(config.dataDir).toBe(container.volumeMounts.find((m: K8s) => m.name === 'data').mountPath);
    }
  });
});

describe('the chart', () => {
  const render = (set: Record<string, unknown>) => renderChart(CHART_DIR, { ...RELEASE, set });

  it('lists only the first placement.replicas pods as peers while the others are scaled away', () => {
    const { sts, container } = objects(renderScenario(SCENARIOS[0]![1], { replicaCount: 3, 'placement.replicas': 2 }));
    expect(sts.spec.replicas).toBe(3);
    const leaving = loadConfig([], podEnv(container, 'normserve-2'))!;
    expect(parsePeers(leaving.peers)).toEqual(['normserve-0', 'normserve-1'].map((p) => `${p}.normserve-headless.ml.svc.cluster.local:50051`));
    expect(parsePeers(leaving.peers)).not.toContain(leaving.selfAddress);
  });

  it('refuses values that cannot work, saying what to change', () => {
    const refusals: [Record<string, unknown>, string][] = [
      [{ terminationGracePeriodSeconds: 10 }, 'terminationGracePeriodSeconds (10 s) must exceed preStopSleepSeconds plus config.shutdownGraceMs (10000 ms)'],
      [{ preStopSleepSeconds: 25 }, 'terminationGracePeriodSeconds (30 s) must exceed preStopSleepSeconds plus config.shutdownGraceMs (35000 ms)'],
      [{ 'tls.enabled': true }, 'tls.enabled needs tls.secretName'],
      [{ 'tls.clientAuth': true }, 'tls.clientAuth needs tls.enabled'],
      [{ 'auth.enabled': true }, 'auth.enabled needs auth.existingSecret'],
      [{ replicaCount: 2, 'placement.replicas': 3 }, 'placement.replicas (3) cannot exceed replicaCount (2)'],
      [{ replicaCount: 'two' }, 'replicaCount'],
    ];
    for (const [set, message] of refusals) expect(() => render(set), JSON.stringify(set)).toThrow(message);
  });

  it('prints how to connect, the peers and the rebalance command in its notes, and warns without persistence', () => {
    const { notes } = renderChart(CHART_DIR, { ...RELEASE, set: { replicaCount: 2, 'persistence.enabled': false } });
    expect(notes).toContain('normserve.ml.svc.cluster.local:50051');
    expect(notes).toContain('normserve-0.normserve-headless.ml.svc.cluster.local:50051,normserve-1.normserve-headless.ml.svc.cluster.local:50051');
    expect(notes).toContain('dist/src/cli/rebalance.js --peers');
    expect(notes).toContain('WARNING: persistence.enabled is false');
    const { of } = objects(renderChart(CHART_DIR, { ...RELEASE, set: { 'persistence.enabled': false } }).manifests.map((m) => `---\n${m.text}\n`).join(''));
    expect(of('StatefulSet')[0].spec.volumeClaimTemplates).toBeUndefined();
    expect(of('StatefulSet')[0].spec.template.spec.volumes).toContainEqual({ name: 'data', emptyDir: {} });
  });
});
