// Rewrites the tables in docs/errors.md and docs/configuration.md from the error catalogue and the
// settings, the values table of docs/deployment.md from the chart's values.yaml, and the `config` part of the Helm chart's values.schema.json from the settings (after
// npm run build). test/unit/docs.test.ts and test/unit/chart.test.ts fail when they drift apart.
import { catalogue, statusName } from '../dist/src/errors.js';
import { SETTINGS, helmValue, chartConfigSchema } from '../dist/src/config.js';
import { readFileSync, writeFileSync } from 'node:fs';
import { parse } from 'yaml';
const errRows = Object.entries(catalogue).map(([code, e]) => '| `'+code+'` | '+statusName(e.status)+' | '+(e.pythonType??'')+' | `'+e.template.replace(/\n/g,'\\n').replace(/\t/g,'\\t')+'` |');
const cfgRows = Object.entries(SETTINGS).map(([k, s]) => '| `--'+s.flag+'` | `'+s.env+'` | `'+s.default+'` | `'+helmValue(k)+'` | '+s.description+' |');
function replaceTable(path, header, rows) {
  const lines = readFileSync(path, 'utf8').split('\n');
  const start = lines.findIndex(l => l.startsWith('| ' + header + ' '));
  let end = start + 2; while (lines[end]?.startsWith('|')) end++;
  lines.splice(start + 2, end - start - 2, ...rows);
  writeFileSync(path, lines.join('\n'));
}
replaceTable('docs/errors.md', 'code', errRows);
replaceTable('docs/configuration.md', 'flag', cfgRows);

const schemaPath = 'helm/normserve/values.schema.json';
const schema = JSON.parse(readFileSync(schemaPath, 'utf8'));
schema.properties.config = chartConfigSchema();
writeFileSync(schemaPath, JSON.stringify(schema, null, 2) + '\n');

/** values.yaml's leaves (empty maps and lists count as leaves), as `path` and its default in JSON. */
function valueRows(values, prefix = '') {
  return Object.entries(values).flatMap(([k, v]) =>
    v !== null && typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length > 0
      ? valueRows(v, `${prefix}${k}.`)
      : ['| `' + prefix + k + '` | `' + JSON.stringify(v) + '` |'],
  );
}
replaceTable('docs/deployment.md', 'value', valueRows(parse(readFileSync('helm/normserve/values.yaml', 'utf8'))));
