/**
 * Tests of scripts/chart (a Helm 3 rendering subset). Each expectation is what Helm 3 produces,
 * justified from the Go, Sprig and Helm sources named in the comments (helm/helm dev-v3, Go ≥ 1.22
 * text/template and fmt, Sprig v3.3.0, goyaml v2 via sigs.k8s.io/yaml v1.6.0).
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { execute, formatFloatG, GoInt, parseTemplates, sprintf, TemplateError, toYaml, type GoValue } from '../../scripts/chart/go-template.js';
import { parseGoYaml, renderChart, renderObjects, splitManifests } from '../../scripts/chart/helm.js';

/** Render one inline template the way Helm renders a file. */
const render = (text: string, data: GoValue = {}, name = 't'): string => execute(parseTemplates({ [name]: text }), name, data);
const renderError = (text: string, data: GoValue = {}): string => {
  try {
    render(text, data);
  } catch (e) {
    expect(e).toBeInstanceOf(TemplateError);
    return (e as Error).message;
  }
  throw new Error('expected a TemplateError');
};

describe('actions, trim markers and comments (parse/lex.go)', () => {
  it('trims all adjacent whitespace, newlines included, on the marked side only', () => {
    expect(render('a  \n {{- "b" -}} \n\t c')).toBe('abc');
    expect(render('a {{- "b" }} c')).toBe('ab c');
    expect(render('a {{ "b" -}} c')).toBe('a bc');
  });

  it('needs a space after "{{-": {{-3}} is the number -3 (lex.go hasLeftTrimMarker)', () => {
    expect(render('x {{-3}}')).toBe('x -3');
  });

  it('drops comments, with their trim markers', () => {
    expect(render('x {{- /* a\ncomment */ -}} y')).toBe('xy');
    expect(render('x {{/* c */}} y')).toBe('x  y');
  });

  it('accepts newlines inside actions (Go ≥ 1.16 lexSpace)', () => {
    expect(render('{{ printf "%s-%s"\n  "a"\n  "b" }}')).toBe('a-b');
  });

  it('pipes the value in as the last argument, and evaluates parenthesised pipelines and chains', () => {
    expect(render('{{ "abc" | printf "%s-%s" "x" }}')).toBe('x-abc');
    expect(render('{{ (index .m "a").b }}', { m: { a: { b: 'deep' } } })).toBe('deep');
    expect(render('{{ (dict "k" "v").k }}')).toBe('v');
  });

  it('declares and reassigns variables; $ is the root', () => {
    expect(render('{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }} {{ $.a }}', { a: 'root' })).toBe('2 root');
    expect(render('{{ with .a }}{{ $.b }}{{ end }}', { a: 1, b: 'B' })).toBe('B');
  });

  it('reports parse errors as Helm does (engine.go cleanupParseError)', () => {
    expect(() => parseTemplates({ 'c/templates/x.yaml': 'a\n{{ if }}' })).toThrow('parse error at (c/templates/x.yaml:2): missing value for if');
    expect(() => parseTemplates({ x: '{{ nope 1 }}' })).toThrow('parse error at (x:1): function "nope" not defined');
    expect(() => parseTemplates({ x: '{{ $y }}' })).toThrow('undefined variable "$y"');
    expect(() => parseTemplates({ x: '{{ if 1 }}' })).toThrow('unexpected EOF');
  });
});

