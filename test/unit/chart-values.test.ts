/**
 * The Helm chart's plain files, checked without helm (none can be installed here): values
 * against values.schema.json (ajv, JSON Schema draft-07 as helm reads it), the YAML with
 * yamllint, and the values' server settings against src/config.ts. Rendering the templates is
 * test/unit/chart.test.ts.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Ajv } from 'ajv';
import { parse } from 'yaml';
import { describe, expect, it } from 'vitest';
import { CHART_MANAGED, chartConfigSchema, SETTINGS } from '../../src/config.js';

const CHART = 'helm/normserve';
const read = (path: string) => parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
const values = read(join(CHART, 'values.yaml'));
const schema = JSON.parse(readFileSync(join(CHART, 'values.schema.json'), 'utf8')) as Record<string, unknown>;
const ciFiles = readdirSync(join(CHART, 'ci')).map((f) => join(CHART, 'ci', f));

/** Helm merges values files over values.yaml: maps merge key by key, anything else replaces. */
function merge(base: unknown, over: unknown): unknown {
  if (over === null) return undefined;
  if (typeof base !== 'object' || base === null || Array.isArray(base) || typeof over !== 'object' || Array.isArray(over)) return over;
  const out: Record<string, unknown> = { ...(base as Record<string, unknown>) };
  for (const [k, v] of Object.entries(over as Record<string, unknown>)) {
    const m = merge(out[k], v);
    if (m === undefined) delete out[k];
    else out[k] = m;
  }
  return out;
}

const ajv = new Ajv({ allErrors: true, strict: true });
const validate = ajv.compile(schema);
const errors = (v: unknown) => (validate(v) ? [] : validate.errors!.map((e) => `${e.instancePath} ${e.message}`));

describe('values.schema.json', () => {
  it('accepts values.yaml and every ci/*-values.yaml merged over it', () => {
    expect(errors(values)).toEqual([]);
    expect(ciFiles.length).toBeGreaterThanOrEqual(2);
    for (const f of ciFiles) expect(errors(merge(values, read(f))), f).toEqual([]);
  });

  it('refuses what helm install should refuse, naming the value', () => {
    const bad: [unknown, string][] = [
      [{ replicaCount: 'two' }, '/replicaCount must be integer'],
      [{ replicaCount: 0 }, '/replicaCount must be >= 1'],
      [{ replicaCuont: 2 }, ' must NOT have additional properties'],
      [{ config: { backend: 'tpu' } }, '/config/backend must be equal to one of the allowed values'],
      [{ config: { durability: 'fast' } }, '/config/durability must be equal to one of the allowed values'],
      [{ config: { maxModules: 0 } }, '/config/maxModules must be >= 1'],
      [{ config: { maxTensorElements: 2 ** 25 } }, '/config/maxTensorElements must be <= 16777216'],
      [{ config: { port: 1 } }, '/config must NOT have additional properties'],
      [{ ports: { grpc: 70000 } }, '/ports/grpc must be <= 65535'],
      [{ persistence: { size: 'lots' } }, '/persistence/size must match pattern "^[0-9]+(\\.[0-9]+)?([EPTGMK]i?|[mkMGTPE])?$"'],
      [{ probes: { liveness: { enabled: 'yes' } } }, '/probes/liveness/enabled must be boolean'],
      [{ metrics: { serviceMonitor: { interval: 'often' } } }, '/metrics/serviceMonitor/interval must match pattern "^[0-9]+(ms|s|m|h)$"'],
      [{ image: { pullPolicy: 'Sometimes' } }, '/image/pullPolicy must be equal to one of the allowed values'],
    ];
    for (const [over, message] of bad) expect(errors(merge(values, over)), JSON.stringify(over)).toContain(message);
  });

  it('describes `config` exactly as src/config.ts does (scripts/update-doc-tables.mjs writes it)', () => {
    expect((schema.properties as Record<string, unknown>).config).toEqual(chartConfigSchema());
  });
});

describe('values.yaml', () => {
  it('sets every server setting: the chart-managed ones from its own values, the rest under `config` with the program\'s defaults', () => {
    const config = values.config as Record<string, unknown>;
    const expected = Object.fromEntries(Object.entries(SETTINGS).filter(([k]) => !(k in CHART_MANAGED)).map(([k, s]) => [k, s.default]));
    expect(config).toEqual(expected);
    const ports = values.ports as Record<string, number>;
    expect([ports.grpc, ports.metrics]).toEqual([SETTINGS.port.default, SETTINGS.metricsPort.default]);
  });
});

describe('docs/deployment.md', () => {
  it('lists every value of values.yaml with its default', () => {
    const leaves: [string, unknown][] = [];
    const walk = (node: Record<string, unknown>, path: string[]) => {
      for (const [k, v] of Object.entries(node)) {
        const isMap = v !== null && typeof v === 'object' && !Array.isArray(v);
        if (isMap && Object.keys(v).length > 0) walk(v as Record<string, unknown>, [...path, k]);
        else leaves.push([[...path, k].join('.'), v]);
      }
    };
    walk(values, []);
    const lines = readFileSync('docs/deployment.md', 'utf8').split('\n');
    const start = lines.indexOf('| value | default |');
    const after = lines.slice(start + 2);
    const rows = after.slice(0, after.findIndex((line) => !line.startsWith('|')));
    expect(rows).toEqual(leaves.map(([path, v]) => `| \`${path}\` | \`${JSON.stringify(v)}\` |`));
  });
});

describe('YAML', () => {
  it('passes yamllint: Chart.yaml, values.yaml and the ci values', () => {
    const r = spawnSync('yamllint', ['-c', '.yamllint.yaml', '-f', 'parsable', join(CHART, 'Chart.yaml'), join(CHART, 'values.yaml'), ...ciFiles], { encoding: 'utf8' });
    expect(r.error, 'yamllint is installed (scripts/test-all.sh installs it)').toBeUndefined();
    expect(r.stdout).toBe('');
    expect(r.status).toBe(0);
  });

  it('versions the chart\'s app as the package and the image', () => {
    const chart = read(join(CHART, 'Chart.yaml'));
    const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as { version: string };
    expect(chart.appVersion).toBe(pkg.version);
    expect(readFileSync('Dockerfile', 'utf8')).toContain(`org.opencontainers.image.version="${pkg.version}"`);
    expect(chart.apiVersion).toBe('v2');
    expect(execFileSync('yamllint', ['--version']).toString()).toMatch(/^yamllint \d/);
  });
});
