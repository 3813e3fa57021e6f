/**
 * A faithful subset of Go's text/template plus the Sprig/Helm functions charts commonly use,
 * so that a Helm chart can be rendered and checked on machines without a helm binary.
 *
 * Rule of this file: whatever it supports behaves as Helm 3 (Go 1.2x text/template, Sprig v3.3,
 * sigs.k8s.io/yaml v1.6 over go.yaml.in/yaml/v2); whatever it does not support throws a
 * TemplateError naming the template and line. It never guesses.
 *
 * Sources the behaviour was taken from (cited again where it matters):
 *   golang/go   src/text/template/{exec.go,funcs.go}, src/text/template/parse/{lex.go,parse.go,node.go},
 *               src/fmt/{print.go,format.go}, src/strconv/ftoa.go, src/encoding/json/encode.go
 *   Masterminds/sprig v3.3.0 {functions.go,strings.go,defaults.go,numeric.go,dict.go,list.go}
 *   spf13/cast v1.7.0 caste.go, darccio/mergo v1.0.1 merge.go, Masterminds/semver v3 constraints.go
 *   helm/helm dev-v3 pkg/engine/{engine.go,funcs.go}
 *   kubernetes-sigs/yaml v1.6.0 yaml.go, go-yaml/yaml v2 {encode.go,emitterc.go,resolve.go,sorter.go}
 */
import { createHash } from 'node:crypto';

// ───────────────────────────── errors ─────────────────────────────

/** Any failure to parse or execute; the message is what Helm would print. */
export class TemplateError extends Error {
  constructor(
    message: string,
    /** Template name (Helm: "<chart>/templates/<file>"), and 1-based line when known. */
    readonly template: string,
    readonly line?: number,
  ) {
    super(message);
    this.name = 'TemplateError';
  }
}

/** An error returned by a template function (Go's second `error` result). */
export class FuncError extends Error {}

/** Helm wraps `required`/`fail` messages so cleanupExecError can find them (engine.go warnWrap). */
const HELM_ERR_START = 'HELM_ERR_START';
const HELM_ERR_END = 'HELM_ERR_END';

// ───────────────────────────── values ─────────────────────────────

/** A Go integer (text/template literals, len, int, int64, add…), kept apart from float64. */
export class GoInt {
  constructor(
    readonly value: bigint,
    readonly type: 'int' | 'int64' = 'int',
  ) {}
}

/** A Go struct value (.Chart, .Capabilities…): fixed fields, optional methods, optional String(). */
export class GoStruct {
  constructor(
    readonly typeName: string,
    readonly fields: Readonly<Record<string, GoValue>>,
    readonly methods: Readonly<Record<string, GoFunc>> = {},
    readonly stringer?: () => string,
  ) {}
}

export type GoMap = { [key: string]: GoValue };

/**
 * undefined is Go's invalid reflect.Value ("<no value>"); null is a nil interface{} found in a map,
 * slice or function result. The two differ in text/template: a field of null is an error, a field of
 * undefined is undefined (exec.go evalField).
 */
export type GoValue = undefined | null | string | number | boolean | GoInt | GoValue[] | GoMap | GoStruct;

/** A function as the evaluator sees it: parameter types drive Go's argument checks (exec.go validateType). */
export interface GoFunc {
  params: ParamType[];
  variadic?: ParamType;
  call: (args: GoValue[], ctx: CallContext) => GoValue;
}
/** Go parameter types: interface{}, string, int, bool, map[string]interface{}, and reflect.Value (which,
 *  unlike interface{}, keeps "no value" apart from a nil interface, as eq, len and index see it). */
type ParamType = 'any' | 'string' | 'int' | 'bool' | 'map' | 'reflect';

interface SliceInfo {
  elem: 'string' | 'int' | 'int64';
  typeName?: string;
  methods?: Record<string, GoFunc>;
}
/** Element types of slices that are not []interface{} (for type names) and methods on named slice types. */
const sliceInfo = new WeakMap<GoValue[], SliceInfo>();

export function typedSlice<T extends GoValue[]>(items: T, info: SliceInfo): T {
  sliceInfo.set(items, info);
  return items;
}

const int = (n: number | bigint): GoInt => new GoInt(BigInt(n), 'int');
const int64 = (n: bigint): GoInt => new GoInt(BigInt.asIntN(64, n), 'int64');

export function isMap(v: GoValue): v is GoMap {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof GoInt) && !(v instanceof GoStruct);
}

/** Go's reflect type name of a value, as printed in text/template error messages. */
function typeName(v: GoValue): string {
  if (v === undefined || v === null) return '<nil>';
  if (typeof v === 'string') return 'string';
  if (typeof v === 'number') return 'float64';
  if (typeof v === 'boolean') return 'bool';
  if (v instanceof GoInt) return v.type;
  if (v instanceof GoStruct) return v.typeName;
  if (Array.isArray(v)) {
    const info = sliceInfo.get(v);
    return info?.typeName ?? `[]${info?.elem ?? 'interface {}'}`;
  }
  return 'map[string]interface {}';
}

/** text/template isTrue (exec.go): the zero value of its type is false. */
function isTrue(v: GoValue): boolean {
  if (v === undefined || v === null) return false;
  if (typeof v === 'string') return v.length > 0;
  if (typeof v === 'number') return v !== 0;
  if (typeof v === 'boolean') return v;
  if (v instanceof GoInt) return v.value !== 0n;
  if (v instanceof GoStruct) return true;
  if (Array.isArray(v)) return v.length > 0;
  return Object.keys(v).length > 0;
}

/** Go compares strings byte-wise (UTF-8); JS compares UTF-16 code units. */
function compareBytes(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}
const sortedKeys = (m: GoMap): string[] => Object.keys(m).sort(compareBytes);

// ───────────────────────────── strconv / fmt ─────────────────────────────

/** Shortest round-trip decimal digits of a finite non-zero float: value = 0.digits × 10^dp. */
function shortestDigits(f: number): { digits: string; dp: number } {
  // Number#toExponential() without argument yields the shortest round-tripping digits, as Go's
  // Ryu-based shortest mode does (strconv/ftoa.go genericFtoa with prec < 0).
  const [mant = '', exp = '0'] = Math.abs(f).toExponential().split('e');
  return { digits: mant.replace('.', ''), dp: Number(exp) + 1 };
}

function expSuffix(exp: number, letter = 'e'): string {
  const abs = Math.abs(exp);
  return `${letter}${exp < 0 ? '-' : '+'}${abs < 10 ? '0' : ''}${abs}`;
}

/**
 * strconv.FormatFloat(f, 'g', -1, 64), which is also fmt's %v for float64 (print.go fmtFloat:
 * `case 'v': p.fmt.fmtFloat(v, size, 'g', -1)`). In ftoa.go formatDigits the switch to %e is
 * `exp < -4 || exp >= eprec` with `if shortest { eprec = 6 }`, so 1000000 prints as 1e+06 while
 * 100000 prints as 100000 — the "1e+06" that Helm users see comes from this rule, not from a 21.
 */
export function formatFloatG(f: number): string {
  if (Number.isNaN(f)) return 'NaN';
  if (!Number.isFinite(f)) return f > 0 ? '+Inf' : '-Inf';
  if (f === 0) return Object.is(f, -0) ? '-0' : '0';
  const { digits, dp } = shortestDigits(f);
  const sign = f < 0 ? '-' : '';
  const exp = dp - 1;
  if (exp < -4 || exp >= 6) {
    return `${sign}${digits[0]}${digits.length > 1 ? `.${digits.slice(1)}` : ''}${expSuffix(exp)}`;
  }
  return sign + fixedFromDigits(digits, dp, Math.max(digits.length - dp, 0));
}

/** %f layout of 0.digits × 10^dp with `prec` fractional digits (ftoa.go fmtF). */
function fixedFromDigits(digits: string, dp: number, prec: number): string {
  const intPart = dp > 0 ? (digits.slice(0, dp) + '0'.repeat(Math.max(dp - digits.length, 0))) : '0';
  if (prec === 0) return intPart;
  let frac = '';
  for (let i = 0; i < prec; i++) frac += digits[dp + i] ?? '0';
  return `${intPart}.${frac}`;
}

/** The exact binary value of a finite double as mantissa × 2^exp. */
function decompose(f: number): { mant: bigint; exp: number } {
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, Math.abs(f));
  const bits = view.getBigUint64(0);
  const biased = Number((bits >> 52n) & 0x7ffn);
  const frac = bits & ((1n << 52n) - 1n);
  return biased === 0 ? { mant: frac, exp: -1074 } : { mant: frac | (1n << 52n), exp: biased - 1075 };
}

/** %.Nf: Go rounds the exact binary value half-to-even (strconv decimal.go shouldRoundUp); JS toFixed does not. */
function formatFloatF(f: number, prec: number): string {
  if (!Number.isFinite(f)) return formatFloatG(f);
  const { mant, exp } = decompose(f);
  const scale = 10n ** BigInt(prec);
  let q: bigint;
  if (exp >= 0) q = (mant << BigInt(exp)) * scale;
  else {
    const num = mant * scale;
    const den = 1n << BigInt(-exp);
    q = num / den;
    const twice = 2n * (num % den);
    if (twice > den || (twice === den && q % 2n === 1n)) q += 1n;
  }
  const s = q.toString().padStart(prec + 1, '0');
  const body = prec === 0 ? s : `${s.slice(0, s.length - prec)}.${s.slice(s.length - prec)}`;
  return (f < 0 || Object.is(f, -0) ? '-' : '') + body;
}

/** Go unicode.IsPrint, approximated by Unicode categories L, M, N, P, S plus ASCII space. */
const isPrintRune = (cp: number): boolean =>
  cp === 0x20 || /^[\p{L}\p{M}\p{N}\p{P}\p{S}]$/u.test(String.fromCodePoint(cp));

/** strconv.Quote: %q of a string (sprig `quote`). */
function goQuote(s: string): string {
  let out = '"';
  for (const ch of s) {
    const cp = ch.codePointAt(0) ?? 0;
    if (ch === '"' || ch === '\\') out += `\\${ch}`;
    else if (cp < 0x80 && cp >= 0x20 && cp !== 0x7f) out += ch;
    else if (cp === 0xfffd && ch !== '\ufffd') out += '\\ufffd';
    else if (cp >= 0x80 && isPrintRune(cp)) out += ch;
    else {
      const named: Record<number, string> = { 7: 'a', 8: 'b', 12: 'f', 10: 'n', 13: 'r', 9: 't', 11: 'v' };
      const letter = named[cp];
      if (letter !== undefined) out += `\\${letter}`;
      else if (cp < 0x80) out += `\\x${cp.toString(16).padStart(2, '0')}`;
      else if (cp < 0x10000) out += `\\u${cp.toString(16).padStart(4, '0')}`;
      else out += `\\U${cp.toString(16).padStart(8, '0')}`;
    }
  }
  return `${out}"`;
}

/** fmt's %v of a value (print.go printValue): maps sorted by key, nil as <nil>. */
function fmtV(v: GoValue): string {
  if (v === undefined || v === null) return '<nil>';
  if (typeof v === 'string') return v;
  if (typeof v === 'number') return formatFloatG(v);
  if (typeof v === 'boolean') return String(v);
  if (v instanceof GoInt) return v.value.toString();
  if (v instanceof GoStruct) {
    if (v.stringer) return v.stringer();
    throw new FuncError(`printing the struct ${v.typeName} is not supported by this renderer`);
  }
  if (Array.isArray(v)) return `[${v.map(fmtV).join(' ')}]`;
  return `map[${sortedKeys(v)
    .map((k) => `${k}:${fmtV(v[k])}`)
    .join(' ')}]`;
}

/** fmt.Sprint: spaces between operands when neither side is a string (print.go doPrint). */
function sprint(args: GoValue[]): string {
  let out = '';
  args.forEach((a, i) => {
    const isString = typeof a === 'string';
    if (i > 0 && !isString && typeof args[i - 1] !== 'string') out += ' ';
    out += fmtV(a);
  });
  return out;
}

/** fmt's "%!verb(type=value)" for an operand the verb cannot format. */
const badVerb = (verb: string, v: GoValue): string =>
  v === undefined || v === null ? `%!${verb}(<nil>)` : `%!${verb}(${typeName(v)}=${fmtV(v)})`;

interface FmtFlags {
  minus: boolean;
  plus: boolean;
  zero: boolean;
  width?: number;
  prec?: number;
}

function pad(s: string, f: FmtFlags, numeric: boolean): string {
  const width = f.width ?? 0;
  const len = [...s].length;
  if (len >= width) return s;
  if (f.minus) return s + ' '.repeat(width - len);
  if (f.zero && numeric) {
    const sign = /^[+-]/.test(s) ? (s[0] ?? '') : '';
    return sign + '0'.repeat(width - len) + s.slice(sign.length);
  }
  return ' '.repeat(width - len) + s;
}

/** One verb applied to one operand, recursing into slices and maps as fmt does. */
function formatOne(verb: string, v: GoValue, f: FmtFlags): string {
  if (Array.isArray(v) && verb !== 'v' && verb !== 'q') return `[${v.map((x) => formatOne(verb, x, { ...f, width: undefined })).join(' ')}]`;
  if (isMap(v) && verb !== 'v') {
    return `map[${sortedKeys(v)
      .map((k) => `${formatOne(verb, k, { ...f, width: undefined })}:${formatOne(verb, v[k], { ...f, width: undefined })}`)
      .join(' ')}]`;
  }
  const sign = (neg: boolean): string => (neg ? '-' : f.plus ? '+' : '');
  switch (verb) {
    case 'v':
      if (f.plus) throw new FuncError('printf %+v is not supported by this renderer');
      return pad(fmtV(v), f, typeof v === 'number' || v instanceof GoInt);
    case 's':
      if (typeof v !== 'string') return badVerb(verb, v);
      return pad(f.prec === undefined ? v : [...v].slice(0, f.prec).join(''), f, false);
    case 'q':
      if (typeof v !== 'string') throw new FuncError('printf %q of a non-string is not supported by this renderer');
      return pad(goQuote(v), f, false);
    case 'd':
      if (!(v instanceof GoInt)) return badVerb(verb, v);
      if (f.prec !== undefined) throw new FuncError('printf %.Nd is not supported by this renderer');
      return pad(sign(v.value < 0n) + (v.value < 0n ? -v.value : v.value).toString(), f, true);
    case 't':
      return typeof v === 'boolean' ? pad(String(v), f, false) : badVerb(verb, v);
    case 'f':
    case 'F':
      if (typeof v !== 'number') return badVerb(verb, v);
      return pad((f.plus && v >= 0 ? '+' : '') + formatFloatF(v, f.prec ?? 6), f, true);
    default:
      throw new FuncError(`printf verb %${verb} is not supported by this renderer`);
  }
}

/** fmt.Sprintf for the verbs %s %d %v %q %t %f with flags - + 0, width and precision (print.go doPrintf). */
export function sprintf(format: string, args: GoValue[]): string {
  let out = '';
  let argNum = 0;
  for (let i = 0; i < format.length; ) {
    const c = format[i];
    if (c !== '%') {
      out += c;
      i++;
      continue;
    }
    i++;
    const flags: FmtFlags = { minus: false, plus: false, zero: false };
    for (; i < format.length; i++) {
      const fc = format[i];
      if (fc === '-') flags.minus = true;
      else if (fc === '+') flags.plus = true;
      else if (fc === '0') flags.zero = !flags.minus;
      else if (fc === '#' || fc === ' ') throw new FuncError(`printf flag '${fc}' is not supported by this renderer`);
      else break;
    }
    const num = (): number | undefined => {
      const m = /^\d+/.exec(format.slice(i));
      if (!m) return undefined;
      i += m[0].length;
      return Number(m[0]);
    };
    if (format[i] === '*' || format[i] === '[') throw new FuncError('printf argument indexes and * widths are not supported by this renderer');
    flags.width = num();
    if (format[i] === '.') {
      i++;
      flags.prec = num() ?? 0;
    }
    const verb = format[i];
    i++;
    if (verb === undefined) {
      out += '%!(NOVERB)';
      break;
    }
    if (verb === '%') {
      out += '%';
      continue;
    }
    if (argNum >= args.length) {
      out += `%!${verb}(MISSING)`;
      continue;
    }
    out += formatOne(verb, args[argNum++], flags);
  }
  if (argNum < args.length) {
    out += `%!(EXTRA ${args
      .slice(argNum)
      .map((a) => (a === undefined || a === null ? '<nil>' : `${typeName(a)}=${fmtV(a)}`))
      .join(', ')})`;
  }
  return out;
}