describe('control structures (exec.go)', () => {
  it('uses Go truthiness: false, 0, nil, "", empty list and map are false', () => {
    const data = { f: false, z: 0, s: '', l: [], m: {}, t: 'x' };
    expect(render('{{ range $k := list .f .z .n .s .l .m .t }}{{ if $k }}T{{ else }}F{{ end }}{{ end }}', data)).toBe('FFFFFFT');
  });

  it('supports else if, with/else with, and range/else', () => {
    const t = '{{ if .a }}a{{ else if .b }}b{{ else }}c{{ end }}';
    expect(render(t, { a: 1 })).toBe('a');
    expect(render(t, { b: 1 })).toBe('b');
    expect(render(t, {})).toBe('c');
    expect(render('{{ with .x }}{{ . }}{{ else with .y }}y={{ . }}{{ else }}none{{ end }}', { y: 2 })).toBe('y=2');
    expect(render('{{ range .l }}{{ . }}{{ else }}empty{{ end }}', { l: [] })).toBe('empty');
    expect(render('{{ range .missing }}x{{ else }}empty{{ end }}')).toBe('empty');
  });

  it('ranges over maps in sorted key order (fmtsort) and over lists with index', () => {
    expect(render('{{ range $k, $v := .m }}{{ $k }}={{ $v }};{{ end }}', { m: { b: 2, a: 1, B: 'x' } })).toBe('B=x;a=1;b=2;');
    expect(render('{{ range $i, $v := list "x" "y" }}{{ $i }}:{{ $v }} {{ end }}')).toBe('0:x 1:y ');
    expect(render('{{ range $v := list "x" "y" }}{{ $v }}{{ end }}')).toBe('xy');
  });

  it('ranges over an int and supports break and continue (Go ≥ 1.22 / 1.18)', () => {
    expect(render('{{ range 4 }}{{ if eq . 1 }}{{ continue }}{{ end }}{{ if eq . 3 }}{{ break }}{{ end }}{{ . }}{{ end }}')).toBe('02');
  });

  it('nests define, include and nindent', () => {
    const t = [
      '{{- define "inner" }}k: {{ .v }}{{ end }}',
      '{{- define "outer" }}a:{{ include "inner" . | nindent 2 }}{{ end -}}',
      'top:{{ include "outer" . | nindent 2 }}',
    ].join('\n');
    expect(render(t, { v: 'x' })).toBe('top:\n  a:\n    k: x');
  });

  it('runs template and block actions with the given dot, without inherited variables', () => {
    expect(render('{{ define "d" }}[{{ . }}]{{ end }}{{ template "d" "x" }}{{ template "d" }}')).toBe('[x][]');
    expect(render('{{ block "b" .v }}<{{ . }}>{{ end }}', { v: 'z' })).toBe('<z>');
  });

  it('lets a later file replace a define, in Helm\'s parse order (engine.go sortTemplates)', () => {
    // Same depth: parsed in reverse lexical order, so _a.tpl (parsed last) wins.
    const set = parseTemplates({ 'c/templates/_a.tpl': '{{ define "n" }}A{{ end }}', 'c/templates/_b.tpl': '{{ define "n" }}B{{ end }}', 'c/templates/x': '{{ include "n" . }}' });
    expect(execute(set, 'c/templates/x', {})).toBe('A');
  });
});

describe('missing values and nil (exec.go evalField, engine.go "<no value>")', () => {
  it('prints a missing key as an empty string (Go prints <no value>, Helm removes it)', () => {
    expect(render('[{{ .Values.missing }}]', { Values: {} })).toBe('[]');
  });

  it('passes a missing key to functions as nil', () => {
    expect(render('{{ print .missing }}|{{ printf "%v" .missing }}|{{ .missing | default "d" }}')).toBe('<nil>|<nil>|d');
  });

  it('fails on a field of a missing map key, with Go\'s message and the column of the second field', () => {
    expect(renderError('x\n  {{ .Values.a.b }}', { Values: {} })).toBe(
      'template: t:2:12: executing "t" at <.Values.a.b>: nil pointer evaluating interface {}.b',
    );
  });

  it('gives no value, without an error, for a field of a variable holding no value', () => {
    expect(render('{{ $x := .missing }}[{{ $x.y }}][{{ (index . "missing").y }}]')).toBe('[][]');
  });

  it('cannot take a field of a string', () => {
    expect(renderError('{{ .a.b }}', { a: 's' })).toContain("can't evaluate field b in type interface {}");
  });
});

