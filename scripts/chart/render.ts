#!/usr/bin/env node
/**
 * Renders the chart for each helm/normserve/ci/<name>-values.yaml with the subset renderer
 * (helm.ts), in `helm template` form, into test/fixtures/chart/<name>.yaml (--write) or to
 * stdout. test/unit/chart.test.ts fails when the fixtures and the templates drift apart;
 * scripts/check-deploy.sh compares them with real `helm template` output where helm exists.
 *
 *   node dist/scripts/chart/render.js [--write]
 */
import { mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { renderChart, type RenderOptions } from './helm.js';

export const CHART_DIR = 'helm/normserve';
export const FIXTURES_DIR = 'test/fixtures/chart';

/** The release the fixtures are rendered for (scripts/check-deploy.sh renders the same). */
export const RELEASE: Omit<RenderOptions, 'valuesFiles'> = {
  releaseName: 'normserve',
  namespace: 'ml',
  kubeVersion: '1.30.0',
  apiVersions: ['monitoring.coreos.com/v1'],
};

/** The ci values files, by scenario name. */
export function scenarios(): Map<string, string> {
  return new Map(
    readdirSync(join(CHART_DIR, 'ci'))
      .filter((f) => f.endsWith('-values.yaml'))
      .sort()
      .map((f) => [f.replace(/-values\.yaml$/, ''), join(CHART_DIR, 'ci', f)]),
  );
}

/** The manifests of one scenario as `helm template` prints them. */
export function renderScenario(valuesFile: string, overrides: RenderOptions['set'] = {}): string {
  const { manifests } = renderChart(CHART_DIR, { ...RELEASE, valuesFiles: [valuesFile], set: overrides });
  return manifests.map((m) => `---\n# Source: ${m.template}\n${m.text}\n`).join('');
}

if (process.argv[1]?.endsWith('render.js')) {
  const write = process.argv.includes('--write');
  if (write) mkdirSync(FIXTURES_DIR, { recursive: true });
  for (const [name, file] of scenarios()) {
    const text = renderScenario(file);
    if (write) writeFileSync(join(FIXTURES_DIR, `${name}.yaml`), text);
    else process.stdout.write(`# ${name}\n${text}`);
  }
}