// ───────────────────────────── encoding/json ─────────────────────────────

/** encoding/json float encoding (encode.go floatEncoder): %f unless |f| < 1e-6 or ≥ 1e21, then %e tidied. */
function jsonFloat(f: number): string {
  if (!Number.isFinite(f)) throw new FuncError(`json: unsupported value: ${formatFloatG(f)}`);
  if (f === 0) return Object.is(f, -0) ? '-0' : '0';
  const abs = Math.abs(f);
  const { digits, dp } = shortestDigits(f);
  const sign = f < 0 ? '-' : '';
  if (abs < 1e-6 || abs >= 1e21) {
    const exp = dp - 1;
    let s = `${sign}${digits[0]}${digits.length > 1 ? `.${digits.slice(1)}` : ''}${expSuffix(exp)}`;
    s = s.replace(/e-0(\d)$/, 'e-$1');
    return s;
  }
  return sign + fixedFromDigits(digits, dp, Math.max(digits.length - dp, 0));
}

/** encoding/json string encoding with HTML escaping (encode.go appendString, Go ≥ 1.22 adds \b and \f). */
function jsonString(s: string): string {
  let out = '"';
  for (const ch of s) {
    const cp = ch.codePointAt(0) ?? 0;
    if (ch === '"' || ch === '\\') out += `\\${ch}`;
    else if (cp === 8) out += '\\b';
    else if (cp === 12) out += '\\f';
    else if (cp === 10) out += '\\n';
    else if (cp === 13) out += '\\r';
    else if (cp === 9) out += '\\t';
    else if (cp < 0x20 || ch === '<' || ch === '>' || ch === '&' || cp === 0x2028 || cp === 0x2029) {
      out += `\\u${cp.toString(16).padStart(4, '0')}`;
    } else if (cp >= 0xd800 && cp <= 0xdfff) out += '\\ufffd';
    else out += ch;
  }
  return `${out}"`;
}

/** json.Marshal of a template value: map keys sorted byte-wise, no whitespace. */
export function toGoJson(v: GoValue): string {
  if (v === undefined || v === null) return 'null';
  if (typeof v === 'string') return jsonString(v);
  if (typeof v === 'number') return jsonFloat(v);
  if (typeof v === 'boolean') return String(v);
  if (v instanceof GoInt) return v.value.toString();
  if (v instanceof GoStruct) throw new FuncError(`JSON encoding of the struct ${v.typeName} is not supported by this renderer`);
  if (Array.isArray(v)) return `[${v.map((x) => toGoJson(x)).join(',')}]`;
  return `{${sortedKeys(v)
    .map((k) => `${jsonString(k)}:${toGoJson(v[k])}`)
    .join(',')}}`;
}

// ───────────────────────────── YAML (toYaml) ─────────────────────────────

/** A node of the document that goyaml v2 re-reads from the JSON text (sigs.k8s.io/yaml JSONToYAML). */
type YNode =
  | { kind: 'scalar'; text: string; style: 'plain' | 'double' | 'literal' }
  | { kind: 'seq'; items: YNode[] }
  | { kind: 'map'; entries: Array<[string, YNode]> };

/**
 * goyaml v2 resolve() of a plain scalar (resolve.go): which tag would this text get unquoted?
 * Used to decide whether a string must be quoted when marshalled (encode.go stringv).
 */
export function resolvePlain(s: string): { tag: 'null' | 'bool' | 'int' | 'float' | 'str' | 'timestamp'; value: string | number | boolean | bigint | null } {
  const special: Record<string, ['null' | 'bool' | 'float', null | boolean | number]> = {};
  for (const w of ['y', 'Y', 'yes', 'Yes', 'YES', 'true', 'True', 'TRUE', 'on', 'On', 'ON']) special[w] = ['bool', true];
  for (const w of ['n', 'N', 'no', 'No', 'NO', 'false', 'False', 'FALSE', 'off', 'Off', 'OFF']) special[w] = ['bool', false];
  for (const w of ['', '~', 'null', 'Null', 'NULL']) special[w] = ['null', null];
  for (const w of ['.nan', '.NaN', '.NAN']) special[w] = ['float', NaN];
  for (const w of ['.inf', '.Inf', '.INF', '+.inf', '+.Inf', '+.INF']) special[w] = ['float', Infinity];
  for (const w of ['-.inf', '-.Inf', '-.INF']) special[w] = ['float', -Infinity];
  const hit = Object.hasOwn(special, s) ? special[s] : undefined;
  if (hit) return { tag: hit[0], value: hit[1] };
  const c = s[0] ?? '';
  if (c === '.') {
    return /^\.[0-9]+([eE][-+]?[0-9]+)?$/.test(s) ? { tag: 'float', value: Number(s) } : { tag: 'str', value: s };
  }
  if (!/[-+0-9]/.test(c)) return { tag: 'str', value: s };
  if (looksLikeTimestamp(s)) return { tag: 'timestamp', value: s };
  const plain = s.replace(/_/g, '');
  const asInt = parseGoInt(plain, 0, 64);
  if (asInt !== undefined) return { tag: 'int', value: asInt };
  // strconv.ParseUint takes no sign.
  const asUint = /^[+-]/.test(plain) ? undefined : parseGoUint(plain);
  if (asUint !== undefined) return { tag: 'int', value: asUint };
  if (/^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$/.test(plain)) return { tag: 'float', value: Number(plain) };
  if (/^-?0b[01]+$/.test(plain)) throw new FuncError(`YAML binary literal ${s} is not supported by this renderer`);
  return { tag: 'str', value: s };
}

/** goyaml v2 parseTimestamp: the formats Go's time.Parse accepts after a 4-digit year and '-'. */
function looksLikeTimestamp(s: string): boolean {
  const m = /^(\d{4})-(\d{1,2})-(\d{1,2})(?:([Tt ])(\d{1,2}):(\d{1,2}):(\d{1,2})(\.\d+)?(Z|[+-]\d{2}:\d{2})?)?$/.exec(s);
  if (!m) return false;
  const [, y, mo, d, sep, h, mi, sec, , zone] = m;
  const month = Number(mo);
  const day = Number(d);
  const daysIn = new Date(Date.UTC(Number(y), month, 0)).getUTCDate();
  if (month < 1 || month > 12 || day < 1 || day > daysIn) return false;
  if (sep === undefined) return true;
  if (Number(h) > 23 || Number(mi) > 59 || Number(sec) > 59) return false;
  // "2006-1-2 15:4:5.999999999" has no zone; the T forms require one (Z07:00).
  return sep === ' ' ? zone === undefined : zone !== undefined;
}

/** strconv.ParseInt(s, base, bits) with base 0 prefixes (0x, 0o, 0b, leading-0 octal); undefined on error. */
function parseGoInt(s: string, base: number, bits: number): bigint | undefined {
  const m = /^([-+]?)(.*)$/.exec(s);
  if (!m || m[2] === '') return undefined;
  const neg = m[1] === '-';
  const u = base === 0 ? parseGoUint(m[2] ?? '') : /^[0-9]+$/.test(m[2] ?? '') ? BigInt(m[2] ?? '') : undefined;
  if (u === undefined) return undefined;
  const v = neg ? -u : u;
  const limit = 1n << BigInt(bits - 1);
  return v >= -limit && v < limit ? v : undefined;
}

/** strconv.ParseUint(s, 0, 64). */
function parseGoUint(s: string): bigint | undefined {
  let digits = s;
  let radix = 10;
  if (/^0[xX]/.test(s)) [digits, radix] = [s.slice(2), 16];
  else if (/^0[oO]/.test(s)) [digits, radix] = [s.slice(2), 8];
  else if (/^0[bB]/.test(s)) [digits, radix] = [s.slice(2), 2];
  else if (/^0./.test(s)) [digits, radix] = [s.slice(1), 8];
  const alphabet = '0123456789abcdef'.slice(0, radix);
  if (digits === '' || ![...digits.toLowerCase()].every((ch) => alphabet.includes(ch))) return undefined;
  let v = 0n;
  for (const ch of digits.toLowerCase()) v = v * BigInt(radix) + BigInt(alphabet.indexOf(ch));
  return v < 1n << 64n ? v : undefined;
}

/** The value goyaml v2 decodes from the JSON that json.Marshal produced, as a node ready to emit. */
function toYNode(v: GoValue): YNode {
  if (v === undefined || v === null) return { kind: 'scalar', text: 'null', style: 'plain' };
  if (typeof v === 'boolean') return { kind: 'scalar', text: String(v), style: 'plain' };
  if (v instanceof GoInt) return { kind: 'scalar', text: v.value.toString(), style: 'plain' };
  if (typeof v === 'number') {
    // JSON text re-read by goyaml: integral JSON numbers become ints, others floats printed with
    // strconv.FormatFloat(f, 'g', -1, 64) (encode.go floatv). So 1000000 → 1000000 but 1e21 → 1e+21.
    const text = jsonFloat(v);
    const r = resolvePlain(text);
    const shown = r.tag === 'int' ? String(r.value) : formatFloatG(Number(text));
    return { kind: 'scalar', text: shown, style: 'plain' };
  }
  if (typeof v === 'string') return stringYNode(v);
  if (v instanceof GoStruct) throw new FuncError(`YAML encoding of the struct ${v.typeName} is not supported by this renderer`);
  if (Array.isArray(v)) return { kind: 'seq', items: v.map(toYNode) };
  const keys = Object.keys(v).sort(yamlKeyLess);
  return { kind: 'map', entries: keys.map((k) => [k, toYNode(v[k])]) };
}

/** encode.go stringv: literal if multi-line, plain if it would read back as a string, else double-quoted. */
function stringYNode(s: string): YNode {
  const r = resolvePlain(s);
  const base60 = /^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$/.test(s);
  const canUsePlain = r.tag === 'str' && !base60;
  const style = s.includes('\n') ? 'literal' : canUsePlain ? 'plain' : 'double';
  return { kind: 'scalar', text: s, style };
}

/** goyaml v2 sorter.go keyList.Less for string keys: letters before others, digit runs compared as numbers. */
function yamlKeyLess(a: string, b: string): number {
  const ar = [...a];
  const br = [...b];
  const isLetter = (ch: string): boolean => /^\p{L}$/u.test(ch);
  const isDigit = (ch: string | undefined): boolean => ch !== undefined && /^\p{Nd}$/u.test(ch);
  const cp = (ch: string | undefined): number => ch?.codePointAt(0) ?? 0;
  for (let i = 0; i < ar.length && i < br.length; i++) {
    if (ar[i] === br[i]) continue;
    const al = isLetter(ar[i] ?? '');
    const bl = isLetter(br[i] ?? '');
    if (al && bl) return cp(ar[i]) - cp(br[i]);
    if (al || bl) return bl ? -1 : 1;
    let an = 0n;
    let bn = 0n;
    if (ar[i] === '0' || br[i] === '0') {
      for (let j = i - 1; j >= 0 && isDigit(ar[j]); j--) {
        if (ar[j] !== '0') {
          an = 1n;
          bn = 1n;
          break;
        }
      }
    }
    let ai = i;
    let bi = i;
    for (; ai < ar.length && isDigit(ar[ai]); ai++) an = an * 10n + BigInt(cp(ar[ai]) - 48);
    for (; bi < br.length && isDigit(br[bi]); bi++) bn = bn * 10n + BigInt(cp(br[bi]) - 48);
    if (an !== bn) return an < bn ? -1 : 1;
    if (ai !== bi) return ai - bi;
    return cp(ar[i]) - cp(br[i]);
  }
  return ar.length - br.length;
}

const isBreakCp = (cp: number): boolean => cp === 0x0d || cp === 0x0a || cp === 0x85 || cp === 0x2028 || cp === 0x2029;
const isSpaceCp = (cp: number): boolean => cp === 0x20;
const isBlankCp = (cp: number): boolean => cp === 0x20 || cp === 0x09;
/** yamlprivateh.go is_printable, in code points. */
const isPrintableCp = (cp: number): boolean =>
  cp === 0x0a || (cp >= 0x20 && cp <= 0x7e) || (cp >= 0xa0 && cp <= 0xd7ff) || (cp >= 0xe000 && cp <= 0xfffd && cp !== 0xfeff);

interface ScalarAnalysis {
  multiline: boolean;
  blockPlainAllowed: boolean;
  singleQuotedAllowed: boolean;
  blockAllowed: boolean;
}

/** emitterc.go yaml_emitter_analyze_scalar (flow context never occurs here: only empty collections are flow). */
function analyzeScalar(value: string): ScalarAnalysis {
  const cps = [...value].map((ch) => ch.codePointAt(0) ?? 0);
  if (cps.length === 0) return { multiline: false, blockPlainAllowed: true, singleQuotedAllowed: true, blockAllowed: false };
  let blockIndicators = value.startsWith('---') || value.startsWith('...');
  let lineBreaks = false;
  let special = false;
  let leadingSpace = false;
  let leadingBreak = false;
  let trailingSpace = false;
  let trailingBreak = false;
  let breakSpace = false;
  let spaceBreak = false;
  let precededByWhitespace = true;
  let previousSpace = false;
  let previousBreak = false;
  cps.forEach((c, i) => {
    const last = i === cps.length - 1;
    const followedByWhitespace = last || isBlankCp(cps[i + 1] ?? 0);
    const ch = String.fromCodePoint(c);
    if (i === 0) {
      if ('#,[]{}&*!|>\'"%@`'.includes(ch)) blockIndicators = true;
      else if ((ch === '?' || ch === ':') && followedByWhitespace) blockIndicators = true;
      else if (ch === '-' && followedByWhitespace) blockIndicators = true;
    } else if (ch === ':' && followedByWhitespace) blockIndicators = true;
    else if (ch === '#' && precededByWhitespace) blockIndicators = true;
    if (!isPrintableCp(c)) special = true;
    if (isSpaceCp(c)) {
      if (i === 0) leadingSpace = true;
      if (last) trailingSpace = true;
      if (previousBreak) breakSpace = true;
      previousSpace = true;
      previousBreak = false;
    } else if (isBreakCp(c)) {
      lineBreaks = true;
      if (i === 0) leadingBreak = true;
      if (last) trailingBreak = true;
      if (previousSpace) spaceBreak = true;
      previousSpace = false;
      previousBreak = true;
    } else {
      previousSpace = false;
      previousBreak = false;
    }
    precededByWhitespace = isBlankCp(c) || isBreakCp(c) || c === 0;
  });
  const r: ScalarAnalysis = { multiline: lineBreaks, blockPlainAllowed: true, singleQuotedAllowed: true, blockAllowed: true };
  if (leadingSpace || leadingBreak || trailingSpace || trailingBreak) r.blockPlainAllowed = false;
  if (trailingSpace) r.blockAllowed = false;
  if (breakSpace) {
    r.blockPlainAllowed = false;
    r.singleQuotedAllowed = false;
  }
  if (spaceBreak || special) {
    r.blockPlainAllowed = false;
    r.singleQuotedAllowed = false;
    r.blockAllowed = false;
  }
  if (lineBreaks) r.blockPlainAllowed = false;
  if (blockIndicators) r.blockPlainAllowed = false;
  return r;
}

/**
 * A port of the parts of goyaml v2's emitter (emitterc.go) that block-style output of maps, sequences
 * and scalars goes through, with its defaults: indent 2, line width 80 (long plain and quoted scalars
 * are folded at spaces past column 80, as Helm's toYaml does), sequences not indented under a key.
 */
class YamlEmitter {
  private out = '';
  private column = 0;
  private indent = -1;
  private readonly indents: number[] = [];
  private whitespace = true;
  private indention = true;
  private mappingContext = false;
  private simpleKeyContext = false;
  private static readonly bestIndent = 2;
  private static readonly bestWidth = 80;

  static emit(node: YNode): string {
    const e = new YamlEmitter();
    e.node(node, false, false);
    e.writeIndent(); // document end (implicit)
    return e.out;
  }

  private put(s: string): void {
    this.out += s;
    this.column += [...s].length;
  }
  private putBreak(): void {
    this.out += '\n';
    this.column = 0;
  }
  private increaseIndent(flow: boolean, indentless: boolean): void {
    this.indents.push(this.indent);
    if (this.indent < 0) this.indent = flow ? YamlEmitter.bestIndent : 0;
    else if (!indentless) this.indent += YamlEmitter.bestIndent;
  }
  private popIndent(): void {
    this.indent = this.indents.pop() ?? -1;
  }
  private writeIndent(): void {
    const indent = Math.max(this.indent, 0);
    if (!this.indention || this.column > indent || (this.column === indent && !this.whitespace)) this.putBreak();
    while (this.column < indent) this.put(' ');
    this.whitespace = true;
    this.indention = true;
  }
  private writeIndicator(indicator: string, needWhitespace: boolean, isWhitespace: boolean, isIndention: boolean): void {
    if (needWhitespace && !this.whitespace) this.put(' ');
    this.put(indicator);
    this.whitespace = isWhitespace;
    this.indention = this.indention && isIndention;
  }