describe('numbers: float64 from values, int from functions (fmt print.go, strconv ftoa.go)', () => {
  it('prints float64 with %v = strconv "g" shortest, switching to %e at exponent >= 6 (ftoa.go: if shortest { eprec = 6 })', () => {
    const cases: Array<[number, string]> = [
      [50051, '50051'],
      [100000, '100000'],
      [1000000, '1e+06'],
      [68157440, '6.815744e+07'],
      [1073741824, '1.073741824e+09'],
      [0.1, '0.1'],
      [0.0001, '0.0001'],
      [1e-5, '1e-05'],
      [-2.5, '-2.5'],
      [1e21, '1e+21'],
    ];
    for (const [v, s] of cases) {
      expect(formatFloatG(v)).toBe(s);
      expect(render('{{ .Values.x }}', { Values: { x: v } })).toBe(s);
    }
  });

  it('prints Go ints (literals, int, int64, len, add) as plain decimals', () => {
    expect(render('{{ 1000000 }} {{ 1e6 }} {{ int64 .x }} {{ int .x }} {{ add .x 0 }} {{ len (list 1 2) }}', { x: 1000000 })).toBe('1000000 1e+06 1000000 1000000 1000000 2');
  });

  it('converts like spf13/cast: truncation, base-0 strings, errors to 0', () => {
    expect(render('{{ int 2.9 }} {{ int -2.9 }} {{ int "42" }} {{ int "0x1F" }} {{ int "08" }} {{ int "12.00" }} {{ int "x" }} {{ int true }}')).toBe('2 -2 42 31 0 12 0 1');
    expect(render('{{ float64 "1.5" }} {{ float64 3 }}')).toBe('1.5 3');
  });

  it('does int64 arithmetic as sprig does (numeric.go), with Go\'s division', () => {
    expect(render('{{ add 1 2.9 }} {{ sub 5 7 }} {{ mul 2 3 4 }} {{ div 7 2 }} {{ div -7 2 }} {{ mod -7 2 }} {{ max 1 5 3 }} {{ min 4 2 }} {{ add1 1 }}')).toBe(
      '3 -2 24 3 -3 -1 5 2 2',
    );
    expect(renderError('{{ div 1 0 }}')).toContain('error calling div: runtime error: integer divide by zero');
  });

  it('refuses int arguments of the wrong Go type, as validateType does', () => {
    expect(renderError('{{ trunc (add 1 2) "abcdef" }}')).toContain('wrong type for value; expected int; got int64');
    expect(render('{{ trunc (int (add 1 2)) "abcdef" }}')).toBe('abc');
  });
});

describe('comparisons (funcs.go eq, lt)', () => {
  it('refuses to compare int with float64', () => {
    expect(renderError('{{ eq 1 1.0 }}')).toBe('template: t:1:3: executing "t" at <eq 1 1.0>: error calling eq: incompatible types for comparison: int and float64');
    expect(renderError('{{ eq .Values.n 3 }}', { Values: { n: 3 } })).toContain('incompatible types for comparison: float64 and int');
    expect(renderError('{{ lt 1 2.5 }}')).toContain('incompatible types for comparison: int and float64');
  });

  it('compares int with int64, and is true when the first equals any of the others', () => {
    expect(render('{{ eq (int64 3) 3 }} {{ eq "b" "a" "b" }} {{ eq 1 2 3 }} {{ ne "a" "b" }}')).toBe('true true false true');
  });

  it('compares nil with anything without error', () => {
    expect(render('{{ eq .missing "x" }} {{ eq .missing nil }} {{ eq .m nil }}', { m: {} })).toBe('false true false');
  });

  it('orders strings and numbers of the same kind', () => {
    expect(render('{{ lt "a" "b" }} {{ le 2 2 }} {{ gt 2.5 1.5 }} {{ ge 1 2 }}')).toBe('true true true false');
    expect(renderError('{{ lt .missing 1 }}')).toContain('invalid type for comparison');
  });

  it('short-circuits and/or, returning the deciding operand', () => {
    expect(render('{{ or .a (fail "not evaluated") }} {{ and .z (fail "not evaluated") }}|{{ or 0 "" "x" }}|{{ and 1 2 }}', { a: 'A', z: 0 })).toBe('A 0|x|2');
  });
});

