/**
 * Helm 3 chart rendering (`helm template`) on top of go-template.ts, for checking a chart on machines
 * without helm. Behaviour follows helm/helm dev-v3: pkg/chart/loader/directory.go (loading, .helmignore),
 * pkg/cli/values/options.go (merging -f files), pkg/chartutil/{coalesce.go,values.go,jsonschema.go,
 * capabilities.go}, pkg/engine/engine.go (rendering), pkg/action/action.go renderResources and
 * pkg/releaseutil/manifest.go (NOTES.txt, splitting documents). Values files are read the way
 * sigs.k8s.io/yaml reads them: goyaml v2 (YAML 1.1 scalars) through JSON, so every number is a float64.
 *
 * Not supported, and refused with an error: subcharts (charts/, dependencies), library charts,
 * .Files, YAML merge keys and explicit tags other than !!str.
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join, posix } from 'node:path';
import AjvModule from 'ajv';
import Ajv2019Module from 'ajv/dist/2019.js';
import Ajv2020Module from 'ajv/dist/2020.js';
import { isAlias, isMap as isYamlMap, isScalar, isSeq, parseAllDocuments, type Document, type Node as YamlNode } from 'yaml';
import {
  execute,
  FuncError,
  GoInt,
  GoStruct,
  isMap,
  parseTemplates,
  resolvePlain,
  semverCompare,
  typedSlice,
  type GoFunc,
  type GoMap,
  type GoValue,
} from './go-template.js';

export interface RenderOptions {
  /** Extra values files, applied in order after the chart's values.yaml (helm -f). */
  valuesFiles?: string[];
  /**
   * Values set last (helm --set), by dotted path ("a.b.c"). Integers become int64, as --set types them;
   * other values are taken as they are (as --set-json would). null deletes the key, as with helm.
   */
  set?: Record<string, unknown>;
  releaseName: string;
  namespace: string;
  /** Defaults to v1.36.0: Helm's Makefile sets the default to client-go's minor (v0.36 in dev-v3). */
  kubeVersion?: string;
  /** Added to the built-in API versions, as `helm template --api-versions`. */
  apiVersions?: string[];
  /** Defaults to true (helm install / helm template). */
  isInstall?: boolean;
}

export interface RenderedManifest {
  /** Template name as Helm reports it: "<chart>/templates/<file>". */
  template: string;
  /** One YAML document, trimmed, as in `helm template` output after "# Source:". */
  text: string;
}

export interface RenderResult {
  manifests: RenderedManifest[];
  notes: string;
}

export class ChartError extends Error {
  override name = 'ChartError';
}

// ───────────────────────────── YAML as sigs.k8s.io/yaml reads it ─────────────────────────────

const STR_TAGS = new Set(['tag:yaml.org,2002:str', '!!str']);

/**
 * Parse YAML as sigs.k8s.io/yaml.Unmarshal into interface{} does: goyaml v2 decodes the first document
 * with YAML 1.1 plain-scalar rules (resolve.go: yes/no/on/off are booleans, 0777 is octal, timestamps
 * stay strings), map keys become strings, and the JSON round trip turns every number into a float64.
 */
export function parseGoYaml(text: string, file: string): GoValue {
  const docs = parseAllDocuments(text, { schema: 'failsafe', uniqueKeys: false });
  if (!Array.isArray(docs)) throw new ChartError(`${file}: not a YAML stream`);
  const doc = docs[0];
  if (!doc) return null;
  const error = doc.errors[0];
  if (error) throw new ChartError(`${file}: ${error.message}`);
  return doc.contents ? yamlNode(doc.contents, doc, file) : null;
}

function yamlNode(node: YamlNode, doc: Document, file: string): GoValue {
  if (isAlias(node)) {
    const target = node.resolve(doc);
    if (!target) throw new ChartError(`${file}: unknown anchor ${node.source}`);
    return yamlNode(target, doc, file);
  }
  if (isScalar(node)) return yamlScalar(node.value, node.type, node.tag, file);
  if (isSeq(node)) return node.items.map((item) => yamlNode(item as YamlNode, doc, file));
  if (isYamlMap(node)) {
    const out: GoMap = {};
    for (const pair of node.items) {
      const keyNode = pair.key as YamlNode;
      const key = isScalar(keyNode) ? yamlKey(keyNode.value, keyNode.type, keyNode.tag, file) : unsupported(file, 'non-scalar map keys');
      out[key] = pair.value === null ? null : yamlNode(pair.value as YamlNode, doc, file);
    }
    return out;
  }
  return unsupported(file, `YAML node ${String(node)}`);
}