  private node(n: YNode, mapping: boolean, simpleKey: boolean): void {
    this.mappingContext = mapping;
    this.simpleKeyContext = simpleKey;
    if (n.kind === 'scalar') this.scalar(n.text, n.style);
    else if (n.kind === 'seq') this.sequence(n.items);
    else this.mapping(n.entries);
  }

  private sequence(items: YNode[]): void {
    if (items.length === 0) {
      this.writeIndicator('[', true, true, false);
      this.increaseIndent(true, false);
      this.popIndent();
      this.writeIndicator(']', false, false, false);
      return;
    }
    this.increaseIndent(false, this.mappingContext && !this.indention);
    for (const item of items) {
      this.writeIndent();
      this.writeIndicator('-', true, false, true);
      this.node(item, false, false);
    }
    this.popIndent();
  }

  private mapping(entries: Array<[string, YNode]>): void {
    if (entries.length === 0) {
      this.writeIndicator('{', true, true, false);
      this.increaseIndent(true, false);
      this.popIndent();
      this.writeIndicator('}', false, false, false);
      return;
    }
    this.increaseIndent(false, false);
    for (const [key, value] of entries) {
      this.writeIndent();
      // yaml_emitter_check_simple_key: a key longer than 128 bytes or with a line break is written
      // in the "? key" form, which this port does not implement.
      if (Buffer.byteLength(key) > 128 || analyzeScalar(key).multiline) {
        throw new FuncError(`toYaml of the key ${JSON.stringify(key.slice(0, 40))} (complex key form) is not supported by this renderer`);
      }
      const keyNode = stringYNode(key);
      this.node(keyNode, true, true);
      this.writeIndicator(':', false, false, false);
      this.node(value, true, false);
    }
    this.popIndent();
  }

  /** yaml_emitter_select_scalar_style + process_scalar. */
  private scalar(value: string, requested: 'plain' | 'double' | 'literal'): void {
    const a = analyzeScalar(value);
    let style: 'plain' | 'single' | 'double' | 'literal' = requested;
    if (this.simpleKeyContext && a.multiline) style = 'double';
    if (style === 'plain') {
      if (!a.blockPlainAllowed) style = 'single';
      if (value.length === 0 && this.simpleKeyContext) style = 'single';
    }
    if (style === 'single' && !a.singleQuotedAllowed) style = 'double';
    if (style === 'literal' && (!a.blockAllowed || this.simpleKeyContext)) style = 'double';
    this.increaseIndent(true, false);
    const allowBreaks = !this.simpleKeyContext;
    if (style === 'plain') this.writePlain(value, allowBreaks);
    else if (style === 'single') this.writeSingleQuoted(value, allowBreaks);
    else if (style === 'double') this.writeDoubleQuoted(value, allowBreaks);
    else this.writeLiteral(value);
    this.popIndent();
  }

  private writePlain(value: string, allowBreaks: boolean): void {
    if (!this.whitespace) this.put(' ');
    const chars = [...value];
    let spaces = false;
    let breaks = false;
    chars.forEach((ch, i) => {
      const c = ch.codePointAt(0) ?? 0;
      if (isSpaceCp(c)) {
        if (allowBreaks && !spaces && this.column > YamlEmitter.bestWidth && !isSpaceCp(chars[i + 1]?.codePointAt(0) ?? 0)) this.writeIndent();
        else this.put(ch);
        spaces = true;
      } else if (isBreakCp(c)) {
        if (!breaks && ch === '\n') this.putBreak();
        this.writeBreak(ch);
        this.indention = true;
        breaks = true;
      } else {
        if (breaks) this.writeIndent();
        this.put(ch);
        this.indention = false;
        spaces = false;
        breaks = false;
      }
    });
    this.whitespace = false;
    this.indention = false;
  }

  private writeBreak(ch: string): void {
    if (ch === '\n') this.putBreak();
    else {
      this.out += ch;
      this.column = 0;
    }
  }

  private writeSingleQuoted(value: string, allowBreaks: boolean): void {
    this.writeIndicator("'", true, false, false);
    const chars = [...value];
    let spaces = false;
    let breaks = false;
    chars.forEach((ch, i) => {
      const c = ch.codePointAt(0) ?? 0;
      if (isSpaceCp(c)) {
        if (allowBreaks && !spaces && this.column > YamlEmitter.bestWidth && i > 0 && i < chars.length - 1 && !isSpaceCp(chars[i + 1]?.codePointAt(0) ?? 0)) {
          this.writeIndent();
        } else this.put(ch);
        spaces = true;
      } else if (isBreakCp(c)) {
        if (!breaks && ch === '\n') this.putBreak();
        this.writeBreak(ch);
        this.indention = true;
        breaks = true;
      } else {
        if (breaks) this.writeIndent();
        if (ch === "'") this.put("'");
        this.put(ch);
        this.indention = false;
        spaces = false;
        breaks = false;
      }
    });
    this.writeIndicator("'", false, false, false);
    this.whitespace = false;
    this.indention = false;
  }

  private writeDoubleQuoted(value: string, allowBreaks: boolean): void {
    this.writeIndicator('"', true, false, false);
    const chars = [...value];
    const named: Record<number, string> = {
      0x00: '0', 0x07: 'a', 0x08: 'b', 0x09: 't', 0x0a: 'n', 0x0b: 'v', 0x0c: 'f', 0x0d: 'r', 0x1b: 'e',
      0x22: '"', 0x5c: '\\', 0x85: 'N', 0xa0: '_', 0x2028: 'L', 0x2029: 'P',
    };
    let spaces = false;
    chars.forEach((ch, i) => {
      const c = ch.codePointAt(0) ?? 0;
      if (!isPrintableCp(c) || c === 0xfeff || isBreakCp(c) || ch === '"' || ch === '\\') {
        const letter = named[c];
        if (letter !== undefined) this.put(`\\${letter}`);
        else if (c <= 0xff) this.put(`\\x${c.toString(16).toUpperCase().padStart(2, '0')}`);
        else if (c <= 0xffff) this.put(`\\u${c.toString(16).toUpperCase().padStart(4, '0')}`);
        else this.put(`\\U${c.toString(16).toUpperCase().padStart(8, '0')}`);
        spaces = false;
      } else if (isSpaceCp(c)) {
        if (allowBreaks && !spaces && this.column > YamlEmitter.bestWidth && i > 0 && i < chars.length - 1) {
          this.writeIndent();
          if (isSpaceCp(chars[i + 1]?.codePointAt(0) ?? 0)) this.put('\\');
        } else this.put(ch);
        spaces = true;
      } else {
        this.put(ch);
        spaces = false;
      }
    });
    this.writeIndicator('"', false, false, false);
    this.whitespace = false;
    this.indention = false;
  }

  private writeLiteral(value: string): void {
    this.writeIndicator('|', true, false, false);
    // yaml_emitter_write_block_scalar_hints
    const chars = [...value];
    const cp = (i: number): number => chars[i]?.codePointAt(0) ?? 0;
    if (isSpaceCp(cp(0)) || isBreakCp(cp(0))) this.writeIndicator(String(YamlEmitter.bestIndent), false, false, false);
    const last = chars.length - 1;
    let chomp = '';
    if (!isBreakCp(cp(last))) chomp = '-';
    else if (last === 0 || isBreakCp(cp(last - 1))) chomp = '+';
    if (chomp) this.writeIndicator(chomp, false, false, false);
    this.putBreak();
    this.indention = true;
    this.whitespace = true;
    let breaks = true;
    for (const ch of chars) {
      if (isBreakCp(ch.codePointAt(0) ?? 0)) {
        this.writeBreak(ch);
        this.indention = true;
        breaks = true;
      } else {
        if (breaks) this.writeIndent();
        this.put(ch);
        this.indention = false;
        breaks = false;
      }
    }
  }
}

/** Helm's toYaml (engine/funcs.go): sigs.k8s.io/yaml.Marshal, errors swallowed to "", trailing newline trimmed. */
export function toYaml(v: GoValue): string {
  let node: YNode;
  try {
    node = toYNode(v);
  } catch (e) {
    // json.Marshal failures (NaN, ±Inf) make Helm's toYaml return "". Unsupported shapes still throw.
    if (e instanceof FuncError && e.message.startsWith('json: unsupported value')) return '';
    throw e;
  }
  return YamlEmitter.emit(node).replace(/\n$/, '');
}

// ───────────────────────────── lexer (parse/lex.go) ─────────────────────────────

type ItemType =
  | 'error' | 'bool' | 'char' | 'charConstant' | 'complex' | 'assign' | 'declare' | 'eof' | 'field'
  | 'identifier' | 'leftDelim' | 'leftParen' | 'number' | 'pipe' | 'rawString' | 'rightDelim'
  | 'rightParen' | 'space' | 'string' | 'text' | 'variable'
  | 'block' | 'break' | 'continue' | 'dot' | 'define' | 'else' | 'end' | 'if' | 'nil' | 'range' | 'template' | 'with';

interface Item {
  typ: ItemType;
  pos: number;
  val: string;
}

const KEYWORDS: Readonly<Record<string, ItemType>> = {
  '.': 'dot', block: 'block', break: 'break', continue: 'continue', define: 'define', else: 'else',
  end: 'end', if: 'if', range: 'range', nil: 'nil', template: 'template', with: 'with',
};
const isKeyword = (t: ItemType): boolean => Object.values(KEYWORDS).includes(t);

/** Inside actions every ASCII space counts, newlines included (lex.go isSpace, Go ≥ 1.16). */
const isSpaceCh = (c: string | undefined): boolean => c === ' ' || c === '\t' || c === '\r' || c === '\n';
const isAlphaNumeric = (c: string | undefined): boolean => c !== undefined && /^[\p{L}\p{Nd}_]$/u.test(c);
const hasLeftTrimMarker = (s: string, at: number): boolean => s[at] === '-' && isSpaceCh(s[at + 1]);
const hasRightTrimMarker = (s: string, at: number): boolean => isSpaceCh(s[at]) && s[at + 1] === '-';
const TRIM_MARKER_LEN = 2;

/** The lexer of lex.go, run eagerly: same items, same trimming of text around "{{- " and " -}}". */
class Lexer {
  readonly items: Item[] = [];
  private pos = 0;
  private start = 0;
  private parenDepth = 0;
  constructor(private readonly input: string) {}

  run(): Item[] {
    let state: (() => unknown) | null = this.lexText;
    while (state) state = state.call(this) as (() => unknown) | null;
    return this.items;
  }

  private emit(typ: ItemType): void {
    this.items.push({ typ, pos: this.start, val: this.input.slice(this.start, this.pos) });
    this.start = this.pos;
  }
  private errorf(msg: string): null {
    this.items.push({ typ: 'error', pos: this.start, val: msg });
    return null;
  }
  private next(): string | undefined {
    const cp = this.input.codePointAt(this.pos);
    if (cp === undefined) return undefined;
    const ch = String.fromCodePoint(cp);
    this.pos += ch.length;
    return ch;
  }
  private backup(ch: string | undefined): void {
    if (ch !== undefined) this.pos -= ch.length;
  }
  private peek(): string | undefined {
    const ch = this.next();
    this.backup(ch);
    return ch;
  }
  private accept(valid: string): boolean {
    const ch = this.next();
    if (ch !== undefined && valid.includes(ch)) return true;
    this.backup(ch);
    return false;
  }
  private acceptRun(valid: string): void {
    while (this.accept(valid));
  }
  private atRightDelim(): { delim: boolean; trim: boolean } {
    if (hasRightTrimMarker(this.input, this.pos) && this.input.startsWith('}}', this.pos + TRIM_MARKER_LEN)) return { delim: true, trim: true };
    return { delim: this.input.startsWith('}}', this.pos), trim: false };
  }
  private trimLeftFrom(at: number): number {
    let i = at;
    while (isSpaceCh(this.input[i])) i++;
    return i;
  }

  private lexText(): (() => unknown) | null {
    const x = this.input.indexOf('{{', this.pos);
    if (x < 0) {
      this.pos = this.input.length;
      if (this.pos > this.start) this.emit('text');
      this.emit('eof');
      return null;
    }
    if (x > this.pos) {
      let end = x;
      if (hasLeftTrimMarker(this.input, x + 2)) while (end > this.start && isSpaceCh(this.input[end - 1])) end--;
      if (end > this.start) this.items.push({ typ: 'text', pos: this.start, val: this.input.slice(this.start, end) });
    }
    this.pos = x;
    this.start = x;
    return this.lexLeftDelim;
  }

  private lexLeftDelim(): (() => unknown) | null {
    this.pos += 2;
    const after = hasLeftTrimMarker(this.input, this.pos) ? TRIM_MARKER_LEN : 0;
    if (this.input.startsWith('/*', this.pos + after)) {
      this.pos += after;
      this.start = this.pos;
      return this.lexComment;
    }
    this.emit('leftDelim');
    this.pos += after;
    this.start = this.pos;
    this.parenDepth = 0;
    return this.lexInsideAction;
  }

  private lexComment(): (() => unknown) | null {
    this.pos += 2;
    const x = this.input.indexOf('*/', this.pos);
    if (x < 0) return this.errorf('unclosed comment');
    this.pos = x + 2;
    const { delim, trim } = this.atRightDelim();
    if (!delim) return this.errorf('comment ends before closing delimiter');
    this.pos += (trim ? TRIM_MARKER_LEN : 0) + 2;
    if (trim) this.pos = this.trimLeftFrom(this.pos);
    this.start = this.pos;
    return this.lexText;
  }

  private lexRightDelim(): (() => unknown) | null {
    const { trim } = this.atRightDelim();
    if (trim) {
      this.pos += TRIM_MARKER_LEN;
      this.start = this.pos;
    }
    this.pos += 2;
    this.emit('rightDelim');
    if (trim) {
      this.pos = this.trimLeftFrom(this.pos);
      this.start = this.pos;
    }
    return this.lexText;
  }

  private lexInsideAction(): (() => unknown) | null {
    if (this.atRightDelim().delim) return this.parenDepth === 0 ? this.lexRightDelim : this.errorf('unclosed left paren');
    const r = this.next();
    if (r === undefined) return this.errorf('unclosed action');
    if (isSpaceCh(r)) {
      this.backup(r);
      return this.lexSpace;
    }
    switch (r) {
      case '=':
        this.emit('assign');
        return this.lexInsideAction;
      case ':':
        if (this.next() !== '=') return this.errorf('expected :=');
        this.emit('declare');
        return this.lexInsideAction;
      case '|':
        this.emit('pipe');
        return this.lexInsideAction;
      case '"':
        return this.lexQuote;
      case '`':
        return this.lexRawQuote;
      case '$':
        return this.lexVariable;
      case "'":
        return this.lexChar;
      case '(':
        this.parenDepth++;
        this.emit('leftParen');
        return this.lexInsideAction;
      case ')':
        this.parenDepth--;
        if (this.parenDepth < 0) return this.errorf('unexpected right paren');
        this.emit('rightParen');
        return this.lexInsideAction;
    }
    if (r === '.' && !/[0-9]/.test(this.input[this.pos] ?? 'x')) return this.lexField;
    if (r === '.' || r === '+' || r === '-' || /[0-9]/.test(r)) {
      this.backup(r);
      return this.lexNumber;
    }
    if (isAlphaNumeric(r)) {
      this.backup(r);
      return this.lexIdentifier;
    }
    const cp = r.codePointAt(0) ?? 0;
    if (cp <= 0x7e && cp >= 0x20) {
      this.emit('char');
      return this.lexInsideAction;
    }
    return this.errorf(`unrecognized character in action: ${goRuneString(r)}`);
  }

  private lexSpace(): (() => unknown) | null {
    let numSpaces = 0;
    while (isSpaceCh(this.peek())) {
      this.next();
      numSpaces++;
    }
    // A " -}}" closes the action: leave its space for lexRightDelim.
    if (hasRightTrimMarker(this.input, this.pos - 1) && this.input.startsWith('}}', this.pos - 1 + TRIM_MARKER_LEN)) {
      this.pos--;
      if (numSpaces === 1) return this.lexRightDelim;
    }
    this.emit('space');
    return this.lexInsideAction;
  }

  private atTerminator(): boolean {
    const r = this.peek();
    if (r === undefined || isSpaceCh(r) || '.,|:)('.includes(r)) return true;
    return this.input.startsWith('}}', this.pos);
  }

