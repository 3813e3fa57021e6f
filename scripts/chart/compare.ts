#!/usr/bin/env node
/**
 * Compares two multi-document YAML streams as Kubernetes objects, ignoring document order,
 * comments and formatting: `helm template` output against the expected manifests in
 * test/fixtures/chart/ (scripts/check-deploy.sh), so that real helm confirms what the tests here
 * render with the subset renderer.
 *
 *   node dist/scripts/chart/compare.js ACTUAL.yaml EXPECTED.yaml
 *
 * Exits 0 when both hold the same objects, 1 with the differences otherwise.
 */
import { readFileSync } from 'node:fs';
import { isDeepStrictEqual } from 'node:util';
import { parseAllDocuments } from 'yaml';

type Obj = Record<string, unknown> & { kind?: string; metadata?: { name?: string } };

/** The objects of a stream, by `Kind/name`. */
export function objectsByName(text: string): Map<string, Obj> {
  const out = new Map<string, Obj>();
  for (const doc of parseAllDocuments(text)) {
    if (doc.errors.length > 0) throw new Error(doc.errors.map((e) => e.message).join('; '));
    const obj = doc.toJS() as Obj | null;
    if (obj === null) continue;
    out.set(`${obj.kind}/${obj.metadata?.name}`, obj);
  }
  return out;
}

/** Differences between two streams, one line each; empty when they hold the same objects. */
export function compareManifests(actual: string, expected: string): string[] {
  const a = objectsByName(actual);
  const e = objectsByName(expected);
  const diffs: string[] = [];
  for (const key of new Set([...a.keys(), ...e.keys()])) {
    if (!a.has(key)) diffs.push(`${key}: expected, not rendered`);
    else if (!e.has(key)) diffs.push(`${key}: rendered, not expected`);
    else diffs.push(...diff(a.get(key), e.get(key), key));
  }
  return diffs;
}

function diff(a: unknown, e: unknown, path: string): string[] {
  if (isDeepStrictEqual(a, e)) return [];
  const isMap = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
  if (isMap(a) && isMap(e)) return [...new Set([...Object.keys(a), ...Object.keys(e)])].flatMap((k) => diff(a[k], e[k], `${path}.${k}`));
  if (Array.isArray(a) && Array.isArray(e) && a.length === e.length) return a.flatMap((v, i) => diff(v, e[i], `${path}[${i}]`));
  return [`${path}: ${JSON.stringify(a)} rendered, ${JSON.stringify(e)} expected`];
}

if (process.argv[1]?.endsWith('compare.js')) {
  const [actual, expected] = process.argv.slice(2);
  if (!actual || !expected) {
    process.stderr.write('usage: compare.js ACTUAL.yaml EXPECTED.yaml\n');
    process.exit(2);
  }
  const diffs = compareManifests(readFileSync(actual, 'utf8'), readFileSync(expected, 'utf8'));
  for (const d of diffs) process.stdout.write(`${d}\n`);
  process.exit(diffs.length === 0 ? 0 : 1);
}