function unsupported(file: string, what: string): never {
  throw new ChartError(`${file}: ${what} are not supported by this renderer`);
}

function yamlScalar(value: unknown, type: string | undefined, tag: string | undefined, file: string): GoValue {
  const text = String(value);
  if (tag !== undefined && !STR_TAGS.has(tag)) unsupported(file, `explicit YAML tags (${tag})`);
  if (type !== 'PLAIN' || tag !== undefined) return text;
  const r = resolvePlain(text);
  switch (r.tag) {
    case 'null':
      return null;
    case 'bool':
      return r.value as boolean;
    case 'int':
      return Number(r.value);
    case 'float':
      if (!Number.isFinite(r.value as number)) throw new ChartError(`${file}: error converting YAML to JSON: json: unsupported value: ${text}`);
      return r.value as number;
    default:
      return text;
  }
}

/** sigs.k8s.io/yaml convertToJSONableObject: keys of other types become strings. */
function yamlKey(value: unknown, type: string | undefined, tag: string | undefined, file: string): string {
  const text = String(value);
  if (text === '<<' && type === 'PLAIN') unsupported(file, 'YAML merge keys (<<)');
  const v = yamlScalar(value, type, tag, file);
  if (typeof v === 'string') return v;
  if (typeof v === 'boolean') return String(v);
  if (v === null) throw new ChartError(`${file}: error converting YAML to JSON: unsupported map key of type: <nil>`);
  if (typeof v === 'number' && resolvePlain(text).tag === 'int') return String(resolvePlain(text).value);
  return unsupported(file, `float map keys (${text})`);
}

// ───────────────────────────── chart loading ─────────────────────────────

interface Chart {
  metadata: GoMap;
  values: GoMap;
  schema?: unknown;
  /** Template file path relative to the chart ("templates/x.yaml") → text. */
  templates: Map<string, string>;
}

/** filepath.Match as a RegExp (no path separator crossing for * and ?). */
function globRegExp(pattern: string): RegExp {
  let re = '';
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i] ?? '';
    if (c === '*') re += '[^/]*';
    else if (c === '?') re += '[^/]';
    else if (c === '\\') re += `\\${pattern[++i] ?? ''}`;
    else if (c === '[') {
      const end = pattern.indexOf(']', i + 2);
      if (end < 0) throw new ChartError(`.helmignore: syntax error in pattern ${pattern}`);
      const body = pattern.slice(i + 1, end).replace(/^\^/, '^').replace(/\\/g, '\\\\');
      re += `[${body}]`;
      i = end;
    } else re += c.replace(/[.+^${}()|]/g, '\\$&');
  }
  return new RegExp(`^${re}$`);
}

interface IgnoreRule {
  negate: boolean;
  mustDir: boolean;
  match: (path: string) => boolean;
}

/** pkg/ignore/rules.go parseRule. */
function parseIgnoreRule(raw: string): IgnoreRule | undefined {
  let rule = raw.trim();
  if (rule === '' || rule.startsWith('#')) return undefined;
  if (rule.includes('**')) throw new ChartError('.helmignore: double-star (**) syntax is not supported');
  const negate = rule.startsWith('!');
  if (negate) rule = rule.slice(1);
  const mustDir = rule.endsWith('/');
  if (mustDir) rule = rule.slice(0, -1);
  if (rule.startsWith('/')) {
    const re = globRegExp(rule.slice(1));
    return { negate, mustDir, match: (p) => re.test(p) };
  }
  const re = globRegExp(rule);
  if (rule.includes('/')) return { negate, mustDir, match: (p) => re.test(p) };
  return { negate, mustDir, match: (p) => re.test(posix.basename(p)) };
}

/** pkg/ignore/rules.go Ignore, with its treatment of negated rules. */
function ignored(rules: IgnoreRule[], path: string, isDir: boolean): boolean {
  for (const r of rules) {
    if (r.negate) {
      if (r.mustDir && !isDir) return true;
      if (!r.match(path)) return true;
      continue;
    }
    if (r.mustDir && !isDir) continue;
    if (r.match(path)) return true;
  }
  return false;
}