  private lexIdentifier(): (() => unknown) | null {
    while (isAlphaNumeric(this.peek())) this.next();
    if (!this.atTerminator()) return this.errorf(`bad character ${goRuneString(this.peek() ?? '')}`);
    const word = this.input.slice(this.start, this.pos);
    const kw = Object.hasOwn(KEYWORDS, word) ? KEYWORDS[word] : undefined;
    this.emit(kw ?? (word === 'true' || word === 'false' ? 'bool' : 'identifier'));
    return this.lexInsideAction;
  }

  private lexField(): (() => unknown) | null {
    return this.lexFieldOrVariable('field');
  }

  private lexVariable(): (() => unknown) | null {
    if (this.atTerminator()) {
      this.emit('variable');
      return this.lexInsideAction;
    }
    return this.lexFieldOrVariable('variable');
  }

  private lexFieldOrVariable(typ: 'field' | 'variable'): (() => unknown) | null {
    if (this.atTerminator()) {
      this.emit(typ === 'variable' ? 'variable' : 'dot');
      return this.lexInsideAction;
    }
    while (isAlphaNumeric(this.peek())) this.next();
    if (!this.atTerminator()) return this.errorf(`bad character ${goRuneString(this.peek() ?? '')}`);
    this.emit(typ);
    return this.lexInsideAction;
  }

  private lexQuoted(close: string, kind: 'string' | 'charConstant', what: string): (() => unknown) | null {
    for (;;) {
      const r = this.next();
      if (r === '\\') {
        const e = this.next();
        if (e !== undefined && e !== '\n') continue;
        return this.errorf(`unterminated ${what}`);
      }
      if (r === undefined || r === '\n') return this.errorf(`unterminated ${what}`);
      if (r === close) break;
    }
    this.emit(kind);
    return this.lexInsideAction;
  }
  private lexQuote(): (() => unknown) | null {
    return this.lexQuoted('"', 'string', 'quoted string');
  }
  private lexChar(): (() => unknown) | null {
    return this.lexQuoted("'", 'charConstant', 'character constant');
  }
  private lexRawQuote(): (() => unknown) | null {
    const x = this.input.indexOf('`', this.pos);
    if (x < 0) return this.errorf('unterminated raw quoted string');
    this.pos = x + 1;
    this.emit('rawString');
    return this.lexInsideAction;
  }

  private lexNumber(): (() => unknown) | null {
    if (!this.scanNumber()) return this.errorf(`bad number syntax: ${goQuote(this.input.slice(this.start, this.pos))}`);
    const sign = this.peek();
    if (sign === '+' || sign === '-') {
      if (!this.scanNumber() || this.input[this.pos - 1] !== 'i') return this.errorf(`bad number syntax: ${goQuote(this.input.slice(this.start, this.pos))}`);
      this.emit('complex');
      return this.lexInsideAction;
    }
    this.emit('number');
    return this.lexInsideAction;
  }

  private scanNumber(): boolean {
    this.accept('+-');
    let digits = '0123456789_';
    if (this.accept('0')) {
      if (this.accept('xX')) digits = '0123456789abcdefABCDEF_';
      else if (this.accept('oO')) digits = '01234567_';
      else if (this.accept('bB')) digits = '01_';
    }
    this.acceptRun(digits);
    if (this.accept('.')) this.acceptRun(digits);
    if (digits.length === 11 && this.accept('eE')) {
      this.accept('+-');
      this.acceptRun('0123456789_');
    }
    if (digits.length === 23 && this.accept('pP')) {
      this.accept('+-');
      this.acceptRun('0123456789_');
    }
    this.accept('i');
    if (isAlphaNumeric(this.peek())) {
      this.next();
      return false;
    }
    return true;
  }
}

/** fmt's %#U of a rune, used in lexer errors. */
function goRuneString(r: string): string {
  const cp = r.codePointAt(0) ?? 0;
  return `U+${cp.toString(16).toUpperCase().padStart(4, '0')} '${r}'`;
}

// ───────────────────────────── parser (parse/parse.go, parse/node.go) ─────────────────────────────

/** Where a node came from: the name given to Parse (ParseName) and the whole text, for ErrorContext. */
interface Source {
  name: string;
  text: string;
}

interface NodeBase {
  pos: number;
  src: Source;
}
interface FieldNode extends NodeBase { type: 'field'; ident: string[] }
interface VariableNode extends NodeBase { type: 'variable'; ident: string[] }
interface ChainNode extends NodeBase { type: 'chain'; node: ArgNode; field: string[] }
interface IdentifierNode extends NodeBase { type: 'identifier'; name: string }
interface DotNode extends NodeBase { type: 'dot' }
interface NilNode extends NodeBase { type: 'nil' }
interface BoolNode extends NodeBase { type: 'bool'; value: boolean }
interface NumberNode extends NodeBase {
  type: 'number';
  text: string;
  isInt: boolean;
  isUint: boolean;
  isFloat: boolean;
  int: bigint;
  float: number;
}
interface StringNode extends NodeBase { type: 'string'; quoted: string; text: string }
interface PipeNode extends NodeBase { type: 'pipe'; isAssign: boolean; decl: VariableNode[]; cmds: CommandNode[] }
interface CommandNode extends NodeBase { type: 'command'; args: ArgNode[] }
type ArgNode = FieldNode | VariableNode | ChainNode | IdentifierNode | DotNode | NilNode | BoolNode | NumberNode | StringNode | PipeNode;

interface ListNode { type: 'list'; nodes: Node[] }
interface TextNode extends NodeBase { type: 'text'; text: string }
interface ActionNode extends NodeBase { type: 'action'; pipe: PipeNode }
interface BranchNode extends NodeBase { type: 'if' | 'with' | 'range'; pipe: PipeNode; list: ListNode; elseList?: ListNode }
interface TemplateNode extends NodeBase { type: 'template'; name: string; pipe?: PipeNode }
interface LoopControlNode extends NodeBase { type: 'break' | 'continue' }
type Node = ListNode | TextNode | ActionNode | BranchNode | TemplateNode | LoopControlNode;
type EndOrElse = { type: 'end' | 'else'; pos: number };

/** node.go String() of an argument, as shown in "executing … at <…>". */
function nodeString(n: ArgNode | CommandNode): string {
  switch (n.type) {
    case 'field':
      return n.ident.map((id) => `.${id}`).join('');
    case 'variable':
      return n.ident.join('.');
    case 'chain':
      return (n.node.type === 'pipe' ? `(${nodeString(n.node)})` : nodeString(n.node)) + n.field.map((f) => `.${f}`).join('');
    case 'identifier':
      return n.name;
    case 'dot':
      return '.';
    case 'nil':
      return 'nil';
    case 'bool':
      return String(n.value);
    case 'number':
      return n.text;
    case 'string':
      return n.quoted;
    case 'command':
      return n.args.map((a) => (a.type === 'pipe' ? `(${nodeString(a)})` : nodeString(a))).join(' ');
    case 'pipe': {
      const decl = n.decl.length ? `${n.decl.map((d) => nodeString(d)).join(', ')} ${n.isAssign ? '=' : ':='} ` : '';
      return decl + n.cmds.map((c) => nodeString(c)).join(' | ');
    }
  }
}

/** A parsed template: its body and the source it was parsed from. */
export interface Tree {
  name: string;
  root: ListNode;
  src: Source;
}

/** parse.go IsEmptyTree: only spaces and comments. */
function isEmptyTree(n: Node): boolean {
  switch (n.type) {
    case 'list':
      return n.nodes.every(isEmptyTree);
    case 'text':
      return n.text.trim() === '';
    default:
      return false;
  }
}

class ParseError extends Error {}