describe('fmt.Sprintf (print.go doPrintf)', () => {
  it('formats %s %d %v %q %t %f with width and precision', () => {
    expect(sprintf('%s|%d|%v|%q|%t|%.2f|%5s|%-4d|%05d|%x%%', ['a', new GoInt(3n), 1.5, 'q"', true, 2.345, 'ab', new GoInt(7n), new GoInt(-42n)])).toBe(
      'a|3|1.5|"q\\""|true|2.35|   ab|7   |-0042|%!x(MISSING)%',
    );
  });

  it('rounds %f half to even on the exact binary value, unlike toFixed', () => {
    expect(render('{{ printf "%.2f %.2f %.2f %.0f" 0.125 0.375 2.675 2.5 }}')).toBe('0.12 0.38 2.67 2');
  });

  it('prints Go\'s bad-verb and missing/extra operand markers', () => {
    expect(render('{{ printf "%d" .x }}', { x: 3 })).toBe('%!d(float64=3)');
    expect(render('{{ printf "%s" 5 }}|{{ printf "%d" }}|{{ printf "x" 1 "a" }}')).toBe('%!s(int=5)|%!d(MISSING)|x%!(EXTRA int=1, string=a)');
  });

  it('prints maps and lists as fmt does', () => {
    expect(render('{{ .m }} {{ .l }}', { m: { b: 1, a: [true, null] }, l: ['x', 2] })).toBe('map[a:[true <nil>] b:1] [x 2]');
  });
});

describe('toYaml (sigs.k8s.io/yaml: json.Marshal, then goyaml v2 re-reads and emits)', () => {
  it('sorts keys with goyaml\'s keyList order, indents maps by 2 and does not indent lists under a key', () => {
    const v = { b: [1, { x: 'y', l: ['p'] }], a: { c: {} }, a10: 1, a9: 2, B: 3, _x: 4, '1': 5 };
    expect(toYaml(v)).toBe(
      ['_x: 4', '"1": 5', 'B: 3', 'a:', '  c: {}', 'a9: 2', 'a10: 1', 'b:', '- 1', '- l:', '  - p', '  x: "y"'].join('\n'),
    );
  });

  it('quotes strings only when they would read back as something else (encode.go stringv, emitterc.go)', () => {
    const strings = ['true', '', '1', '1.5', 'yes', 'n', 'null', '~', '2024-01-02', '1:20', '0x1F', '1e3', 'a: b', '*x', ' lead', "it's: x", '-', '#x', 'x #y', 'x#y', 'a b', 'tab\there', 'plain'];
    expect(toYaml(strings)).toBe(
      [
        '- "true"', '- ""', '- "1"', '- "1.5"', '- "yes"', '- "n"', '- "null"', '- "~"', '- "2024-01-02"', '- "1:20"', '- "0x1F"', '- "1e3"',
        "- 'a: b'", "- '*x'", "- ' lead'", "- 'it''s: x'", "- '-'", "- '#x'", "- 'x #y'", '- x#y', '- a b', '- "tab\\there"', '- plain',
      ].join('\n'),
    );
  });

  it('writes numbers as the JSON round trip leaves them: integral floats become ints', () => {
    expect(toYaml({ a: 1000000, b: 1.5, c: 1e21, d: 0.00001, e: 123456789.5, f: new GoInt(7n), g: null, h: false })).toBe(
      ['a: 1000000', 'b: 1.5', 'c: 1e+21', 'd: 1e-05', 'e: 1.234567895e+08', 'f: 7', 'g: null', 'h: false'].join('\n'),
    );
  });

  it('uses literal block scalars for multi-line strings, with chomping hints', () => {
    expect(toYaml({ a: 'l1\nl2\n', b: 'l1\nl2', c: 'l1\n\n', d: '  x\ny', e: 'a \nb' })).toBe(
      ['a: |', '  l1', '  l2', 'b: |-', '  l1', '  l2', 'c: |+', '  l1', '', 'd: |2-', '    x', '  y', 'e: "a \\nb"'].join('\n'),
    );
  });

  it('folds long plain strings at spaces past column 80 (goyaml v2 best_width)', () => {
    const long = Array.from({ length: 30 }, () => 'word').join(' ');
    expect(toYaml({ long })).toBe(`long: ${Array(16).fill('word').join(' ')}\n  ${Array(14).fill('word').join(' ')}`);
  });

  it('renders nested lists and empty collections', () => {
    expect(render('{{ toYaml (list) }}|{{ toYaml (dict) }}|{{ toYaml (list (list 1 2) (dict "a" 1 "b" 2)) }}')).toBe('[]|{}|- - 1\n  - 2\n- a: 1\n  b: 2');
  });

  it('is used with nindent as charts do', () => {
    expect(render('spec:\n  x:{{ toYaml .v | nindent 4 }}', { v: { k: ['a', 'b'] } })).toBe('spec:\n  x:\n    k:\n    - a\n    - b');
  });
});