/** loader.LoadDir: every file that .helmignore (plus the default "templates/.?*") does not exclude. */
function listChartFiles(chartDir: string): Map<string, string> {
  const ignoreFile = join(chartDir, '.helmignore');
  const rules = (existsSync(ignoreFile) ? readFileSync(ignoreFile, 'utf8').split('\n') : [])
    .concat('templates/.?*')
    .map(parseIgnoreRule)
    .filter((r): r is IgnoreRule => r !== undefined);
  const files = new Map<string, string>();
  const walk = (rel: string): void => {
    for (const entry of readdirSync(join(chartDir, rel)).sort()) {
      const path = rel ? `${rel}/${entry}` : entry;
      const isDir = statSync(join(chartDir, path)).isDirectory();
      if (ignored(rules, path, isDir)) continue;
      if (isDir) walk(path);
      else files.set(path, readFileSync(join(chartDir, path), 'utf8').replace(/^\uFEFF/, ''));
    }
  };
  walk('');
  return files;
}

/** chart.Metadata fields by JSON name (pkg/chart/metadata.go); matched case-insensitively, as encoding/json does. */
const METADATA_FIELDS: Record<string, { go: string; kind: 'string' | 'strings' | 'bool' | 'map' | 'any' }> = {
  name: { go: 'Name', kind: 'string' },
  home: { go: 'Home', kind: 'string' },
  sources: { go: 'Sources', kind: 'strings' },
  version: { go: 'Version', kind: 'string' },
  description: { go: 'Description', kind: 'string' },
  keywords: { go: 'Keywords', kind: 'strings' },
  maintainers: { go: 'Maintainers', kind: 'any' },
  icon: { go: 'Icon', kind: 'string' },
  apiversion: { go: 'APIVersion', kind: 'string' },
  condition: { go: 'Condition', kind: 'string' },
  tags: { go: 'Tags', kind: 'string' },
  appversion: { go: 'AppVersion', kind: 'string' },
  deprecated: { go: 'Deprecated', kind: 'bool' },
  annotations: { go: 'Annotations', kind: 'map' },
  kubeversion: { go: 'KubeVersion', kind: 'string' },
  dependencies: { go: 'Dependencies', kind: 'any' },
  type: { go: 'Type', kind: 'string' },
};

/** sigs.k8s.io/yaml turns a YAML number destined for a string field into text (yaml.go convertToJSONableObject). */
function metadataString(v: GoValue, key: string, raw: string | undefined): string {
  if (typeof v === 'string') return v;
  if (typeof v === 'boolean') return String(v);
  if (v === null) return '';
  if (typeof v === 'number' && raw !== undefined && resolvePlain(raw).tag === 'int') return String(resolvePlain(raw).value);
  throw new ChartError(`Chart.yaml: ${key} is not a string; quote it (converting this value to text is not supported by this renderer)`);
}

function readMetadata(text: string): GoMap {
  const parsed = parseGoYaml(text, 'Chart.yaml');
  if (!isMap(parsed)) throw new ChartError('Chart.yaml: not a YAML map');
  const rawScalars = new Map<string, string>();
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z]+):\s*([^#\s][^#]*?)\s*$/.exec(line);
    if (m?.[1] && m[2] !== undefined) rawScalars.set(m[1].toLowerCase(), m[2]);
  }
  const meta: GoMap = {};
  for (const { go, kind } of Object.values(METADATA_FIELDS)) {
    meta[go] = kind === 'string' ? '' : kind === 'bool' ? false : kind === 'strings' ? typedSlice([], { elem: 'string' }) : null;
  }
  for (const [key, value] of Object.entries(parsed)) {
    const field = METADATA_FIELDS[key.toLowerCase()];
    if (!field) continue;
    if (field.kind === 'string') meta[field.go] = metadataString(value, key, rawScalars.get(key.toLowerCase()));
    else if (field.kind === 'strings') meta[field.go] = typedSlice(Array.isArray(value) ? value.map((x) => metadataString(x, key, undefined)) : [], { elem: 'string' });
    else if (field.kind === 'bool') meta[field.go] = value === true;
    else meta[field.go] = value;
  }
  return meta;
}