/** strconv.Unquote of a Go string literal (interpreted or raw). */
function goUnquote(quoted: string): string {
  if (quoted.startsWith('`')) {
    if (quoted.length < 2 || !quoted.endsWith('`')) throw new ParseError('invalid syntax');
    return quoted.slice(1, -1).replace(/\r/g, '');
  }
  const body = quoted.slice(1, -1);
  let out = '';
  for (let i = 0; i < body.length; ) {
    const c = body[i] ?? '';
    if (c !== '\\') {
      out += c;
      i++;
      continue;
    }
    const e = body[i + 1] ?? '';
    const simple: Record<string, string> = { a: '\x07', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t', v: '\v', '\\': '\\', '"': '"' };
    const mapped = simple[e];
    if (mapped !== undefined) {
      out += mapped;
      i += 2;
      continue;
    }
    const hexLen = e === 'x' ? 2 : e === 'u' ? 4 : e === 'U' ? 8 : 0;
    if (hexLen > 0) {
      const hex = body.slice(i + 2, i + 2 + hexLen);
      if (!new RegExp(`^[0-9a-fA-F]{${hexLen}}$`).test(hex)) throw new ParseError('invalid syntax');
      const cp = parseInt(hex, 16);
      if (e === 'x') {
        if (cp >= 0x80) throw new ParseError('string literals with \\x escapes above 0x7f are not supported by this renderer');
        out += String.fromCharCode(cp);
      } else {
        if (cp > 0x10ffff || (cp >= 0xd800 && cp < 0xe000)) throw new ParseError('invalid syntax');
        out += String.fromCodePoint(cp);
      }
      i += 2 + hexLen;
      continue;
    }
    if (/[0-7]/.test(e)) {
      const oct = body.slice(i + 1, i + 4);
      if (!/^[0-7]{3}$/.test(oct) || parseInt(oct, 8) > 0x7f) throw new ParseError('octal escapes are not supported by this renderer');
      out += String.fromCharCode(parseInt(oct, 8));
      i += 4;
      continue;
    }
    throw new ParseError('invalid syntax');
  }
  return out;
}

/** The parser of parse.go over the eager item list; one instance per Parse call (one file). */
class Parser {
  private i = 0;
  private vars: string[] = ['$'];
  private rangeDepth = 0;
  private actionStart = -1;
  readonly treeSet = new Map<string, Tree>();

  constructor(
    private readonly items: Item[],
    private readonly src: Source,
    private readonly hasFunction: (name: string) => boolean,
  ) {}

  private lineOf(pos: number): number {
    let line = 1;
    for (let k = 0; k < pos && k < this.src.text.length; k++) if (this.src.text[k] === '\n') line++;
    return line;
  }
  private errorf(msg: string, at?: Item): never {
    const tok = at ?? this.at(Math.max(this.i - 1, 0));
    throw new ParseError(`template: ${this.src.name}:${this.lineOf(tok.pos)}: ${msg}`);
  }
  /** The item at index i; past the end, the final EOF or error item repeats. */
  private at(i: number): Item {
    const it = this.items[Math.min(i, this.items.length - 1)];
    if (!it) throw new ParseError(`template: ${this.src.name}:1: unexpected EOF`);
    return it;
  }
  private next(): Item {
    return this.at(this.i++);
  }
  private backup(): void {
    this.i--;
  }
  private peek(): Item {
    return this.at(this.i);
  }
  private nextNonSpace(): Item {
    let it = this.next();
    while (it.typ === 'space') it = this.next();
    return it;
  }
  private peekNonSpace(): Item {
    const save = this.i;
    const it = this.nextNonSpace();
    this.i = save;
    return it;
  }
  private itemString(it: Item): string {
    if (it.typ === 'eof') return 'EOF';
    if (it.typ === 'error') return it.val;
    if (isKeyword(it.typ)) return `<${it.val}>`;
    const chars = [...it.val];
    return chars.length > 10 ? `${goQuote(chars.slice(0, 10).join(''))}...` : goQuote(it.val);
  }
  private unexpected(it: Item, context: string): never {
    if (it.typ === 'error') {
      const startLine = this.actionStart >= 0 ? this.lineOf(this.actionStart) : 0;
      const line = this.lineOf(it.pos);
      let extra = startLine && startLine !== line ? ` in action started at ${this.src.name}:${startLine}` : '';
      if (extra && it.val.endsWith(' action')) extra = extra.slice(' in action'.length);
      this.errorf(`${it.val}${extra}`, it);
    }
    this.errorf(`unexpected ${this.itemString(it)} in ${context}`, it);
  }
  private expect(typ: ItemType, context: string): Item {
    const it = this.nextNonSpace();
    if (it.typ !== typ) this.unexpected(it, context);
    return it;
  }

  /** parse(): the file body, with {{define}} blocks split off into their own trees. */
  parseFile(name: string): void {
    const root: ListNode = { type: 'list', nodes: [] };
    while (this.peek().typ !== 'eof') {
      if (this.peek().typ === 'leftDelim') {
        const save = this.i;
        this.next();
        if (this.nextNonSpace().typ === 'define') {
          this.parseDefinition();
          continue;
        }
        this.i = save;
      }
      const n = this.textOrAction();
      if ('type' in n && (n.type === 'end' || n.type === 'else')) this.errorf(`unexpected {{${n.type}}}`);
      root.nodes.push(n as Node);
    }
    this.add({ name, root, src: this.src });
  }

  private add(tree: Tree): void {
    const old = this.treeSet.get(tree.name);
    if (!old || isEmptyTree(old.root)) {
      this.treeSet.set(tree.name, tree);
      return;
    }
    if (!isEmptyTree(tree.root)) this.errorf(`template: multiple definition of template ${goQuote(tree.name)}`);
  }

  private withFreshScope<T>(fn: () => T): T {
    const saved = { vars: this.vars, rangeDepth: this.rangeDepth };
    this.vars = ['$'];
    this.rangeDepth = 0;
    try {
      return fn();
    } finally {
      this.vars = saved.vars;
      this.rangeDepth = saved.rangeDepth;
    }
  }

  private parseDefinition(): void {
    const context = 'define clause';
    const nameTok = this.nextNonSpace();
    if (nameTok.typ !== 'string' && nameTok.typ !== 'rawString') this.unexpected(nameTok, context);
    const name = this.unquote(nameTok);
    this.expect('rightDelim', context);
    this.withFreshScope(() => {
      const [root, end] = this.itemList();
      if (end.type !== 'end') this.errorf(`unexpected {{${end.type}}} in ${context}`);
      this.add({ name, root, src: this.src });
    });
  }

  private unquote(it: Item): string {
    try {
      return goUnquote(it.val);
    } catch (e) {
      this.errorf((e as Error).message, it);
    }
  }

  private itemList(): [ListNode, EndOrElse] {
    const list: ListNode = { type: 'list', nodes: [] };
    while (this.peekNonSpace().typ !== 'eof') {
      const n = this.textOrAction();
      if (n.type === 'end' || n.type === 'else') return [list, n as EndOrElse];
      list.nodes.push(n as Node);
    }
    this.errorf('unexpected EOF');
  }

  private textOrAction(): Node | EndOrElse {
    const it = this.nextNonSpace();
    if (it.typ === 'text') return { type: 'text', pos: it.pos, src: this.src, text: it.val };
    if (it.typ === 'leftDelim') {
      const saved = this.actionStart;
      this.actionStart = it.pos;
      try {
        return this.action();
      } finally {
        this.actionStart = saved;
      }
    }
    this.unexpected(it, 'input');
  }

  private action(): Node | EndOrElse {
    const it = this.nextNonSpace();
    switch (it.typ) {
      case 'block':
        return this.blockControl();
      case 'break':
      case 'continue': {
        const close = this.nextNonSpace();
        if (close.typ !== 'rightDelim') this.unexpected(close, `{{${it.typ}}}`);
        if (this.rangeDepth === 0) this.errorf(`{{${it.typ}}} outside {{range}}`);
        return { type: it.typ, pos: it.pos, src: this.src };
      }
      case 'else':
        return this.elseControl();
      case 'end':
        this.expect('rightDelim', 'end');
        return { type: 'end', pos: it.pos };
      case 'if':
      case 'with':
      case 'range':
        return this.control(it.typ);
      case 'template':
        return this.templateControl();
    }
    this.backup();
    const start = this.peek();
    return { type: 'action', pos: start.pos, src: this.src, pipe: this.pipeline('command', 'rightDelim') };
  }

  private elseControl(): EndOrElse {
    // Like Go's peekNonSpace, the spaces are consumed: "{{else if …" and "{{else with …" leave just
    // the keyword pending for control().
    while (this.peek().typ === 'space') this.next();
    const peek = this.peek();
    if (peek.typ === 'if' || peek.typ === 'with') return { type: 'else', pos: peek.pos };
    const tok = this.expect('rightDelim', 'else');
    return { type: 'else', pos: tok.pos };
  }

  private control(context: 'if' | 'with' | 'range'): BranchNode {
    const varsMark = this.vars.length;
    try {
      const pipe = this.pipeline(context, 'rightDelim');
      if (context === 'range') this.rangeDepth++;
      let [list, next] = this.itemList();
      if (context === 'range') this.rangeDepth--;
      let elseList: ListNode | undefined;
      if (next.type === 'else') {
        const pending = this.peek().typ;
        if ((context === 'if' && pending === 'if') || (context === 'with' && pending === 'with')) {
          this.next();
          elseList = { type: 'list', nodes: [this.control(context)] };
        } else {
          [elseList, next] = this.itemList();
          if (next.type !== 'end') this.errorf(`expected end; found {{${next.type}}}`);
        }
      }
      return { type: context, pos: pipe.pos, src: this.src, pipe, list, elseList };
    } finally {
      this.vars.length = varsMark;
    }
  }

  private templateControl(): TemplateNode {
    const context = 'template clause';
    const tok = this.nextNonSpace();
    if (tok.typ !== 'string' && tok.typ !== 'rawString') this.unexpected(tok, context);
    const name = this.unquote(tok);
    let pipe: PipeNode | undefined;
    if (this.nextNonSpace().typ !== 'rightDelim') {
      this.backup();
      pipe = this.pipeline(context, 'rightDelim');
    }
    return { type: 'template', pos: tok.pos, src: this.src, name, pipe };
  }

  private blockControl(): TemplateNode {
    const context = 'block clause';
    const tok = this.nextNonSpace();
    if (tok.typ !== 'string' && tok.typ !== 'rawString') this.unexpected(tok, context);
    const name = this.unquote(tok);
    const pipe = this.pipeline(context, 'rightDelim');
    this.withFreshScope(() => {
      const [root, end] = this.itemList();
      if (end.type !== 'end') this.errorf(`unexpected {{${end.type}}} in ${context}`);
      this.add({ name, root, src: this.src });
    });
    return { type: 'template', pos: tok.pos, src: this.src, name, pipe };
  }

  private pipeline(context: string, end: ItemType): PipeNode {
    const first = this.peekNonSpace();
    const pipe: PipeNode = { type: 'pipe', pos: first.pos, src: this.src, isAssign: false, decl: [], cmds: [] };
    for (;;) {
      const v = this.peekNonSpace();
      if (v.typ !== 'variable') break;
      const save = this.i;
      this.nextNonSpace();
      const nextTok = this.peekNonSpace();
      if (nextTok.typ === 'assign' || nextTok.typ === 'declare') {
        pipe.isAssign = nextTok.typ === 'assign';
        this.nextNonSpace();
        pipe.decl.push(this.newVariable(v.pos, v.val));
        this.vars.push(v.val);
        break;
      }
      if (nextTok.typ === 'char' && nextTok.val === ',') {
        this.nextNonSpace();
        pipe.decl.push(this.newVariable(v.pos, v.val));
        this.vars.push(v.val);
        if (context === 'range' && pipe.decl.length < 2) {
          const after = this.peekNonSpace().typ;
          if (after === 'variable' || after === 'rightDelim' || after === 'rightParen') continue;
          this.errorf('range can only initialize variables');
        }
        this.errorf(`too many declarations in ${context}`);
      }
      this.i = save;
      break;
    }
    for (;;) {
      const tok = this.nextNonSpace();
      if (tok.typ === end) {
        this.checkPipeline(pipe, context);
        return pipe;
      }
      switch (tok.typ) {
        case 'bool': case 'charConstant': case 'complex': case 'dot': case 'field': case 'identifier':
        case 'number': case 'nil': case 'rawString': case 'string': case 'variable': case 'leftParen':
          this.backup();
          pipe.cmds.push(this.command());
          break;
        default:
          this.unexpected(tok, context);
      }
    }
  }

  private checkPipeline(pipe: PipeNode, context: string): void {
    if (pipe.cmds.length === 0) this.errorf(`missing value for ${context}`);
    pipe.cmds.slice(1).forEach((c, i) => {
      const t = c.args[0]?.type;
      if (t === 'bool' || t === 'dot' || t === 'nil' || t === 'number' || t === 'string') {
        this.errorf(`non executable command in pipeline stage ${i + 2}`);
      }
    });
  }

  private command(): CommandNode {
    const cmd: CommandNode = { type: 'command', pos: this.peekNonSpace().pos, src: this.src, args: [] };
    for (;;) {
      this.peekNonSpace();
      const operand = this.operand();
      if (operand) cmd.args.push(operand);
      const tok = this.next();
      if (tok.typ === 'space') continue;
      if (tok.typ === 'rightDelim' || tok.typ === 'rightParen') this.backup();
      else if (tok.typ !== 'pipe') this.unexpected(tok, 'operand');
      break;
    }
    if (cmd.args.length === 0) this.errorf('empty command');
    return cmd;
  }

  private operand(): ArgNode | null {
    const node = this.term();
    if (!node || this.peek().typ !== 'field') return node;
    const chainPos = this.peek().pos;
    const fields: string[] = [];
    while (this.peek().typ === 'field') fields.push(this.next().val.slice(1));
    switch (node.type) {
      case 'field':
        return { type: 'field', pos: chainPos, src: this.src, ident: [...node.ident, ...fields] };
      case 'variable':
        return { type: 'variable', pos: chainPos, src: this.src, ident: [...node.ident, ...fields] };
      case 'bool': case 'string': case 'number': case 'nil': case 'dot':
        this.errorf(`unexpected . after term ${goQuote(nodeString(node))}`);
    }
    return { type: 'chain', pos: chainPos, src: this.src, node, field: fields };
  }

  private newVariable(pos: number, val: string): VariableNode {
    return { type: 'variable', pos, src: this.src, ident: val.split('.') };
  }

  private term(): ArgNode | null {
    const tok = this.nextNonSpace();
    const base = { pos: tok.pos, src: this.src };
    switch (tok.typ) {
      case 'identifier':
        if (!this.hasFunction(tok.val)) {
          this.errorf(
            HELM_FUNCTION_NAMES.has(tok.val)
              ? `function ${goQuote(tok.val)} is a Helm/Sprig function that is not supported by this renderer`
              : `function ${goQuote(tok.val)} not defined`,
            tok,
          );
        }
        return { ...base, type: 'identifier', name: tok.val };
      case 'dot':
        return { ...base, type: 'dot' };
      case 'nil':
        return { ...base, type: 'nil' };
      case 'variable': {
        const v = this.newVariable(tok.pos, tok.val);
        if (!this.vars.includes(v.ident[0] ?? '')) this.errorf(`undefined variable ${goQuote(v.ident[0] ?? '')}`, tok);
        return v;
      }
      case 'field':
        return { ...base, type: 'field', ident: tok.val.slice(1).split('.') };
      case 'bool':
        return { ...base, type: 'bool', value: tok.val === 'true' };
      case 'charConstant':
      case 'complex':
        return this.errorf(`${tok.typ === 'complex' ? 'complex numbers' : 'character constants'} are not supported by this renderer`, tok);
      case 'number':
        return { ...base, ...this.parseNumber(tok) };
      case 'leftParen':
        return this.pipeline('parenthesized pipeline', 'rightParen');
      case 'string':
      case 'rawString':
        return { ...base, type: 'string', quoted: tok.val, text: this.unquote(tok) };
    }
    this.backup();
    return null;
  }

  /** node.go newNumber for integer and float literals. */
  private parseNumber(tok: Item): Omit<NumberNode, 'pos' | 'src'> {
    const text = tok.val;
    if (/^[-+]?0[xX].*[pP]/.test(text)) this.errorf('hexadecimal floating-point literals are not supported by this renderer', tok);
    const literal = /^[-+]?(0[xX](_?[0-9a-fA-F])+|0[oO](_?[0-7])+|0[bB](_?[01])+|0(_?[0-7])*|[1-9](_?[0-9])*)$/;
    const n: Omit<NumberNode, 'pos' | 'src'> = { type: 'number', text, isInt: false, isUint: false, isFloat: false, int: 0n, float: 0 };
    if (literal.test(text)) {
      const plain = text.replace(/_/g, '');
      const i = parseGoInt(plain, 0, 64);
      const u = /^[+-]/.test(plain) ? undefined : parseGoUint(plain);
      if (i !== undefined) Object.assign(n, { isInt: true, int: i, isUint: i >= 0n, isFloat: true, float: Number(i) });
      else if (u !== undefined) Object.assign(n, { isUint: true, isFloat: true, float: Number(u) });
      else this.errorf(`integer overflow: ${goQuote(text)}`, tok);
      return n;
    }
    if (!/^[-+]?(\d(_?\d)*(\.(\d(_?\d)*)?)?|\.\d(_?\d)*)([eE][-+]?\d(_?\d)*)?$/.test(text)) this.errorf(`illegal number syntax: ${goQuote(text)}`, tok);
    const f = Number(text.replace(/_/g, ''));
    n.isFloat = true;
    n.float = f;
    if (Number.isInteger(f) && Math.abs(f) < 2 ** 63) Object.assign(n, { isInt: true, int: BigInt(f) });
    return n;
  }
}

/** Every function name Helm 3 defines (sprig v3.3 genericMap minus env/expandenv, plus engine/funcs.go), so
 *  that an unimplemented one is reported as unsupported rather than as undefined. */
const HELM_FUNCTION_NAMES = new Set(
  (
    'and call html index slice js len not or print printf println urlquery eq ge gt le lt ne ' +
    'hello ago date date_in_zone date_modify dateInZone dateModify duration durationRound htmlDate htmlDateInZone ' +
    'must_date_modify mustDateModify mustToDate now toDate unixEpoch abbrev abbrevboth trunc trim upper lower title ' +
    'untitle substr repeat trimall trimAll trimSuffix trimPrefix nospace initials randAlphaNum randAlpha randAscii ' +
    'randNumeric swapcase shuffle snakecase camelcase kebabcase wrap wrapWith contains hasPrefix hasSuffix quote squote ' +
    'cat indent nindent replace plural sha1sum sha256sum sha512sum adler32sum toString atoi int64 int float64 seq ' +
    'toDecimal split splitList splitn toStrings until untilStep add1 add sub div mod mul randInt add1f addf subf divf ' +
    'mulf biggest max min maxf minf ceil floor round join sortAlpha default empty coalesce all any compact mustCompact ' +
    'fromJson toJson toPrettyJson toRawJson mustFromJson mustToJson mustToPrettyJson mustToRawJson ternary deepCopy ' +
    'mustDeepCopy typeOf typeIs typeIsLike kindOf kindIs deepEqual getHostByName base dir clean ext isAbs osBase ' +
    'osClean osDir osExt osIsAbs b64enc b64dec b32enc b32dec tuple list dict get set unset hasKey pluck keys pick omit ' +
    'merge mergeOverwrite mustMerge mustMergeOverwrite values append push mustAppend mustPush prepend mustPrepend first ' +
    'mustFirst rest mustRest last mustLast initial mustInitial reverse mustReverse uniq mustUniq without mustWithout has ' +
    'mustHas mustSlice concat dig chunk mustChunk bcrypt htpasswd genPrivateKey derivePassword buildCustomCert genCA ' +
    'genCAWithKey genSelfSignedCert genSelfSignedCertWithKey genSignedCert genSignedCertWithKey encryptAES decryptAES ' +
    'randBytes uuidv4 semver semverCompare fail regexMatch mustRegexMatch regexFindAll mustRegexFindAll regexFind ' +
    'mustRegexFind regexReplaceAll mustRegexReplaceAll regexReplaceAllLiteral mustRegexReplaceAllLiteral regexSplit ' +
    'mustRegexSplit regexQuoteMeta urlParse urlJoin toToml fromToml toYaml toYamlPretty fromYaml fromYamlArray ' +
    'fromJsonArray include tpl required lookup'
  ).split(' '),
);

// ───────────────────────────── template set ─────────────────────────────

/** Templates parsed together (Helm: one set per render), plus the functions they may call. */
export interface TemplateSet {
  readonly templates: Map<string, Tree>;
  readonly funcs: Readonly<Record<string, GoFunc>>;
  /** Name of the set's root template; Helm's is "gotpl", and `tpl` parses its text under that name. */
  readonly rootName: string;
}

/** Helm's cleanupParseError (engine.go): "parse error at (<file>:<line>): <last part of Go's message>". */
function parseFailure(template: string, err: ParseError): TemplateError {
  const tokens = err.message.split(': ');
  const location = tokens[1] ?? template;
  const line = Number(/:(\d+)$/.exec(location)?.[1]);
  return new TemplateError(`parse error at (${location}): ${tokens[tokens.length - 1] ?? ''}`, template, Number.isFinite(line) ? line : undefined);
}

/** Parse one text into `set` as template `name`, as text/template's t.New(name).Parse(text) does. */
function parseInto(set: TemplateSet, name: string, text: string): void {
  const src: Source = { name, text };
  const parser = new Parser(new Lexer(text).run(), src, (fn) => Object.hasOwn(set.funcs, fn) || fn === 'and' || fn === 'or');
  parser.parseFile(name);
  // template.go associate: a later definition replaces an earlier one unless it is empty.
  for (const [treeName, tree] of parser.treeSet) {
    const old = set.templates.get(treeName);
    if (old && isEmptyTree(tree.root)) continue;
    set.templates.set(treeName, tree);
  }
}

/**
 * Parse files (name → text) into one set, in the order Helm's engine uses (engine.go sortTemplates:
 * deeper paths first, then reverse lexical order), so that when two files define the same name the
 * same one wins.
 */
export function parseTemplates(files: Record<string, string>, rootName = 'gotpl'): TemplateSet {
  const set: TemplateSet = { templates: new Map(), funcs: FUNCS, rootName };
  const depth = (p: string): number => p.split('/').length - 1;
  const order = Object.keys(files).sort((a, b) => depth(b) - depth(a) || compareBytes(b, a));
  for (const name of order) {
    try {
      parseInto(set, name, files[name] ?? '');
    } catch (e) {
      if (e instanceof ParseError) throw parseFailure(name, e);
      throw e;
    }
  }
  return set;
}

// ───────────────────────────── evaluator (exec.go) ─────────────────────────────

/** A failure during execution, carrying Go's full ExecError text. */
class ExecError extends Error {}
const MISSING = Symbol('missing');
type Final = GoValue | typeof MISSING;
const BREAK = Symbol('break');
const CONTINUE = Symbol('continue');

/** What template functions may reach: the running set (for include/tpl) and Helm's include counter. */
export interface CallContext {
  readonly set: TemplateSet;
  readonly includedNames: Map<string, number>;
}

interface Variable {
  name: string;
  value: GoValue;
}

const MAX_EXEC_DEPTH = 100000;

class State {
  node: NodeBase | null = null;
  private vars: Variable[];

  constructor(
    private readonly ctx: CallContext,
    private readonly tmplName: string,
    dot: GoValue,
    private readonly depth: number,
    private readonly out: string[],
  ) {
    this.vars = [{ name: '$', value: dot }];
  }

  /** exec.go errorf: "template: <file>:<line>:<col>: executing "<name>" at <<node>>: <msg>". */
  errorf(msg: string): never {
    if (!this.node) throw new ExecError(`template: ${this.tmplName}: ${msg}`);
    const { src, pos } = this.node;
    const before = src.text.slice(0, pos);
    const lineStart = before.lastIndexOf('\n') + 1;
    const line = 1 + (before.match(/\n/g)?.length ?? 0);
    const col = Buffer.byteLength(before.slice(lineStart));
    const context = nodeContext(this.node);
    throw new ExecError(`template: ${src.name}:${line}:${col}: executing ${goQuote(this.tmplName)} at <${context}>: ${msg}`);
  }

  private at(node: NodeBase): void {
    this.node = node;
  }

  private mark(): number {
    return this.vars.length;
  }
  private pop(mark: number): void {
    this.vars.length = mark;
  }
  private setVar(name: string, value: GoValue): void {
    for (let i = this.vars.length - 1; i >= 0; i--) {
      const v = this.vars[i];
      if (v && v.name === name) {
        v.value = value;
        return;
      }
    }
    this.errorf(`undefined variable: ${name}`);
  }
  private setTopVar(n: number, value: GoValue): void {
    const v = this.vars[this.vars.length - n];
    if (v) v.value = value;
  }
  private varValue(name: string): GoValue {
    for (let i = this.vars.length - 1; i >= 0; i--) {
      const v = this.vars[i];
      if (v && v.name === name) return v.value;
    }
    return this.errorf(`undefined variable: ${name}`);
  }

  walk(dot: GoValue, node: Node): void {
    if (node.type !== 'list') this.at(node);
    switch (node.type) {
      case 'action': {
        const val = this.evalPipeline(dot, node.pipe);
        if (node.pipe.decl.length === 0) this.printValue(node, val);
        return;
      }
      case 'if':
      case 'with':
        return this.walkIfOrWith(node, dot);
      case 'list':
        for (const n of node.nodes) this.walk(dot, n);
        return;
      case 'range':
        return this.walkRange(dot, node);
      case 'template':
        return this.walkTemplate(dot, node);
      case 'text':
        this.out.push(node.text);
        return;
      case 'break':
        throw BREAK;
      case 'continue':
        throw CONTINUE;
    }
  }

  private walkIfOrWith(node: BranchNode, dot: GoValue): void {
    const mark = this.mark();
    try {
      const val = this.evalPipeline(dot, node.pipe);
      if (isTrue(val)) this.walk(node.type === 'with' ? val : dot, node.list);
      else if (node.elseList) this.walk(dot, node.elseList);
    } finally {
      this.pop(mark);
    }
  }

  private walkRange(dot: GoValue, r: BranchNode): void {
    this.at(r);
    const outer = this.mark();
    try {
      const val = this.evalPipeline(dot, r.pipe);
      const mark = this.mark();
      const decl = r.pipe.decl;
      const oneIteration = (index: GoValue, elem: GoValue): void => {
        if (decl.length > 0) {
          if (r.pipe.isAssign) this.setVar(decl[0]?.ident[0] ?? '', decl.length > 1 ? index : elem);
          else this.setTopVar(1, elem);
        }
        if (decl.length > 1) {
          if (r.pipe.isAssign) this.setVar(decl[1]?.ident[0] ?? '', elem);
          else this.setTopVar(2, index);
        }
        try {
          this.walk(elem, r.list);
        } catch (e) {
          if (e !== CONTINUE) throw e;
        } finally {
          this.pop(mark);
        }
      };
      const ran = this.iterate(val, decl.length, oneIteration);
      if (!ran && r.elseList) this.walk(dot, r.elseList);
    } catch (e) {
      if (e !== BREAK) throw e;
    } finally {
      this.pop(outer);
    }
  }

  /** The kinds range accepts (exec.go walkRange); returns whether any iteration ran. */
  private iterate(val: GoValue, nDecl: number, one: (index: GoValue, elem: GoValue) => void): boolean {
    if (val === undefined || val === null) return false;
    if (val instanceof GoInt) {
      if (nDecl > 1) this.errorf(`can't use ${fmtV(val)} to iterate over more than one variable`);
      for (let i = 0n; i < val.value; i++) one(undefined, new GoInt(i, val.type));
      return val.value > 0n;
    }
    if (Array.isArray(val)) {
      val.forEach((elem, i) => one(int(i), elem));
      return val.length > 0;
    }
    if (isMap(val)) {
      const keys = sortedKeys(val);
      for (const k of keys) one(k, val[k]);
      return keys.length > 0;
    }
    return this.errorf(`range can't iterate over ${fmtV(val)}`);
  }

  private walkTemplate(dot: GoValue, t: TemplateNode): void {
    this.at(t);
    const tree = this.ctx.set.templates.get(t.name);
    if (!tree) this.errorf(`template ${goQuote(t.name)} not defined`);
    if (this.depth >= MAX_EXEC_DEPTH) this.errorf(`exceeded maximum template depth (${MAX_EXEC_DEPTH})`);
    const newDot = t.pipe ? this.evalPipeline(dot, t.pipe) : undefined;
    new State(this.ctx, t.name, newDot, this.depth + 1, this.out).walk(newDot, tree.root);
  }

  evalPipeline(dot: GoValue, pipe: PipeNode): GoValue {
    this.at(pipe);
    let value: Final = MISSING;
    for (const cmd of pipe.cmds) {
      value = this.evalCommand(dot, cmd, value);
      // A nil interface{} result is unwrapped to "no value" (exec.go evalPipeline).
      if (value === null) value = undefined;
    }
    const result = value === MISSING ? undefined : value;
    for (const v of pipe.decl) {
      if (pipe.isAssign) this.setVar(v.ident[0] ?? '', result);
      else this.vars.push({ name: v.ident[0] ?? '', value: result });
    }
    return result;
  }

  private notAFunction(args: ArgNode[], final: Final): void {
    if (args.length > 1 || final !== MISSING) this.errorf(`can't give argument to non-function ${nodeString(args[0] as ArgNode)}`);
  }

  private evalCommand(dot: GoValue, cmd: CommandNode, final: Final): GoValue {
    const first = cmd.args[0] as ArgNode;
    switch (first.type) {
      case 'field':
        return this.evalFieldNode(dot, first, cmd.args, final);
      case 'chain':
        return this.evalChainNode(dot, first, cmd.args, final);
      case 'identifier':
        return this.evalFunction(dot, first, cmd, cmd.args, final);
      case 'pipe':
        this.notAFunction(cmd.args, final);
        return this.evalPipeline(dot, first);
      case 'variable':
        return this.evalVariableNode(dot, first, cmd.args, final);
    }
    this.at(first);
    this.notAFunction(cmd.args, final);
    switch (first.type) {
      case 'bool':
        return first.value;
      case 'dot':
        return dot;
      case 'nil':
        return this.errorf('nil is not a command');
      case 'number':
        return this.idealConstant(first);
      case 'string':
        return first.text;
    }
  }

  private idealConstant(n: NumberNode): GoValue {
    this.at(n);
    const isHexInt = /^[-+]?0[xX]/.test(n.text);
    if (n.isFloat && !isHexInt && /[.eEpP]/.test(n.text)) return n.float;
    if (n.isInt) return new GoInt(n.int, 'int');
    if (n.isUint) this.errorf(`${n.text} overflows int`);
    return undefined;
  }

  private evalFieldNode(dot: GoValue, field: FieldNode, args: ArgNode[], final: Final): GoValue {
    this.at(field);
    return this.evalFieldChain(dot, dot, field, field.ident, args, final);
  }

  private evalChainNode(dot: GoValue, chain: ChainNode, args: ArgNode[], final: Final): GoValue {
    this.at(chain);
    if (chain.node.type === 'nil') this.errorf(`indirection through explicit nil in ${nodeString(chain)}`);
    const pipe = this.evalArg(dot, 'reflect', chain.node);
    return this.evalFieldChain(dot, pipe, chain, chain.field, args, final);
  }

  private evalVariableNode(dot: GoValue, v: VariableNode, args: ArgNode[], final: Final): GoValue {
    this.at(v);
    const value = this.varValue(v.ident[0] ?? '');
    if (v.ident.length === 1) {
      this.notAFunction(args, final);
      return value;
    }
    return this.evalFieldChain(dot, value, v, v.ident.slice(1), args, final);
  }

  private evalFieldChain(dot: GoValue, receiver: GoValue, node: NodeBase, ident: string[], args: ArgNode[], final: Final): GoValue {
    let r = receiver;
    ident.forEach((name, i) => {
      r = i < ident.length - 1 ? this.evalField(dot, name, node, [], MISSING, r, i > 0) : this.evalField(dot, name, node, args, final, r, i > 0);
    });
    return r;
  }

  /** exec.go evalField; `fromSlot` says the receiver came out of a map (Go type interface {}). */
  private evalField(dot: GoValue, name: string, node: NodeBase, args: ArgNode[], final: Final, receiver: GoValue, fromSlot: boolean): GoValue {
    if (receiver === undefined) return undefined;
    const typ = fromSlot ? 'interface {}' : typeName(receiver);
    if (receiver === null) return this.errorf(`nil pointer evaluating interface {}.${name}`);
    const method = methodOf(receiver, name);
    if (method) return this.evalCall(dot, method, node, name, args, final);
    const hasArgs = args.length > 1 || final !== MISSING;
    if (receiver instanceof GoStruct) {
      if (Object.hasOwn(receiver.fields, name)) {
        if (hasArgs) this.errorf(`${name} has arguments but cannot be invoked as function`);
        return receiver.fields[name];
      }
    } else if (isMap(receiver)) {
      if (hasArgs) this.errorf(`${name} is not a method but has arguments`);
      // missingkey=zero (Helm's option): an absent key gives the zero interface{}, i.e. nil.
      return Object.hasOwn(receiver, name) ? (receiver[name] ?? null) : null;
    }
    return this.errorf(`can't evaluate field ${name} in type ${typ}`);
  }

  private evalFunction(dot: GoValue, node: IdentifierNode, cmd: NodeBase, args: ArgNode[], final: Final): GoValue {
    this.at(node);
    if (node.name === 'and' || node.name === 'or') return this.evalAndOr(dot, node.name, args, final);
    const fn = Object.hasOwn(this.ctx.set.funcs, node.name) ? this.ctx.set.funcs[node.name] : undefined;
    if (!fn) return this.errorf(`${goQuote(node.name)} is not a defined function`);
    return this.evalCall(dot, fn, cmd, node.name, args, final);
  }

  /** Go ≥ 1.18: and/or evaluate their operands lazily and return the deciding one (exec.go evalCall). */
  private evalAndOr(dot: GoValue, name: 'and' | 'or', args: ArgNode[], final: Final): GoValue {
    const operands = args.slice(1);
    if (operands.length + (final === MISSING ? 0 : 1) < 1) {
      this.errorf(`wrong number of args for ${name}: want at least 1 got ${operands.length}`);
    }
    let v: GoValue;
    for (const arg of operands) {
      v = this.evalArg(dot, 'reflect', arg);
      if (isTrue(v) === (name === 'or')) return v;
    }
    if (final !== MISSING) v = final;
    return v;
  }

  private evalCall(dot: GoValue, fn: GoFunc, node: NodeBase, name: string, args: ArgNode[], final: Final): GoValue {
    const argNodes = args.slice(1);
    const numIn = argNodes.length + (final === MISSING ? 0 : 1);
    const numFixed = fn.variadic ? fn.params.length : argNodes.length;
    if (fn.variadic) {
      if (numIn < numFixed) this.errorf(`wrong number of args for ${name}: want at least ${fn.params.length} got ${argNodes.length}`);
    } else if (numIn !== fn.params.length) {
      this.errorf(`wrong number of args for ${name}: want ${fn.params.length} got ${numIn}`);
    }
    const argv: GoValue[] = [];
    argNodes.forEach((arg, i) => {
      const typ = i < numFixed ? fn.params[i] : fn.variadic;
      argv.push(this.evalArg(dot, typ ?? 'any', arg));
    });
    if (final !== MISSING) {
      let t: ParamType | undefined = fn.params[fn.params.length - 1];
      if (fn.variadic) t = numIn - 1 < numFixed ? fn.params[numIn - 1] : fn.variadic;
      argv.push(this.validateType(final, t ?? 'any'));
    }
    try {
      return fn.call(argv, this.ctx);
    } catch (e) {
      if (e instanceof FuncError || e instanceof ExecError) {
        this.at(node);
        this.errorf(`error calling ${name}: ${e.message}`);
      }
      throw e;
    }
  }

  /** exec.go validateType for the parameter types this renderer's functions declare. */
  private validateType(value: GoValue, typ: ParamType): GoValue {
    if (typ === 'reflect') return value;
    if (value === undefined) {
      if (typ === 'any' || typ === 'map') return null;
      return this.errorf(`invalid value; expected ${GO_PARAM[typ]}`);
    }
    const ok =
      typ === 'any' ||
      (typ === 'string' && typeof value === 'string') ||
      (typ === 'int' && value instanceof GoInt && value.type === 'int') ||
      (typ === 'bool' && typeof value === 'boolean') ||
      (typ === 'map' && (value === null || isMap(value)));
    if (!ok) this.errorf(`wrong type for value; expected ${GO_PARAM[typ]}; got ${value === null ? 'interface {}' : typeName(value)}`);
    return value;
  }

  private evalArg(dot: GoValue, typ: ParamType, n: ArgNode): GoValue {
    this.at(n);
    switch (n.type) {
      case 'dot':
        return this.validateType(dot, typ);
      case 'nil':
        if (typ === 'any' || typ === 'map' || typ === 'reflect') return typ === 'reflect' ? undefined : null;
        return this.errorf(`cannot assign nil to ${GO_PARAM[typ]}`);
      case 'field':
        return this.validateType(this.evalFieldNode(dot, n, [n], MISSING), typ);
      case 'variable':
        return this.validateType(this.evalVariableNode(dot, n, [], MISSING), typ);
      case 'pipe':
        return this.validateType(this.evalPipeline(dot, n), typ);
      case 'identifier':
        return this.validateType(this.evalFunction(dot, n, n, [n], MISSING), typ);
      case 'chain':
        return this.validateType(this.evalChainNode(dot, n, [], MISSING), typ);
    }
    switch (typ) {
      case 'bool':
        return n.type === 'bool' ? n.value : this.errorf(`expected bool; found ${nodeString(n)}`);
      case 'string':
        return n.type === 'string' ? n.text : this.errorf(`expected string; found ${nodeString(n)}`);
      case 'int':
        return n.type === 'number' && n.isInt ? new GoInt(n.int, 'int') : this.errorf(`expected integer; found ${nodeString(n)}`);
      case 'map':
        return this.errorf(`can't handle ${nodeString(n)} for arg of type map[string]interface {}`);
    }
    if (n.type === 'bool') return n.value;
    if (n.type === 'number') return this.idealConstant(n);
    return n.text;
  }

  private printValue(node: ActionNode, v: GoValue): void {
    this.at(node);
    if (v === undefined) {
      this.out.push('<no value>');
      return;
    }
    try {
      this.out.push(fmtV(v));
    } catch (e) {
      if (e instanceof FuncError) this.errorf(e.message);
      throw e;
    }
  }
}

const GO_PARAM: Record<Exclude<ParamType, 'reflect'>, string> = {
  any: 'interface {}',
  string: 'string',
  int: 'int',
  bool: 'bool',
  map: 'map[string]interface {}',
};

/** node.go String() of the node an error happened at. */
function nodeContext(n: NodeBase): string {
  const node = n as Node | ArgNode | CommandNode;
  switch (node.type) {
    case 'action':
      return `{{${nodeString(node.pipe)}}}`;
    case 'if':
    case 'with':
    case 'range':
      return `{{${node.type} ${nodeString(node.pipe)}}}`;
    case 'template':
      return `{{template ${goQuote(node.name)}${node.pipe ? ` ${nodeString(node.pipe)}` : ''}}}`;
    case 'text':
    case 'list':
    case 'break':
    case 'continue':
      return node.type;
    default:
      return nodeString(node);
  }
}

function methodOf(receiver: GoValue, name: string): GoFunc | undefined {
  if (receiver instanceof GoStruct) return Object.hasOwn(receiver.methods, name) ? receiver.methods[name] : undefined;
  if (Array.isArray(receiver)) {
    const methods = sliceInfo.get(receiver)?.methods;
    return methods && Object.hasOwn(methods, name) ? methods[name] : undefined;
  }
  return undefined;
}

/** Execute one template of the set, as Helm renders a file: runtime errors cleaned up like engine.go
 *  cleanupExecError, and "<no value>" removed from the output. */
export function execute(set: TemplateSet, name: string, data: GoValue, ctx?: CallContext): string {
  const context = ctx ?? { set, includedNames: new Map<string, number>() };
  try {
    return runTemplate({ ...context, set }, name, data).replaceAll('<no value>', '');
  } catch (e) {
    if (e instanceof ExecError || e instanceof FuncError) throw execFailure(name, e.message);
    throw e;
  }
}

/** text/template ExecuteTemplate: the raw output, Go's errors as ExecError. */
function runTemplate(ctx: CallContext, name: string, data: GoValue): string {
  const tree = ctx.set.templates.get(name);
  if (!tree) throw new ExecError(`template: no template ${goQuote(name)} associated with template ${goQuote(ctx.set.rootName)}`);
  const out: string[] = [];
  new State(ctx, name, data, 0, out).walk(data, tree.root);
  return out.join('');
}

/** engine.go cleanupExecError: required/fail messages become "execution error at (<loc>): <msg>". */
function execFailure(template: string, message: string): TemplateError {
  const tokens = message.split(': ');
  const location = tokens.length >= 3 ? (tokens[1] ?? '') : '';
  const rest = tokens.slice(2).join(': ');
  const m = new RegExp(`${HELM_ERR_START}([\\s\\S]*)${HELM_ERR_END}`).exec(rest);
  const lineMatch = /:(\d+):\d+$/.exec(location);
  const lineNo = lineMatch ? Number(lineMatch[1]) : undefined;
  if (m) return new TemplateError(`execution error at (${location}): ${m[1] ?? ''}`, template, lineNo);
  return new TemplateError(message, template, lineNo);
}

// ───────────────────────────── functions ─────────────────────────────

const fn = (params: ParamType[], call: GoFunc['call'], variadic?: ParamType): GoFunc => ({ params, variadic, call });
const fail = (msg: string): never => {
  throw new FuncError(msg);
};
/** Helm's required/fail errors, marked for cleanupExecError (engine.go warnWrap). */
const helmFail = (msg: string): never => fail(`${HELM_ERR_START}${msg}${HELM_ERR_END}`);

/** sprig strval (strings.go). */
function strval(v: GoValue): string {
  if (typeof v === 'string') return v;
  if (v instanceof GoStruct && v.stringer) return v.stringer();
  return fmtV(v);
}

/** sprig strslice (strings.go): nil elements dropped from []interface{}. */
function strslice(v: GoValue): string[] {
  if (Array.isArray(v)) return v.filter((x) => x !== null && x !== undefined).map(strval);
  return v === null || v === undefined ? [] : [strval(v)];
}

/** Go's int64(f) conversion: truncation; out of range (and NaN) gives 0x8000000000000000 on amd64. */
function floatToInt64(f: number): bigint {
  if (!Number.isFinite(f) || Math.abs(f) >= 2 ** 63) return -(2n ** 63n);
  return BigInt(Math.trunc(f));
}

/** cast trimZeroDecimal: "12.000" → "12". */
function trimZeroDecimal(s: string): string {
  let foundZero = false;
  for (let i = s.length; i > 0; i--) {
    const c = s[i - 1];
    if (c === '.') {
      if (foundZero) return s.slice(0, i - 1);
    } else if (c === '0') foundZero = true;
    else return s;
  }
  return s;
}

/** strconv.ParseInt(s, 0, 64) including the underscores Go literal syntax allows. */
function parseIntBase0(s: string): bigint | undefined {
  if (s.includes('_') && !/^[-+]?(0[xX](_?[0-9a-fA-F])+|0[oO](_?[0-7])+|0[bB](_?[01])+|0(_?[0-7])*|[1-9](_?[0-9])*)$/.test(s)) return undefined;
  return parseGoInt(s.replace(/_/g, ''), 0, 64);
}

/** spf13/cast ToInt64 as sprig calls it: errors swallowed to 0 (numeric.go toInt64). */
function toInt64(v: GoValue): bigint {
  if (v instanceof GoInt) return v.value;
  if (typeof v === 'number') return floatToInt64(v);
  if (typeof v === 'boolean') return v ? 1n : 0n;
  if (typeof v === 'string') return parseIntBase0(trimZeroDecimal(v)) ?? 0n;
  return 0n;
}

/** spf13/cast ToFloat64 (caste.go): strings through strconv.ParseFloat, errors to 0. */
function toFloat64(v: GoValue): number {
  if (v instanceof GoInt) return Number(v.value);
  if (typeof v === 'number') return v;
  if (typeof v === 'boolean') return v ? 1 : 0;
  if (typeof v === 'string') {
    if (/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(v)) return Number(v);
    if (/^[-+]?(inf|infinity)$/i.test(v)) return v.startsWith('-') ? -Infinity : Infinity;
    if (/^nan$/i.test(v)) return NaN;
    if (/^[-+]?0[xX]|_/.test(v)) throw new FuncError(`float64 of ${goQuote(v)} (hex or underscore syntax) is not supported by this renderer`);
    return 0;
  }
  return 0;
}

/** sprig empty (defaults.go): the zero value of its type. */
const empty = (v: GoValue): boolean => !isTrue(v);

/** reflect.Kind name, as sprig's "Cannot … on type %s" messages print it. */
function kindName(v: GoValue): string {
  if (Array.isArray(v)) return 'slice';
  if (isMap(v)) return 'map';
  if (v instanceof GoStruct) return 'struct';
  return typeName(v);
}

/** sprig list functions start with reflect.TypeOf(list).Kind(), which panics for nil. */
function asList(v: GoValue, what: string): GoValue[] {
  if (v === null || v === undefined) fail('runtime error: invalid memory address or nil pointer dereference');
  if (!Array.isArray(v)) fail(`Cannot ${what} on type ${kindName(v)}`);
  return v as GoValue[];
}

/** reflect.DeepEqual for template values. */
function deepEqual(a: GoValue, b: GoValue): boolean {
  if ((a === null || a === undefined) && (b === null || b === undefined)) return true;
  if (typeName(a) !== typeName(b)) return false;
  if (a instanceof GoInt && b instanceof GoInt) return a.value === b.value;
  if (Array.isArray(a) && Array.isArray(b)) return a.length === b.length && a.every((x, i) => deepEqual(x, b[i]));
  if (isMap(a) && isMap(b)) {
    const ka = Object.keys(a);
    return ka.length === Object.keys(b).length && ka.every((k) => Object.hasOwn(b, k) && deepEqual(a[k], b[k]));
  }
  if (a instanceof GoStruct || b instanceof GoStruct) return fail('comparing structs is not supported by this renderer');
  return a === b;
}

type BasicKind = 'bool' | 'int' | 'float' | 'string' | 'invalid';
function basicKind(v: GoValue): BasicKind {
  if (typeof v === 'boolean') return 'bool';
  if (v instanceof GoInt) return 'int';
  if (typeof v === 'number') return 'float';
  if (typeof v === 'string') return 'string';
  return 'invalid';
}
const isNilValue = (v: GoValue): boolean => v === null || v === undefined;

/** funcs.go eq: basic kinds must match (int vs float64 is an error), nil compares with anything nillable. */
function eq(a: GoValue, bs: GoValue[]): boolean {
  if (bs.length === 0) fail('missing argument for comparison');
  const k1 = basicKind(a);
  for (const b of bs) {
    const k2 = basicKind(b);
    let truth = false;
    if (k1 !== k2) {
      if (!isNilValue(a) && !isNilValue(b)) fail(`incompatible types for comparison: ${typeName(a)} and ${typeName(b)}`);
    } else if (k1 === 'int') truth = (a as GoInt).value === (b as GoInt).value;
    else if (k1 !== 'invalid') truth = a === b;
    else {
      if (!isNilValue(a) && !isNilValue(b) && kindName(a) !== kindName(b)) {
        fail(`non-comparable types ${fmtV(a)}: ${typeName(a)}, ${typeName(b)}: ${fmtV(b)}`);
      }
      if (isNilValue(a) || isNilValue(b)) truth = isNilValue(a) === isNilValue(b);
      else if (b instanceof GoStruct) fail('comparing structs is not supported by this renderer');
      else fail(`non-comparable type ${fmtV(b)}: ${typeName(b)}`);
    }
    if (truth) return true;
  }
  return false;
}

/** funcs.go lt. */
function lt(a: GoValue, b: GoValue): boolean {
  const k1 = basicKind(a);
  const k2 = basicKind(b);
  if (k1 === 'invalid' || k2 === 'invalid') fail('invalid type for comparison');
  if (k1 !== k2) fail(`incompatible types for comparison: ${typeName(a)} and ${typeName(b)}`);
  if (k1 === 'bool') fail('invalid type for comparison');
  if (k1 === 'int') return (a as GoInt).value < (b as GoInt).value;
  if (k1 === 'string') return compareBytes(a as string, b as string) < 0;
  return (a as number) < (b as number);
}

/** funcs.go index over maps and slices. */
function index(item: GoValue, indexes: GoValue[]): GoValue {
  if (item === undefined || item === null) fail('index of untyped nil');
  let cur: GoValue = item;
  for (const ix of indexes) {
    if (cur === null || cur === undefined) fail('index of nil pointer');
    if (Array.isArray(cur)) {
      if (ix === undefined || ix === null) fail('cannot index slice/array with nil');
      if (!(ix instanceof GoInt)) return fail(`cannot index slice/array with type ${typeName(ix)}`);
      const x = ix.value;
      if (x < 0n || x > BigInt(cur.length)) fail(`index out of range: ${x}`);
      if (x === BigInt(cur.length)) fail('reflect: slice index out of range');
      cur = cur[Number(x)];
    } else if (isMap(cur)) {
      if (ix === undefined || ix === null) fail('value is nil; should be of type string');
      if (typeof ix !== 'string') return fail(`value has type ${typeName(ix)}; should be string`);
      cur = Object.hasOwn(cur, ix) ? (cur[ix] ?? null) : null;
    } else if (typeof cur === 'string') {
      return fail('indexing a string is not supported by this renderer');
    } else return fail(`can't index item of type ${typeName(cur)}`);
  }
  return cur;
}

/** funcs.go length (reflect.Value argument: nil interface vs no value differ). */
function length(v: GoValue): GoInt {
  if (v === null) fail('len of nil pointer');
  if (v === undefined) fail('reflect: call of reflect.Value.Type on zero Value');
  if (typeof v === 'string') return int(Buffer.byteLength(v));
  if (Array.isArray(v)) return int(v.length);
  if (isMap(v)) return int(Object.keys(v).length);
  return fail(`len of type ${typeName(v)}`);
}

/** Go strings.TrimSpace: unicode.IsSpace at both ends. */
const goTrimSpace = (s: string): string =>
  s.replace(/^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+|[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$/g, '');

/** strings.ToUpper/ToLower map rune by rune (unicode.ToUpper), never growing a rune into several. */
function mapRunes(s: string, f: (ch: string) => string): string {
  return [...s].map((ch) => {
    const m = f(ch);
    return [...m].length === 1 ? m : ch;
  }).join('');
}

/** strings.Title (deprecated but what sprig's title calls): upper-case the first letter of each word. */
function goTitle(s: string): string {
  const isSeparator = (ch: string): boolean => {
    const cp = ch.codePointAt(0) ?? 0;
    if (cp <= 0x7f) return !/[A-Za-z0-9_]/.test(ch);
    if (/^[\p{L}\p{Nd}]$/u.test(ch)) return false;
    return /^\s$/u.test(ch);
  };
  let prev = ' ';
  return [...s]
    .map((ch) => {
      const out = isSeparator(prev) ? mapRunes(ch, (c) => c.toUpperCase()) : ch;
      prev = ch;
      return out;
    })
    .join('');
}

/** strings.Replace(src, old, new, -1), including Go's rule for an empty `old`. */
function goReplaceAll(src: string, old: string, rep: string): string {
  if (old === '') return rep + [...src].map((ch) => ch + rep).join('');
  return src.split(old).join(rep);
}

/** sprig trunc, which slices bytes. */
function trunc(c: bigint, s: string): string {
  const bytes = Buffer.from(s, 'utf8');
  const n = BigInt(bytes.length);
  let out: Buffer = bytes;
  if (c < 0n && n + c > 0n) out = bytes.subarray(Number(n + c));
  else if (c >= 0n && n > c) out = bytes.subarray(0, Number(c));
  const text = out.toString('utf8');
  if (Buffer.byteLength(text) !== out.length) fail('trunc cutting a multi-byte character is not supported by this renderer');
  return text;
}

function repeatSpaces(n: bigint): string {
  if (n < 0n) fail('strings: negative Repeat count');
  return ' '.repeat(Number(n));
}

/** dario.cat/mergo deepMerge for map[string]interface{} (merge.go), as sprig merge/mergeOverwrite use it. */
function mergeMaps(dst: GoMap, src: GoMap, overwrite: boolean): void {
  const isEmptyValue = (v: GoValue): boolean => v === undefined || !isTrue(v) && !(v instanceof GoStruct);
  for (const key of Object.keys(src)) {
    const s = src[key] ?? null;
    const d = Object.hasOwn(dst, key) ? dst[key] : undefined;
    if (s === null) {
      if (overwrite) dst[key] = null;
      continue;
    }
    if (isMap(s) && isMap(d)) mergeMaps(d, s, overwrite);
    else if (Array.isArray(s)) {
      let dstSlice: GoValue = d === undefined || d === null ? [] : d;
      if (overwrite || Object.keys(dst).length === 0) dstSlice = s;
      dst[key] = dstSlice;
    }
    if (d !== undefined && !isEmptyValue(d) && (Array.isArray(s) || (isMap(s) && isMap(d)))) continue;
    if (overwrite || d === undefined || isEmptyValue(d)) dst[key] = s;
  }
}

/** The subset of Masterminds/semver v3 constraints supported: ">=", "=>" and "<" comparisons, ANDed
 *  with "," or spaces and ORed with "||" (constraints.go NewConstraint, Check). */
export function semverCompare(constraint: string, version: string): boolean {
  const v = parseSemver(version);
  if (!v) return fail(`Invalid Semantic Version`);
  return constraint.split('||').some((group) => {
    const parts = group.trim().split(/\s*,\s*|\s+/).filter(Boolean);
    if (parts.length === 0) return fail(`improper constraint: ${group}`);
    const cons = parts.map((p) => {
      const m = /^(>=|=>|<)\s*(v?\d+(?:\.\d+)?(?:\.\d+)?(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?)$/.exec(p);
      if (!m) return fail(`semverCompare constraint ${goQuote(p)} is not supported by this renderer (only >=, => and < with plain versions)`);
      const c = parseSemver(m[2] ?? '');
      if (!c) return fail(`improper constraint: ${p}`);
      return { op: m[1] === '<' ? '<' : '>=', ver: c };
    });
    // A prerelease is only matched when some constraint of the group names one (constraints.go containsPre).
    const includePre = cons.some((c) => c.ver.pre !== '');
    if (v.pre !== '' && !includePre) return false;
    return cons.every((c) => (c.op === '<' ? compareSemver(v, c.ver) < 0 : compareSemver(v, c.ver) >= 0));
  });
}

interface Semver {
  nums: [bigint, bigint, bigint];
  pre: string;
}
/** semver.NewVersion (non-strict): optional "v", missing minor/patch are 0. */
function parseSemver(s: string): Semver | undefined {
  const m = /^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?(?:\+([0-9A-Za-z.-]+))?$/.exec(s);
  if (!m) return undefined;
  return { nums: [BigInt(m[1] ?? 0), BigInt(m[2] ?? 0), BigInt(m[3] ?? 0)], pre: m[4] ?? '' };
}
/** SemVer 2 precedence, as semver.Version.Compare. */
function compareSemver(a: Semver, b: Semver): number {
  for (let i = 0; i < 3; i++) {
    const x = a.nums[i] ?? 0n;
    const y = b.nums[i] ?? 0n;
    if (x !== y) return x < y ? -1 : 1;
  }
  if (a.pre === b.pre) return 0;
  if (a.pre === '') return 1;
  if (b.pre === '') return -1;
  const pa = a.pre.split('.');
  const pb = b.pre.split('.');
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const x = pa[i];
    const y = pb[i];
    if (x === undefined) return -1;
    if (y === undefined) return 1;
    if (x === y) continue;
    const xn = /^\d+$/.test(x);
    const yn = /^\d+$/.test(y);
    if (xn && yn) return BigInt(x) < BigInt(y) ? -1 : 1;
    if (xn !== yn) return xn ? -1 : 1;
    return x < y ? -1 : 1;
  }
  return 0;
}

/**
 * Go's regexp (RE2) compiled as a JS RegExp when the pattern uses only syntax both engines read the
 * same way; anything else (classes like [[:alpha:]], \pN, \A, \z, flags groups, look-around that RE2
 * rejects, backreferences) is refused rather than risk a different match.
 */
function goRegExp(pattern: string): RegExp {
  const refuse = (): never => fail(`regular expression ${goQuote(pattern)} uses syntax not supported by this renderer`);
  if (/\(\?|\[\[:|\\[pPAzQEC1-9]|\\[0-7]{1,3}/.test(pattern)) refuse();
  let out = '';
  let inClass = false;
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i] ?? '';
    if (c === '\\') {
      const e = pattern[i + 1] ?? '';
      i++;
      // RE2's \s is [\t\n\f\r ] (no \v, no Unicode spaces).
      if (e === 's' || e === 'S') {
        if (inClass) refuse();
        out += e === 's' ? '[\\t\\n\\f\\r ]' : '[^\\t\\n\\f\\r ]';
      } else if (/[dDwWbBtnrfv]/.test(e)) out += `\\${e}`;
      else if (/[^A-Za-z0-9]/.test(e)) out += /[\^$\\.*+?()[\]{}|/-]/.test(e) ? `\\${e}` : e;
      else refuse();
      continue;
    }
    if (c === '[' && !inClass) inClass = true;
    else if (c === ']' && inClass) inClass = false;
    out += c;
  }
  try {
    return new RegExp(out, 'u');
  } catch {
    return refuse();
  }
}

/** xstrings word splitting (convert.go nextWord) over ASCII, for snakecase and kebabcase. */
type WordType = 'number' | 'upper' | 'alphabet' | 'connector' | 'punct' | 'other';
function nextWord(s: string): { wt: WordType; word: string; rest: string } {
  const isConnector = (c: string | undefined): boolean => c !== undefined && /[-_ \t\n\v\f\r]/.test(c);
  const isPunct = (c: string | undefined): boolean => c !== undefined && /[!"#%&'()*,./:;?@[\\\]{}-]/.test(c) && c !== '-';
  const isUpper = (c: string | undefined): boolean => c !== undefined && /[A-Z]/.test(c);
  const isAlpha = (c: string | undefined): boolean => c !== undefined && /[A-Za-z]/.test(c);
  const isNum = (c: string | undefined): boolean => c !== undefined && /[0-9]/.test(c);
  const c0 = s[0];
  let n = 1;
  let wt: WordType;
  if (isConnector(c0)) {
    wt = 'connector';
    while (isConnector(s[n])) n++;
  } else if (isPunct(c0)) {
    wt = 'punct';
    while (isPunct(s[n])) n++;
  } else if (isUpper(c0)) {
    wt = 'upper';
    if (isUpper(s[n])) {
      while (isUpper(s[n])) n++;
      // "HTTPStatus" splits into "HTTP" and "Status".
      if (n < s.length && isAlpha(s[n])) n--;
    } else if (isAlpha(s[n])) {
      while (isAlpha(s[n]) && !isUpper(s[n])) n++;
    }
  } else if (isAlpha(c0)) {
    wt = 'alphabet';
    while (isAlpha(s[n]) && !isUpper(s[n])) n++;
  } else if (isNum(c0)) {
    wt = 'number';
    while (isNum(s[n])) n++;
  } else {
    wt = 'other';
    while (n < s.length && !isConnector(s[n]) && !isAlpha(s[n]) && !isNum(s[n]) && !isPunct(s[n])) n++;
  }
  return { wt, word: s.slice(0, n), rest: s.slice(n) };
}

/** xstrings camelCaseToLowerCase (convert.go), behind ToSnakeCase and ToKebabCase. */
function camelCaseToLowerCase(str: string, connector: string): string {
  if (/[^\x00-\x7f]/.test(str)) fail('snakecase/kebabcase of non-ASCII text is not supported by this renderer');
  if (str === '') return '';
  let out = '';
  const toLower = (wt: WordType | 'invalid', word: string): void => {
    if (wt !== 'upper' && wt !== 'connector') out += word;
    else out += [...word].map((c) => (/[-_ \t\n\v\f\r]/.test(c) ? connector : c.toLowerCase())).join('');
  };
  // `cur` is the word under the cursor; an exhausted input reads as Go's invalidWord.
  const cur: { wt: WordType | 'invalid'; word: string; rest: string } = nextWord(str);
  const advance = (): void => {
    Object.assign(cur, cur.rest === '' ? { wt: 'invalid', word: '', rest: '' } : nextWord(cur.rest));
  };
  // Read through a function: TypeScript would otherwise keep a narrowing across advance().
  const wt = (): WordType | 'invalid' => cur.wt;
  const isWordish = (): boolean => wt() === 'alphabet' || wt() === 'number';
  const separates = (): boolean => wt() !== 'invalid' && wt() !== 'punct' && wt() !== 'connector';
  while (cur.rest.length > 0) {
    if (wt() !== 'connector') toLower(wt(), cur.word);
    const prev = wt();
    const last = cur.word;
    advance();
    if (prev === 'number') {
      while (isWordish()) {
        toLower(wt(), cur.word);
        advance();
      }
      if (separates()) out += connector;
    } else if (prev === 'connector') toLower(prev, last);
    else if (prev !== 'punct') {
      if (wt() !== 'number') {
        if (wt() !== 'connector' && wt() !== 'punct') out += connector;
        continue;
      }
      if (cur.rest.length === 0) continue;
      const numWord = cur.word;
      advance();
      // A number followed by something other than letters belongs to the previous word ("Bld4Floor").
      if (wt() !== 'alphabet') {
        toLower('number', numWord);
        if (wt() !== 'connector' && wt() !== 'punct') out += connector;
        continue;
      }
      out += connector;
      toLower('number', numWord);
      while (isWordish()) {
        toLower(wt(), cur.word);
        advance();
      }
      if (separates()) out += connector;
    }
  }
  toLower(wt(), cur.word);
  return out;
}

/** xstrings ToPascalCase of v1.5 (sprig camelcase): connectors dropped, the letter after one upper-cased. */
function pascalCase(str: string): string {
  if (/[^\x00-\x7f]/.test(str)) fail('camelcase of non-ASCII text is not supported by this renderer');
  const isConnector = (c: string): boolean => /[-_ \t\n\v\f\r]/.test(c);
  const chars = [...str];
  let out = '';
  let i = 0;
  for (; i < chars.length && isConnector(chars[i] ?? ''); i++) out += chars[i];
  if (i === chars.length) return out;
  let r0 = (chars[i] ?? '').toUpperCase();
  for (i++; i < chars.length; i++) {
    const r1 = r0;
    r0 = chars[i] ?? '';
    if (isConnector(r0) && isConnector(r1)) {
      out += r1;
      continue;
    }
    if (isConnector(r1)) r0 = r0.toUpperCase();
    else out += r1;
  }
  return out + r0;
}

/** Helm's include (engine.go includeFun): a nesting counter per name, limit 1000. */
function include(ctx: CallContext, name: string, data: GoValue): string {
  const count = ctx.includedNames.get(name) ?? 0;
  if (count > 1000) fail(`rendering template has a nested reference name: ${name}: unable to execute template`);
  ctx.includedNames.set(name, count + 1);
  try {
    return runTemplate(ctx, name, data);
  } finally {
    ctx.includedNames.set(name, (ctx.includedNames.get(name) ?? 1) - 1);
  }
}

/** Helm's tpl (engine.go tplFun): parse the text as the root template of a clone of the set, then run it. */
function tpl(ctx: CallContext, text: string, vals: GoValue): string {
  const clone: TemplateSet = { ...ctx.set, templates: new Map(ctx.set.templates) };
  try {
    parseInto(clone, ctx.set.rootName, text);
  } catch (e) {
    if (e instanceof ParseError) fail(`cannot parse template ${goQuote(text)}: ${e.message}`);
    throw e;
  }
  try {
    return runTemplate({ ...ctx, set: clone }, ctx.set.rootName, vals).replaceAll('<no value>', '');
  } catch (e) {
    if (e instanceof ExecError || e instanceof FuncError) fail(`error during tpl function execution for ${goQuote(text)}: ${e.message}`);
    throw e;
  }
}

const str = (v: GoValue): string => v as string;
const num = (v: GoValue): bigint => (v as GoInt).value;

/** text/template builtins (funcs.go) and the Sprig/Helm functions this renderer implements. */
const FUNCS: Readonly<Record<string, GoFunc>> = {
  // text/template builtins; and/or are evaluated lazily by the evaluator itself.
  not: fn(['reflect'], ([a]) => !isTrue(a)),
  len: fn(['reflect'], ([a]) => length(a)),
  index: fn(['reflect'], ([item, ...ix]) => index(item, ix), 'reflect'),
  print: fn([], (args) => sprint(args), 'any'),
  printf: fn(['string'], ([f, ...args]) => sprintf(str(f), args), 'any'),
  println: fn([], (args) => `${args.map(fmtV).join(' ')}\n`, 'any'),
  eq: fn(['reflect'], ([a, ...bs]) => eq(a, bs), 'reflect'),
  ne: fn(['reflect', 'reflect'], ([a, b]) => !eq(a, [b])),
  lt: fn(['reflect', 'reflect'], ([a, b]) => lt(a, b)),
  le: fn(['reflect', 'reflect'], ([a, b]) => lt(a, b) || eq(a, [b])),
  gt: fn(['reflect', 'reflect'], ([a, b]) => !(lt(a, b) || eq(a, [b]))),
  ge: fn(['reflect', 'reflect'], ([a, b]) => !lt(a, b)),

  // sprig defaults.go
  default: fn(['any'], ([d, ...given]) => (given.length === 0 || empty(given[0]) ? d : given[0]), 'any'),
  empty: fn(['any'], ([v]) => empty(v)),
  coalesce: fn([], (args) => args.find((v) => !empty(v)) ?? null, 'any'),
  ternary: fn(['any', 'any', 'bool'], ([vt, vf, v]) => (v ? vt : vf)),
  toJson: fn(['any'], ([v]) => {
    try {
      return toGoJson(v);
    } catch (e) {
      if (e instanceof FuncError && e.message.startsWith('json: unsupported value')) return '';
      throw e;
    }
  }),

  // sprig strings.go
  quote: fn([], (args) => args.filter((s) => s !== null).map((s) => goQuote(strval(s))).join(' '), 'any'),
  squote: fn([], (args) => args.filter((s) => s !== null).map((s) => `'${fmtV(s)}'`).join(' '), 'any'),
  upper: fn(['string'], ([s]) => mapRunes(str(s), (c) => c.toUpperCase())),
  lower: fn(['string'], ([s]) => mapRunes(str(s), (c) => c.toLowerCase())),
  title: fn(['string'], ([s]) => goTitle(str(s))),
  trim: fn(['string'], ([s]) => goTrimSpace(str(s))),
  trimSuffix: fn(['string', 'string'], ([a, b]) => (str(a) !== '' && str(b).endsWith(str(a)) ? str(b).slice(0, -str(a).length) : str(b))),
  trimPrefix: fn(['string', 'string'], ([a, b]) => (str(b).startsWith(str(a)) ? str(b).slice(str(a).length) : str(b))),
  trunc: fn(['int', 'string'], ([c, s]) => trunc(num(c), str(s))),
  replace: fn(['string', 'string', 'string'], ([o, n, s]) => goReplaceAll(str(s), str(o), str(n))),
  contains: fn(['string', 'string'], ([sub, s]) => str(s).includes(str(sub))),
  hasPrefix: fn(['string', 'string'], ([p, s]) => str(s).startsWith(str(p))),
  hasSuffix: fn(['string', 'string'], ([p, s]) => str(s).endsWith(str(p))),
  indent: fn(['int', 'string'], ([n, s]) => {
    const pad = repeatSpaces(num(n));
    return pad + str(s).replaceAll('\n', `\n${pad}`);
  }),
  nindent: fn(['int', 'string'], ([n, s]) => {
    const pad = repeatSpaces(num(n));
    return `\n${pad}${str(s).replaceAll('\n', `\n${pad}`)}`;
  }),
  toString: fn(['any'], ([v]) => strval(v)),
  join: fn(['string', 'any'], ([sep, v]) => strslice(v).join(str(sep))),
  sortAlpha: fn(['any'], ([v]) =>
    typedSlice(Array.isArray(v) ? strslice(v).sort(compareBytes) : [strval(v)], { elem: 'string' }),
  ),
  splitList: fn(['string', 'string'], ([sep, s]) => typedSlice(str(sep) === '' ? [...str(s)] : str(s).split(str(sep)), { elem: 'string' })),
  b64enc: fn(['string'], ([s]) => Buffer.from(str(s), 'utf8').toString('base64')),
  sha256sum: fn(['string'], ([s]) => createHash('sha256').update(str(s), 'utf8').digest('hex')),
  kebabcase: fn(['string'], ([s]) => camelCaseToLowerCase(str(s), '-')),
  snakecase: fn(['string'], ([s]) => camelCaseToLowerCase(str(s), '_')),
  camelcase: fn(['string'], ([s]) => pascalCase(str(s))),
  regexMatch: fn(['string', 'string'], ([re, s]) => goRegExp(str(re)).test(str(s))),
  atoi: fn(['string'], ([s]) => int(/^[-+]?\d+$/.test(str(s)) ? (parseGoInt(str(s), 10, 64) ?? 0n) : 0n)),

  // sprig numeric.go, over spf13/cast
  int: fn(['any'], ([v]) => int(BigInt.asIntN(64, toInt64(v)))),
  int64: fn(['any'], ([v]) => int64(toInt64(v))),
  float64: fn(['any'], ([v]) => toFloat64(v)),
  add: fn([], (args) => int64(args.reduce<bigint>((acc, v) => acc + toInt64(v), 0n)), 'any'),
  add1: fn(['any'], ([v]) => int64(toInt64(v) + 1n)),
  sub: fn(['any', 'any'], ([a, b]) => int64(toInt64(a) - toInt64(b))),
  mul: fn(['any'], ([a, ...rest]) => int64(rest.reduce<bigint>((acc, v) => BigInt.asIntN(64, acc * toInt64(v)), toInt64(a))), 'any'),
  div: fn(['any', 'any'], ([a, b]) => {
    const d = toInt64(b);
    if (d === 0n) fail('runtime error: integer divide by zero');
    return int64(toInt64(a) / d);
  }),
  mod: fn(['any', 'any'], ([a, b]) => {
    const d = toInt64(b);
    if (d === 0n) fail('runtime error: integer divide by zero');
    return int64(toInt64(a) % d);
  }),
  max: fn(['any'], ([a, ...rest]) => int64(rest.reduce<bigint>((m, v) => (toInt64(v) > m ? toInt64(v) : m), toInt64(a))), 'any'),
  min: fn(['any'], ([a, ...rest]) => int64(rest.reduce<bigint>((m, v) => (toInt64(v) < m ? toInt64(v) : m), toInt64(a))), 'any'),
  until: fn(['int'], ([n]) => {
    const count = num(n);
    const step = count < 0n ? -1n : 1n;
    const out: GoValue[] = [];
    for (let i = 0n; step > 0n ? i < count : i > count; i += step) out.push(int(i));
    return typedSlice(out, { elem: 'int' });
  }),

  // sprig list.go and dict.go
  list: fn([], (args) => [...args], 'any'),
  append: fn(['any', 'any'], ([l, v]) => [...asList(l, 'push'), v]),
  first: fn(['any'], ([l]) => asList(l, 'find first')[0] ?? null),
  last: fn(['any'], ([l]) => asList(l, 'find last').at(-1) ?? null),
  has: fn(['any', 'any'], ([needle, haystack]) => (haystack === null ? false : asList(haystack, 'find has').some((h) => deepEqual(needle, h)))),
  dict: fn([], (args) => {
    const d: GoMap = {};
    for (let i = 0; i < args.length; i += 2) d[strval(args[i])] = i + 1 < args.length ? (args[i + 1] ?? null) : '';
    return d;
  }, 'any'),
  get: fn(['map', 'string'], ([d, k]) => (d !== null && Object.hasOwn(d as GoMap, str(k)) ? ((d as GoMap)[str(k)] ?? null) : '')),
  set: fn(['map', 'string', 'any'], ([d, k, v]) => {
    if (d === null) fail('assignment to entry in nil map');
    (d as GoMap)[str(k)] = v ?? null;
    return d;
  }),
  unset: fn(['map', 'string'], ([d, k]) => {
    if (d !== null) delete (d as GoMap)[str(k)];
    return d;
  }),
  hasKey: fn(['map', 'string'], ([d, k]) => d !== null && Object.hasOwn(d as GoMap, str(k))),
  // Go iterates maps in random order, so Helm's keys is unordered; one of its possible orders is the sorted one.
  keys: fn([], (dicts) => typedSlice(dicts.flatMap((d) => (d === null ? [] : sortedKeys(d as GoMap))), { elem: 'string' }), 'map'),
  merge: fn(['map'], ([dst, ...srcs]) => {
    const target = (dst ?? {}) as GoMap;
    for (const s of srcs) if (s !== null) mergeMaps(target, s as GoMap, false);
    return target;
  }, 'map'),
  mergeOverwrite: fn(['map'], ([dst, ...srcs]) => {
    const target = (dst ?? {}) as GoMap;
    for (const s of srcs) if (s !== null) mergeMaps(target, s as GoMap, true);
    return target;
  }, 'map'),

  // sprig semver.go
  semverCompare: fn(['string', 'string'], ([c, v]) => semverCompare(str(c), str(v))),

  // Helm engine.go / funcs.go
  toYaml: fn(['any'], ([v]) => toYaml(v)),
  required: fn(['string', 'any'], ([warn, val]) => {
    if (val === null || val === '') helmFail(str(warn));
    return val;
  }),
  fail: fn(['string'], ([msg]) => helmFail(str(msg))),
  include: fn(['string', 'any'], ([name, data], ctx) => include(ctx, str(name), data)),
  tpl: fn(['string', 'any'], ([text, vals], ctx) => tpl(ctx, str(text), vals)),
  // `helm template` has no cluster: lookup answers an empty map (engine/funcs.go placeholder).
  lookup: fn(['string', 'string', 'string', 'string'], () => ({})),
};