describe('Sprig and Helm functions', () => {
  it('default treats 0, "", false, empty list and nil as unset (defaults.go dfault/empty)', () => {
    expect(render('{{ default "d" 0 }} {{ default "d" "" }} {{ default "d" false }} {{ default "d" (list) }} {{ default "d" .x }} {{ default "d" "v" }} {{ default "d" }}')).toBe(
      'd d d d d v d',
    );
    expect(render('{{ empty 0 }} {{ empty "a" }} {{ coalesce .x "" "c" }} {{ ternary "y" "n" true }}')).toBe('true false c y');
  });

  it('required and fail produce Helm\'s "execution error at" messages (engine.go cleanupExecError)', () => {
    expect(renderError('a\n{{ required "x is required" .x }}')).toBe('execution error at (t:2:3): x is required');
    expect(renderError('{{ required "empty" "" }}')).toBe('execution error at (t:1:3): empty');
    expect(render('{{ required "x" 0 }}')).toBe('0');
    expect(renderError('{{ fail "boom" }}')).toBe('execution error at (t:1:3): boom');
    // From inside an include, the location is the including template's.
    expect(renderError('{{ define "h" }}{{ fail "inner" }}{{ end }}\n{{ include "h" . }}')).toBe('execution error at (t:2:3): inner');
  });

  it('implements the string functions', () => {
    expect(render('{{ quote "a\\"b" }} {{ quote 5 }} {{ quote .x }}{{ squote 1.5 }} {{ upper "aß" }} {{ lower "AB" }} {{ title "hello wide-world" }}', {})).toBe(
      '"a\\"b" "5" \'1.5\' Aß ab Hello Wide-World',
    );
    expect(render('{{ trunc 3 "abcdef" }} {{ trunc -2 "abcdef" }} {{ "abc-" | trimSuffix "-" }} {{ trimPrefix "a" "abc" }} {{ trim "  x \\n" }}')).toBe('abc ef abc bc x');
    expect(render('{{ replace "+" "_" "1+2+3" }} {{ contains "b" "abc" }} {{ hasPrefix "a" "abc" }} {{ hasSuffix "c" "abc" }}')).toBe('1_2_3 true true true');
    expect(render('{{ indent 2 "a\\nb" }}|{{ nindent 1 "a" }}')).toBe('  a\n  b|\n a');
    expect(render('{{ join "," (list "a" 1 .missing) }} {{ splitList "," "a,b" }} {{ until 3 }} {{ toString 1.5 }}')).toBe('a,1 [a b] [0 1 2] 1.5');
    expect(render('{{ b64enc "hi" }} {{ sha256sum "abc" }}')).toBe('aGk= ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad');
  });

  it('implements the dict and list functions', () => {
    const t = '{{ $d := dict "b" 1 "a" 2 }}{{ $_ := set $d "c" 3 }}{{ $_ = unset $d "b" }}{{ hasKey $d "a" }} {{ keys $d | sortAlpha }} {{ toJson $d }}';
    expect(render(t)).toBe('true [a c] {"a":2,"c":3}');
    expect(render('{{ $l := list 1 }}{{ $l = append $l 2 }}{{ $l }} {{ first $l }} {{ last $l }} {{ has 2 $l }} {{ has "2" $l }}')).toBe('[1 2] 1 2 true false');
  });

  it('merges like mergo: merge keeps existing values, mergeOverwrite replaces them (dict.go)', () => {
    const t = '{{ $a := dict "x" 1 "n" (dict "p" 1) "l" (list 1) }}{{ $b := dict "x" 2 "y" 3 "n" (dict "p" 2 "q" 2) "l" (list 2) }}';
    expect(render(`${t}{{ toJson (merge $a $b) }}`)).toBe('{"l":[1],"n":{"p":1,"q":2},"x":1,"y":3}');
    expect(render(`${t}{{ toJson (mergeOverwrite $a $b) }}`)).toBe('{"l":[2],"n":{"p":2,"q":2},"x":2,"y":3}');
  });

  it('encodes JSON as encoding/json does: sorted keys, HTML escaping, %e only for tiny or huge floats', () => {
    expect(render('{{ toJson (dict "b" "<a&b>" "a" 1000000 "c" 0.0000001 "d" (list nil true)) }}')).toBe('{"a":1000000,"b":"\\u003ca\\u0026b\\u003e","c":1e-7,"d":[null,true]}');
  });

  it('compares versions with semverCompare, including prereleases only when the constraint has one', () => {
    expect(render('{{ semverCompare ">=1.27-0" "v1.30.0" }} {{ semverCompare ">=1.27-0" "v1.27.3-gke.100" }} {{ semverCompare ">=1.27" "v1.27.3-gke.100" }} {{ semverCompare "<1.27" "1.26.9" }}')).toBe(
      'true true false true',
    );
    expect(renderError('{{ semverCompare "~1.2" "1.2.3" }}')).toContain('not supported by this renderer');
  });

  it('converts case as xstrings does (kebabcase/snakecase samples from convert.go)', () => {
    expect(render('{{ kebabcase "FirstName" }} {{ kebabcase "HTTPServer" }} {{ kebabcase "NoHTTPS" }} {{ kebabcase "GO_PATH" }} {{ kebabcase "http2xx" }} {{ kebabcase "HTTP20xOK" }} {{ kebabcase "Duration2m3s" }} {{ kebabcase "Bld4Floor3rd" }}')).toBe(
      'first-name http-server no-https go-path http-2xx http-20x-ok duration-2m3s bld4-floor-3rd',
    );
    expect(render('{{ snakecase "FirstName" }} {{ camelcase "some_words" }} {{ camelcase "_complex__case_" }}')).toBe('first_name SomeWords _Complex_Case_');
  });

  it('matches regular expressions with RE2 semantics where they coincide, and refuses the rest', () => {
    expect(render('{{ regexMatch "^[a-z]+-\\\\d+$" "abc-12" }} {{ regexMatch "b" "abc" }}')).toBe('true true');
    expect(renderError('{{ regexMatch "(?P<x>a)" "a" }}')).toContain('not supported by this renderer');
  });

  it('renders tpl against the given values, and lookup as an empty map', () => {
    expect(render('{{ tpl "{{ .x }}!" . }} {{ lookup "v1" "Pod" "ns" "n" }}', { x: 'hi' })).toBe('hi! map[]');
  });

  it('names unsupported Sprig functions at parse time instead of rendering something else', () => {
    expect(() => parseTemplates({ x: '{{ fromYaml "a: 1" }}' })).toThrow('function "fromYaml" is a Helm/Sprig function that is not supported by this renderer');
  });

  it('checks argument counts and types as Go does', () => {
    expect(renderError('{{ upper 1 }}')).toContain('expected string; found 1');
    expect(renderError('{{ upper .missing }}')).toContain('wrong type for value; expected string; got interface {}');
    expect(renderError('{{ trimSuffix "a" }}')).toContain('wrong number of args for trimSuffix: want 2 got 1');
  });
});