/** chart.Metadata.Validate (pkg/chart/metadata.go), for the fields a render depends on. */
function validateMetadata(meta: GoMap): void {
  if (meta.APIVersion === '') throw new ChartError('validation: chart.metadata.apiVersion is required');
  if (meta.Name === '') throw new ChartError('validation: chart.metadata.name is required');
  if (typeof meta.Name === 'string' && (meta.Name.includes('/') || meta.Name.includes('..'))) {
    throw new ChartError(`validation: chart.metadata.name ${JSON.stringify(meta.Name)} is invalid`);
  }
  if (meta.Version === '') throw new ChartError('validation: chart.metadata.version is required');
  if (!/^v?\d+(\.\d+)?(\.\d+)?(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$/.test(String(meta.Version))) {
    throw new ChartError(`validation: chart.metadata.version ${JSON.stringify(meta.Version)} is invalid`);
  }
  if (meta.Type === 'library') throw new ChartError('library charts are not installable');
  if (meta.Type !== '' && meta.Type !== 'application') throw new ChartError('validation: chart.metadata.type must be application or library');
  if (meta.Dependencies !== null) throw new ChartError('Chart.yaml: chart dependencies are not supported by this renderer');
}

function loadChart(chartDir: string): Chart {
  const files = listChartFiles(chartDir);
  const chartYaml = files.get('Chart.yaml');
  if (chartYaml === undefined) throw new ChartError(`${chartDir}: Chart.yaml file is missing`);
  const metadata = readMetadata(chartYaml);
  validateMetadata(metadata);
  if ([...files.keys()].some((f) => f.startsWith('charts/'))) throw new ChartError('subcharts (charts/) are not supported by this renderer');
  if (files.has('requirements.yaml')) throw new ChartError('requirements.yaml (chart dependencies) is not supported by this renderer');
  const valuesText = files.get('values.yaml');
  const schemaText = files.get('values.schema.json');
  const templates = new Map([...files].filter(([name]) => name.startsWith('templates/')));
  return {
    metadata,
    values: valuesText === undefined ? {} : readValues(valuesText, 'values.yaml'),
    schema: schemaText === undefined ? undefined : JSON.parse(schemaText),
    templates,
  };
}

// ───────────────────────────── values ─────────────────────────────

/** chartutil.ReadValues: an empty document is an empty map; anything but a map is an error. */
function readValues(text: string, file: string): GoMap {
  const v = parseGoYaml(text, file);
  if (v === null || (isMap(v) && Object.keys(v).length === 0)) return {};
  if (!isMap(v)) {
    const kind = Array.isArray(v) ? 'array' : typeof v === 'string' ? 'string' : typeof v === 'boolean' ? 'bool' : 'number';
    throw new ChartError(`${file}: error unmarshaling JSON: json: cannot unmarshal ${kind} into Go value of type chartutil.Values`);
  }
  return v;
}

/** pkg/cli/values/options.go mergeMaps: later files win; maps merge; null is kept (coalesce deletes it). */
function mergeValueMaps(a: GoMap, b: GoMap): GoMap {
  const out: GoMap = { ...a };
  for (const [k, v] of Object.entries(b)) {
    const prev = out[k];
    out[k] = isMap(v) && isMap(prev) ? mergeValueMaps(prev, v) : (v ?? null);
  }
  return out;
}

/** A JS value for --set: integers as int64 (strvals typedVal), the rest as --set-json would read it. */
function setValue(v: unknown, top: boolean): GoValue {
  if (v === null || v === undefined) return null;
  if (typeof v === 'number') return top && Number.isInteger(v) ? new GoInt(BigInt(v), 'int64') : v;
  if (typeof v === 'string' || typeof v === 'boolean') return v;
  if (Array.isArray(v)) return v.map((x) => setValue(x, false));
  if (typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, setValue(x, false)]));
  throw new ChartError(`set: unsupported value ${String(v)}`);
}

function applySet(values: GoMap, set: Record<string, unknown>): void {
  for (const [path, raw] of Object.entries(set)) {
    if (/[[\]\\,=]/.test(path) || path === '') throw new ChartError(`set: path ${JSON.stringify(path)} is not supported (dotted keys only)`);
    const keys = path.split('.');
    let target = values;
    keys.slice(0, -1).forEach((k) => {
      const next = target[k];
      if (next === undefined || next === null) target[k] = {};
      else if (!isMap(next)) throw new ChartError(`set: ${path}: ${k} is not a map`);
      target = target[k] as GoMap;
    });
    target[keys[keys.length - 1] ?? ''] = setValue(raw, true);
  }
}

