#!/usr/bin/env node
/**
 * The API reference, generated from the protos' own comments: every service with its methods,
 * every message with its fields, every enum with its values, per package. Writes docs/api.md
 * with --write, prints it otherwise; test/unit/docs.test.ts fails when the file and the protos
 * drift apart.
 *
 *   node dist/scripts/api-docs.js --write
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import protobuf from 'protobufjs';
import { PROTO_DIR, PROTO_FILES } from '../src/wire/proto.js';

export const API_DOC = 'docs/api.md';

const cell = (text: string | null | undefined) => (text ?? '').replace(/\s*\n\s*/g, ' ').replace(/\|/g, '\\|').trim();
const code = (text: string) => `\`${text}\``;

function fieldType(f: protobuf.Field): string {
  const base = f instanceof protobuf.MapField ? `map<${f.keyType}, ${f.type}>` : f.type;
  if (f.repeated) return `repeated ${base}`;
  if ((f.options as Record<string, unknown> | undefined)?.proto3_optional) return `optional ${base}`;
  return base;
}

function service(s: protobuf.Service): string[] {
  const rows = s.methodsArray.map(
    (m) => `| ${code(m.name)} | ${code(`${m.requestStream ? 'stream ' : ''}${m.requestType}`)} | ${code(`${m.responseStream ? 'stream ' : ''}${m.responseType}`)} | ${cell(m.comment)} |`,
  );
  return [`### service ${s.name}`, '', ...(s.comment ? [s.comment, ''] : []), '| method | request | response | what it does |', '| --- | --- | --- | --- |', ...rows, ''];
}

function message(t: protobuf.Type): string[] {
  const oneofOf = new Map(t.oneofsArray.flatMap((o) => (o.name.startsWith('_') ? [] : o.fieldsArray.map((f) => [f.name, o.name] as const))));
  const rows = t.fieldsArray.map((f) => {
    const oneof = oneofOf.get(f.name);
    return `| ${code(f.name)} | ${f.id} | ${code(fieldType(f))} | ${oneof ? `(one of ${code(oneof)}) ` : ''}${cell(f.comment)} |`;
  });
  const table = rows.length ? ['| field | number | type | meaning |', '| --- | --- | --- | --- |', ...rows] : ['(no fields)'];
  return [`### message ${t.fullName.slice(1)}`, '', ...(t.comment ? [t.comment, ''] : []), ...table, '', ...t.nestedArray.flatMap(nested)];
}

function enumeration(e: protobuf.Enum): string[] {
  const rows = Object.entries(e.values).map(([name, n]) => `| ${code(name)} | ${n} | ${cell(e.comments[name])} |`);
  return [`### enum ${e.fullName.slice(1)}`, '', ...(e.comment ? [e.comment, ''] : []), '| value | number | meaning |', '| --- | --- | --- |', ...rows, ''];
}

function nested(o: protobuf.ReflectionObject): string[] {
  if (o instanceof protobuf.Service) return service(o);
  if (o instanceof protobuf.Type) return message(o);
  if (o instanceof protobuf.Enum) return enumeration(o);
  return [];
}

/** The reference for `files` (default: the API the server serves), as Markdown. */
export function renderApiDocs(files: readonly string[] = PROTO_FILES): string {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => join(PROTO_DIR, target);
  root.loadSync([...files], { keepCase: true, alternateCommentMode: true });
  root.resolveAll();
  const packages = new Map<string, protobuf.Namespace>();
  const walk = (ns: protobuf.Namespace) => {
    for (const o of ns.nestedArray) {
      if (!(o instanceof protobuf.Namespace) || o instanceof protobuf.Type || o instanceof protobuf.Service) continue;
      const own = o.nestedArray.filter((x) => !(x instanceof protobuf.Namespace) || x instanceof protobuf.Type || x instanceof protobuf.Service);
      if (own.length > 0) packages.set(o.fullName.slice(1), o);
      walk(o);
    }
  };
  walk(root);
  // The files named and what they import, but not the google.rpc types (errors.md covers those).
  const fromOurFiles = (o: protobuf.ReflectionObject) => o.filename !== null && !o.filename.includes(`${join('google', 'rpc')}`);
  const out = [
    '# API reference',
    '',
    `Generated from ${files.map((f) => code(`proto/${f}`)).join(', ')}, what they import, and their comments, by \`scripts/api-docs.ts\``,
    '(`node dist/scripts/api-docs.js --write`); `test/unit/docs.test.ts` fails when this page and the protos differ.',
    'Services first, then messages and enums, per package. The error details and statuses are in [errors.md](errors.md).',
    '',
  ];
  for (const [name, ns] of [...packages.entries()].sort(([a], [b]) => a.localeCompare(b))) {
    const members = ns.nestedArray.filter(fromOurFiles);
    if (members.length === 0) continue;
    const order = (o: protobuf.ReflectionObject) => (o instanceof protobuf.Service ? 0 : o instanceof protobuf.Type ? 1 : 2);
    out.push(`## package ${name}`, '', ...[...members].sort((a, b) => order(a) - order(b)).flatMap(nested));
  }
  return `${out.join('\n').trimEnd()}\n`;
}

if (process.argv[1]?.endsWith('api-docs.js')) {
  const text = renderApiDocs();
  if (process.argv.includes('--write')) writeFileSync(API_DOC, text);
  else process.stdout.write(text);
}
