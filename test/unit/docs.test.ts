/**
 * The documentation tables that mirror code: docs/errors.md (the error catalogue) and
 * docs/configuration.md (the settings). A change to either side without the other fails here.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { SETTINGS } from '../../src/config.js';
import { catalogue, statusName } from '../../src/errors.js';
import { API_DOC, renderApiDocs } from '../../scripts/api-docs.js';


/** The rows of the first Markdown table in a file whose header starts with `first`. */
function tableRows(path: string, first: string): string[][] {
  const lines = readFileSync(path, 'utf8').split('\n');
  const start = lines.findIndex((l) => l.startsWith(`| ${first} `));
  expect(start, `${path} has a table starting with "${first}"`).toBeGreaterThanOrEqual(0);
  const rows: string[][] = [];
  for (const line of lines.slice(start + 2)) {
    if (!line.startsWith('|')) break;
    rows.push(line.slice(1, -1).split(' | ').map((cell) => cell.trim()));
  }
  return rows;
}

const unquote = (cell: string) => cell.replace(/^`|`$/g, '');

describe('docs/errors.md', () => {
  it('lists every catalogue error with its status, PyTorch type and message, in order', () => {
    const rows = tableRows('docs/errors.md', 'code');
    const expected = Object.entries(catalogue).map(([code, e]) => [
      `\`${code}\``,
      statusName(e.status),
      'pythonType' in e ? e.pythonType : '',
      `\`${e.template.replace(/\n/g, '\\n').replace(/\t/g, '\\t')}\``,
    ]);
    expect(rows).toEqual(expected);
  });
});

describe('docs/configuration.md', () => {
  it('lists every setting with its flag, variable and default', () => {
    const rows = tableRows('docs/configuration.md', 'flag').map((r) => r.slice(0, 3).map(unquote));
    const expected = Object.values(SETTINGS).map((s) => [`--${s.flag}`, s.env, String(s.default)]);
    expect(rows).toEqual(expected);
  });
});

describe('docs/operations.md', () => {
  it('says what every metric of docs/metrics.md means in operation', () => {
    const metrics = tableRows('docs/metrics.md', 'metric').map((r) => r[0]!);
    const operations = tableRows('docs/operations.md', 'metric').map((r) => r[0]!).join(', ');
    for (const m of metrics) expect(operations, m).toContain(m);
  });
});

describe('docs/api.md', () => {
  it('is the reference the protos generate (node dist/scripts/api-docs.js --write)', () => {
    expect(readFileSync(API_DOC, 'utf8')).toBe(renderApiDocs());
  });
});