const deepCopy = (v: GoValue): GoValue => {
  if (Array.isArray(v)) return v.map(deepCopy);
  if (isMap(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, deepCopy(x)]));
  return v;
};

/** chartutil coalesceValues for a chart without dependencies: user values over the chart's, null deletes. */
function coalesceValues(chartValues: GoMap, user: GoMap): GoMap {
  const v = deepCopy(user) as GoMap;
  const defaults = deepCopy(chartValues) as GoMap;
  for (const [key, val] of Object.entries(defaults)) {
    if (!Object.hasOwn(v, key)) {
      v[key] = val;
      continue;
    }
    const value = v[key];
    if (value === null) delete v[key];
    else if (isMap(value) && isMap(val)) coalesceTables(value, val);
  }
  return v;
}

/** chartutil coalesceTablesFullKey with merge=false: dst (user) wins; a user null removes a chart default. */
function coalesceTables(dst: GoMap, src: GoMap): void {
  const srcOriginalNonNil = new Set(Object.keys(src).filter((k) => src[k] !== null));
  for (const [key, val] of Object.entries(dst)) if (val === null) src[key] = null;
  for (const [key, val] of Object.entries(src)) {
    const has = Object.hasOwn(dst, key);
    const dv = dst[key];
    if (has && dv === null && srcOriginalNonNil.has(key)) delete dst[key];
    else if (!has) dst[key] = val;
    else if (isMap(val) && isMap(dv)) coalesceTables(dv, val);
  }
}

/** Plain JSON data for the schema validator (int64 values as numbers). */
function toJsonData(v: GoValue): unknown {
  if (v instanceof GoInt) return Number(v.value);
  if (Array.isArray(v)) return v.map(toJsonData);
  if (isMap(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toJsonData(x)]));
  return v;
}

/**
 * chartutil.ValidateAgainstSchema. Helm ≥ 3.18 uses santhosh-tekuri/jsonschema v6, which follows the
 * schema's $schema and defaults to draft 2020-12; formats are annotations only. Ajv covers draft-07,
 * 2019-09 and 2020-12; other drafts are refused.
 */
function validateValues(schema: unknown, values: GoMap, chartName: string): void {
  const draft = typeof schema === 'object' && schema !== null ? (schema as { $schema?: unknown }).$schema : undefined;
  const options = { allErrors: true, strict: false, validateFormats: false };
  let ajv;
  if (draft === undefined || /draft\/2020-12\/schema/.test(String(draft))) ajv = new Ajv2020Module.default(options);
  else if (/draft\/2019-09\/schema/.test(String(draft))) ajv = new Ajv2019Module.default(options);
  else if (/draft-07\/schema/.test(String(draft))) ajv = new AjvModule.default(options);
  else throw new ChartError(`values.schema.json: $schema ${String(draft)} is not supported by this renderer`);
  const validate = ajv.compile(schema as object);
  if (validate(toJsonData(values))) return;
  const lines = (validate.errors ?? []).map((e) => `- at '${e.instancePath}': ${e.message ?? 'invalid'}${e.params && 'additionalProperty' in e.params ? ` '${String(e.params.additionalProperty)}'` : ''}`);
  throw new ChartError(`values don't meet the specifications of the schema(s) in the following chart(s):\n${chartName}:\n${lines.join('\n')}\n`);
}

// ───────────────────────────── render ─────────────────────────────

/** Group versions of client-go v0.36 kubernetes/scheme (register.go) plus apiextensions, as
 *  chartutil.DefaultVersionSet lists them (capabilities.go allKnownVersions). */