describe('reading YAML as sigs.k8s.io/yaml does (goyaml v2 resolve.go, then JSON)', () => {
  it('applies YAML 1.1 plain scalars and makes every number a float64', () => {
    const v = parseGoYaml('a: yes\nb: off\nc: 0777\nd: 1_000\ne: "1"\nf: ~\ng: 2024-01-02\nh: 0x1F\ni: 1e3\nj: .5\nk: [y, N]\n1: int key\ntrue: bool key\n', 'v.yaml');
    expect(v).toEqual({ a: true, b: false, c: 511, d: 1000, e: '1', f: null, g: '2024-01-02', h: 31, i: 1000, j: 0.5, k: [true, false], '1': 'int key', true: 'bool key' });
  });

  it('splits manifests with the regexp of releaseutil.SplitManifests, quirks included', () => {
    expect(splitManifests('---\na: 1\n--- # c\nc: 3\n\n---\n')).toEqual(['a: 1', '# c\nc: 3']);
    // `(?:^|\s*\n)---\s*` eats the newlines after a separator, so a "---" right after it stays in the document.
    expect(splitManifests('a: 1\n---   \n\n---\nb: 2')).toEqual(['a: 1', '---\nb: 2']);
  });
});

describe('renderChart', () => {
  const root = mkdtempSync(join(tmpdir(), 'go-template-chart-'));
  afterAll(() => rmSync(root, { recursive: true, force: true }));
  const write = (rel: string, text: string): string => {
    const path = join(root, rel);
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, text);
    return path;
  };
  write('c/Chart.yaml', 'apiVersion: v2\nname: demo\nversion: 1.2.3\nappVersion: "2.0"\ndescription: A demo\n');
  write('c/values.yaml', 'a:\n  b: 1\n  c: 2\nlist: [1, 2]\nkeep: x\ndrop: y\nreplicas: 1\nenabled: yes\n');
  write(
    'c/values.schema.json',
    JSON.stringify({
      $schema: 'http://json-schema.org/draft-07/schema#',
      type: 'object',
      properties: { replicas: { type: 'integer', minimum: 1 }, name: { type: 'string' } },
    }),
  );
  write('c/templates/_helpers.tpl', '{{- define "demo.name" -}}{{ .Chart.Name }}-{{ .Release.Name }}{{- end -}}\nstray text is not emitted\n');
  write(
    'c/templates/cm.yaml',
    [
      '---',
      'apiVersion: v1',
      'kind: ConfigMap',
      'metadata:',
      '  name: {{ include "demo.name" . }}',
      '  namespace: {{ .Release.Namespace }}',
      'data:',
      '  values: {{ toJson .Values | quote }}',
      '  template: {{ .Template.Name }}',
      '  chart: {{ .Chart.Version }}/{{ .Chart.AppVersion }}/{{ .Chart.Description }}',
      '  kube: {{ .Capabilities.KubeVersion }}/{{ .Capabilities.KubeVersion.Minor }}',
      '  apps: {{ .Capabilities.APIVersions.Has "apps/v1" | quote }}',
      '  install: {{ .Release.IsInstall | quote }}',
      '---',
      '# only a comment',
      '---',
      '',
      '---',
      'apiVersion: v1',
      'kind: Secret',
      'metadata:',
      '  name: s',
    ].join('\n'),
  );
  write('c/templates/empty.yaml', '{{- if false }}\nkind: Nothing\n{{- end }}\n');
  write('c/templates/NOTES.txt', 'Installed {{ .Release.Name }}.');
  write('c/templates/tests/t.yaml', 'apiVersion: v1\nkind: Pod\nmetadata:\n  name: test\n');
  const f1 = write('f1.yaml', 'a:\n  c: 3\nlist: [9]\n');
  const f2 = write('f2.yaml', 'drop: null\na:\n  b: null\n');
  const base = { releaseName: 'rel', namespace: 'ns' };

  it('merges values files in order, deletes keys set to null and keeps the chart defaults', () => {
    const { manifests } = renderChart(join(root, 'c'), { ...base, valuesFiles: [f1, f2] });
    const cm = manifests.find((m) => m.text.includes('kind: ConfigMap'));
    expect(cm?.text).toContain(`values: ${JSON.stringify(JSON.stringify({ a: { c: 3 }, enabled: true, keep: 'x', list: [9], replicas: 1 }))}`);
  });

  it('fills .Chart, .Release, .Template and .Capabilities', () => {
    const { manifests } = renderChart(join(root, 'c'), { ...base, kubeVersion: 'v1.30.2' });
    const cm = manifests.find((m) => m.text.includes('kind: ConfigMap'))?.text ?? '';
    expect(cm).toContain('name: demo-rel');
    expect(cm).toContain('namespace: ns');
    expect(cm).toContain('template: demo/templates/cm.yaml');
    expect(cm).toContain('chart: 1.2.3/2.0/A demo');
    expect(cm).toContain('kube: v1.30.2/30');
    expect(cm).toContain('apps: "true"');
    expect(cm).toContain('install: "true"');
  });

  it('splits documents, skips partials and blank output, and returns NOTES.txt apart', () => {
    const { manifests, notes } = renderChart(join(root, 'c'), base);
    expect(manifests.map((m) => m.template)).toEqual(['demo/templates/cm.yaml', 'demo/templates/cm.yaml', 'demo/templates/cm.yaml', 'demo/templates/tests/t.yaml']);
    expect(manifests[1]?.text).toBe('# only a comment');
    expect(notes).toBe('Installed rel.');
  });

  it('parses objects, dropping documents that hold no object', () => {
    const { objects } = renderObjects(join(root, 'c'), base);
    expect(objects.map((o) => `${o.template}:${String(o.object.kind)}`)).toEqual(['demo/templates/cm.yaml:ConfigMap', 'demo/templates/cm.yaml:Secret', 'demo/templates/tests/t.yaml:Pod']);
  });

  it('types --set integers as int64 and deletes with null', () => {
    write('c/templates/set.yaml', 'kind: X\nn: {{ eq .Values.n 3 }}\nkeep: {{ .Values.keep | quote }}\n');
    try {
      const { manifests } = renderChart(join(root, 'c'), { ...base, set: { n: 3, keep: null } });
      // The deleted key is nil, and sprig's quote skips nil arguments (strings.go quote).
      expect(manifests.find((m) => m.template.endsWith('set.yaml'))?.text).toBe('kind: X\nn: true\nkeep:');
    } finally {
      rmSync(join(root, 'c/templates/set.yaml'));
    }
  });

  it('refuses values that violate values.schema.json, listing the violations', () => {
    expect(() => renderChart(join(root, 'c'), { ...base, set: { replicas: 0, name: 5 } })).toThrow(
      /values don't meet the specifications of the schema\(s\) in the following chart\(s\):\ndemo:\n[^]*\/replicas[^]*\/name/,
    );
  });

  it('reports template errors with the template name and line', () => {
    write('c/templates/bad.yaml', 'kind: X\nv: {{ required "set bad.value" .Values.bad }}\n');
    try {
      expect(() => renderChart(join(root, 'c'), base)).toThrow('execution error at (demo/templates/bad.yaml:2:6): set bad.value');
    } finally {
      rmSync(join(root, 'c/templates/bad.yaml'));
    }
  });

  it('names the template when its output is not valid YAML', () => {
    write('c/templates/broken.yaml', 'kind: X\n  bad: [\n');
    try {
      expect(() => renderObjects(join(root, 'c'), base)).toThrow(/^YAML parse error on demo\/templates\/broken.yaml/);
    } finally {
      rmSync(join(root, 'c/templates/broken.yaml'));
    }
  });
});
