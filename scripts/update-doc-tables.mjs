// Rewrites the tables in docs/errors.md and docs/configuration.md from the error catalogue and the
// settings (after npm run build). test/unit/docs.test.ts fails when they drift apart.
import { catalogue, Status } from '../dist/src/errors.js';
import { SETTINGS } from '../dist/src/config.js';
import { readFileSync, writeFileSync } from 'node:fs';
const names = Object.fromEntries(Object.entries(Status).map(([k,v])=>[v,k]));
const errRows = Object.entries(catalogue).map(([code, e]) => '| `'+code+'` | '+names[e.status]+' | '+(e.pythonType??'')+' | `'+e.template.replace(/\n/g,'\\n').replace(/\t/g,'\\t')+'` |');
const cfgRows = Object.values(SETTINGS).map(s => '| `--'+s.flag+'` | `'+s.env+'` | `'+s.default+'` | '+s.description+' |');
function replaceTable(path, header, rows) {
  const lines = readFileSync(path, 'utf8').split('\n');
  const start = lines.findIndex(l => l.startsWith('| ' + header + ' '));
  let end = start + 2; while (lines[end]?.startsWith('|')) end++;
  lines.splice(start + 2, end - start - 2, ...rows);
  writeFileSync(path, lines.join('\n'));
}
replaceTable('docs/errors.md', 'code', errRows);
replaceTable('docs/configuration.md', 'flag', cfgRows);