const DEFAULT_API_VERSIONS = [
  'v1', 'admissionregistration.k8s.io/v1', 'admissionregistration.k8s.io/v1alpha1', 'admissionregistration.k8s.io/v1beta1',
  'internal.apiserver.k8s.io/v1alpha1', 'apps/v1', 'apps/v1beta1', 'apps/v1beta2', 'authentication.k8s.io/v1',
  'authentication.k8s.io/v1alpha1', 'authentication.k8s.io/v1beta1', 'authorization.k8s.io/v1', 'authorization.k8s.io/v1beta1',
  'autoscaling/v1', 'autoscaling/v2', 'batch/v1', 'batch/v1beta1', 'certificates.k8s.io/v1', 'certificates.k8s.io/v1alpha1',
  'certificates.k8s.io/v1beta1', 'coordination.k8s.io/v1', 'coordination.k8s.io/v1alpha2', 'coordination.k8s.io/v1beta1',
  'discovery.k8s.io/v1', 'discovery.k8s.io/v1beta1', 'events.k8s.io/v1', 'events.k8s.io/v1beta1', 'extensions/v1beta1',
  'flowcontrol.apiserver.k8s.io/v1', 'flowcontrol.apiserver.k8s.io/v1beta1', 'flowcontrol.apiserver.k8s.io/v1beta2',
  'flowcontrol.apiserver.k8s.io/v1beta3', 'networking.k8s.io/v1', 'networking.k8s.io/v1beta1', 'node.k8s.io/v1',
  'node.k8s.io/v1alpha1', 'node.k8s.io/v1beta1', 'policy/v1', 'policy/v1beta1', 'rbac.authorization.k8s.io/v1',
  'rbac.authorization.k8s.io/v1alpha1', 'rbac.authorization.k8s.io/v1beta1', 'resource.k8s.io/v1', 'resource.k8s.io/v1alpha3',
  'resource.k8s.io/v1beta1', 'resource.k8s.io/v1beta2', 'scheduling.k8s.io/v1', 'scheduling.k8s.io/v1alpha2',
  'scheduling.k8s.io/v1beta1', 'storage.k8s.io/v1', 'storage.k8s.io/v1alpha1', 'storage.k8s.io/v1beta1',
  'storagemigration.k8s.io/v1beta1', 'apiextensions.k8s.io/v1', 'apiextensions.k8s.io/v1beta1',
];

const stringMethod = (f: (s: string) => GoValue): GoFunc => ({ params: ['string'], call: ([s]) => f(s as string) });
const noArgMethod = (f: () => GoValue): GoFunc => ({ params: [], call: () => f() });

/** chartutil.Capabilities: KubeVersion (String/GitVersion methods) and APIVersions (Has method). */
function capabilities(kubeVersion: string, extraApis: string[]): GoStruct {
  // ParseKubeVersion keeps the numeric fields of a generic version ("1.30", "v1.30.2-gke.1" → v1.30.2).
  const m = /^v?(\d+)\.(\d+)(?:\.(\d+))?/.exec(kubeVersion);
  if (!m) throw new ChartError(`invalid kubeVersion ${JSON.stringify(kubeVersion)}`);
  const version = `v${[m[1], m[2], m[3]].filter((x) => x !== undefined).join('.')}`;
  const kube = new GoStruct(
    'chartutil.KubeVersion',
    { Version: version, Major: m[1] ?? '', Minor: m[2] ?? '' },
    { String: noArgMethod(() => version), GitVersion: noArgMethod(() => version) },
    () => version,
  );
  const apis: string[] = [...DEFAULT_API_VERSIONS, ...extraApis];
  const versionSet = typedSlice([...apis], {
    elem: 'string',
    typeName: 'chartutil.VersionSet',
    methods: { Has: stringMethod((s) => apis.includes(s)) },
  });
  return new GoStruct('*chartutil.Capabilities', { KubeVersion: kube, APIVersions: versionSet });
}

/** .Files is not implemented: any use says so. */
function filesObject(): GoStruct {
  const refuse: GoFunc = {
    params: [],
    variadic: 'any',
    call: () => {
      throw new FuncError('.Files is not supported by this renderer');
    },
  };
  return new GoStruct('engine.files', {}, Object.fromEntries(['Get', 'GetBytes', 'Glob', 'Lines', 'AsConfig', 'AsSecrets'].map((n) => [n, refuse])));
}

/** The "(?:^|\s*\n)---\s*" split of releaseutil.SplitManifests, with Go's \s (no \v). */
const DOC_SEPARATOR = /(?:^|[\t\n\f\r ]*\n)---[\t\n\f\r ]*/;
const goTrimSpace = (s: string): string => s.replace(/^[\t\n\v\f\r \u0085\u00a0]+|[\t\n\v\f\r \u0085\u00a0]+$/g, '');

export function splitManifests(text: string): string[] {
  return goTrimSpace(text)
    .split(DOC_SEPARATOR)
    .filter((d) => d !== '')
    .map(goTrimSpace);
}

/** `helm template`: load, merge and validate values, render every template, split the output. */
export function renderChart(chartDir: string, options: RenderOptions): RenderResult {
  const chart = loadChart(chartDir);
  const chartName = chart.metadata.Name as string;
  let user: GoMap = {};
  for (const file of options.valuesFiles ?? []) user = mergeValueMaps(user, readValues(readFileSync(file, 'utf8'), file));
  if (options.set) applySet(user, options.set);
  const values = coalesceValues(chart.values, user);
  if (chart.schema !== undefined) validateValues(chart.schema, values, chartName);

  const caps = capabilities(options.kubeVersion ?? 'v1.36.0', options.apiVersions ?? []);
  const kubeConstraint = chart.metadata.KubeVersion;
  if (typeof kubeConstraint === 'string' && kubeConstraint !== '') {
    const version = (caps.fields.KubeVersion as GoStruct).fields.Version as string;
    let compatible: boolean;
    try {
      compatible = semverCompare(kubeConstraint, version);
    } catch (e) {
      throw new ChartError(`Chart.yaml kubeVersion: ${(e as Error).message}`);
    }
    if (!compatible) throw new ChartError(`chart requires kubeVersion: ${kubeConstraint} which is incompatible with Kubernetes ${version}`);
  }

  const isInstall = options.isInstall ?? true;
  const top: GoMap = {
    Chart: new GoStruct('chart.Metadata', { ...chart.metadata, IsRoot: true }),
    Files: filesObject(),
    Release: {
      Name: options.releaseName,
      Namespace: options.namespace,
      IsUpgrade: !isInstall,
      IsInstall: isInstall,
      Revision: new GoInt(1n),
      Service: 'Helm',
    },
    Capabilities: caps,
    Values: values,
    Subcharts: {},
  };

  const files = Object.fromEntries([...chart.templates].map(([rel, text]) => [posix.join(chartName, rel), text]));
  const set = parseTemplates(files);
  const ctx = { set, includedNames: new Map<string, number>() };
  // Executed in engine.go's order (deeper paths first, then reverse lexical): templates can change
  // .Values with `set`, and later files see it.
  const depth = (p: string): number => p.split('/').length - 1;
  const executionOrder = Object.keys(files).sort((a, b) => depth(b) - depth(a) || (a < b ? 1 : a > b ? -1 : 0));
  const rendered = new Map<string, string>();
  for (const name of executionOrder) {
    if (posix.basename(name).startsWith('_')) continue;
    top.Template = { Name: name, BasePath: posix.join(chartName, 'templates') };
    rendered.set(name, execute(set, name, top, ctx));
  }

  // action.go renderResources: the chart's own templates/NOTES.txt is the notes; other NOTES.txt are
  // dropped. releaseutil.SortManifests then takes files in sorted path order.
  let notes = '';
  const manifests: RenderedManifest[] = [];
  for (const name of [...rendered.keys()].sort()) {
    const text = rendered.get(name) ?? '';
    if (name.endsWith('NOTES.txt')) {
      if (name === posix.join(chartName, 'templates', 'NOTES.txt')) notes = text;
      continue;
    }
    if (goTrimSpace(text) === '') continue;
    for (const doc of splitManifests(text)) manifests.push({ template: name, text: doc });
  }
  return { manifests, notes };
}

export interface RenderedObject {
  template: string;
  object: Record<string, unknown>;
}

/** Plain JS data of a parsed manifest (numbers as JS numbers). */
function toPlain(v: GoValue): unknown {
  if (v instanceof GoInt) return Number(v.value);
  if (Array.isArray(v)) return v.map(toPlain);
  if (isMap(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toPlain(x)]));
  return v;
}

/** renderChart, then each document parsed as Kubernetes reads it (sigs.k8s.io/yaml); empty documents dropped. */
export function renderObjects(chartDir: string, options: RenderOptions): { objects: RenderedObject[]; notes: string } {
  const { manifests, notes } = renderChart(chartDir, options);
  const objects: RenderedObject[] = [];
  for (const m of manifests) {
    let parsed: GoValue;
    try {
      parsed = parseGoYaml(m.text, m.template);
    } catch (e) {
      throw new ChartError(`YAML parse error on ${m.template}: ${(e as Error).message}`);
    }
    if (parsed === null) continue;
    if (!isMap(parsed)) throw new ChartError(`YAML parse error on ${m.template}: document is not a map`);
    objects.push({ template: m.template, object: toPlain(parsed) as Record<string, unknown> });
  }
  return { objects, notes };
}
