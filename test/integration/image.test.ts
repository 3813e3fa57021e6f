/**
 * The container image, checked without a Docker engine (none can run here): the Dockerfile is
 * linted (dockerfile-utils) and read instruction by instruction (dockerfile-ast); then its
 * production-dependency stage is replayed in a temporary directory, the runtime stage's COPY
 * instructions assemble /app from it and from the build, and the server is started from /app
 * with the image's environment, answering the image's own HEALTHCHECK command and a Forward.
 * `docker build` itself is run by operators (scripts/check-deploy.sh).
 */
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DockerfileParser, type Copy, type Instruction } from 'dockerfile-ast';
import { validate, ValidationSeverity } from 'dockerfile-utils';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NormserveClient } from '../../src/client/client.js';
import { SETTINGS } from '../../src/config.js';
import { freePorts, runNode, startMain, type Started } from '../support/main-process.js';

const TEXT = readFileSync('Dockerfile', 'utf8');
const dockerfile = DockerfileParser.parse(TEXT);
const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as { dependencies: Record<string, string>; devDependencies: Record<string, string> };

/** The instructions of each stage, by stage name. */
function stages(): Map<string, Instruction[]> {
  const out = new Map<string, Instruction[]>();
  let current: Instruction[] | undefined;
  for (const i of dockerfile.getInstructions()) {
    if (i.getKeyword() === 'FROM') {
      const args = i.getArguments().map((a) => a.getValue());
      current = [i];
      out.set(args[2] ?? String(out.size), current);
    } else current?.push(i);
  }
  return out;
}
const STAGES = stages();
const runtime = STAGES.get('runtime')!;
const args = (i: Instruction) => i.getArguments().map((a) => a.getValue());
const find = (stage: Instruction[], keyword: string) => stage.filter((i) => i.getKeyword() === keyword);
/** An exec-form instruction's strings (CMD ["a", "b"]). */
const exec = (i: Instruction) => JSON.parse(i.getRawArgumentsContent()!.replace(/^CMD\s+/, '')) as string[];
/** ARG defaults before the first FROM and in a stage. */
function argDefaults(stage: Instruction[] = []): Record<string, string> {
  const global = dockerfile.getInstructions().slice(0, dockerfile.getInstructions().findIndex((i) => i.getKeyword() === 'FROM'));
  return Object.fromEntries([...global, ...stage].filter((i) => i.getKeyword() === 'ARG').map((i) => args(i)[0]!.split('=') as [string, string]));
}
const imageEnv = (): Record<string, string> => {
  const defaults = argDefaults(runtime);
  const env: Record<string, string> = {};
  for (const i of find(runtime, 'ENV')) {
    for (const a of args(i)) {
      const [k, v] = a.split('=') as [string, string];
      env[k] = v.replace(/\$\{(\w+)\}/g, (_, name: string) => defaults[name]!);
    }
  }
  return env;
};

describe('Dockerfile', () => {
  it('passes the linter with every rule at warning or stricter', () => {
    const all = ValidationSeverity.WARNING;
    const diagnostics = validate(TEXT, {
      deprecatedMaintainer: all,
      directiveCasing: all,
      emptyContinuationLine: all,
      instructionCasing: all,
      instructionCmdMultiple: all,
      instructionEntrypointMultiple: all,
      instructionHealthcheckMultiple: all,
      instructionJSONInSingleQuotes: all,
      instructionWorkdirRelative: all,
    });
    expect(diagnostics.map((d) => `${d.range.start.line + 1}: ${d.message}`)).toEqual([]);
  });

  it('builds on Node 20 LTS with npm 11 and runs on distroless Node 20 as a non-root user', () => {
    const defaults = argDefaults();
    expect(defaults.NODE_IMAGE).toMatch(new RegExp(`^node:${process.versions.node.split('.').slice(0, 2).join('\\.')}-bookworm-slim$`));
    expect(defaults.RUNTIME_IMAGE).toBe('gcr.io/distroless/nodejs20-debian12:nonroot');
    expect([...STAGES.keys()]).toEqual(['toolchain', 'build', 'prod-deps', 'runtime']);
    const npm = spawnSync('npm', ['--version']).stdout.toString().trim();
    expect(find(STAGES.get('toolchain')!, 'RUN')[0]!.getRawArgumentsContent()).toContain(`npm install -g npm@${npm}`);
    expect(find(runtime, 'USER').map(args)).toEqual([['65532:65532']]);
    expect(find(STAGES.get('prod-deps')!, 'RUN')[0]!.getRawArgumentsContent()).toContain('npm ci --omit=dev --omit=optional');
  });

  it('exposes the ports its environment sets, names only real settings, and keeps /data as the volume', () => {
    const env = imageEnv();
    const known = new Set(Object.values(SETTINGS).map((s) => s.env));
    for (const key of Object.keys(env)) if (key.startsWith('NORMSERVE_')) expect(known, key).toContain(key);
    expect(find(runtime, 'EXPOSE').flatMap(args).sort()).toEqual([env.NORMSERVE_PORT, env.NORMSERVE_HEALTH_PORT, env.NORMSERVE_METRICS_PORT].sort());
    expect(env.NORMSERVE_STORE).toBe('sqlite:/data');
    expect(find(runtime, 'VOLUME')[0]!.getRawArgumentsContent()).toBe('["/data"]');
    expect(env.NODE_ENV).toBe('production');
  });

  it('starts node itself (PID 1 with its own signal handlers, not npm) and checks health with the image\'s script', () => {
    expect(exec(find(runtime, 'ENTRYPOINT')[0]!)).toEqual(['/nodejs/bin/node']);
    expect(exec(find(runtime, 'CMD')[0]!)).toEqual(['dist/src/main.js']);
    const health = find(runtime, 'HEALTHCHECK')[0]!;
    expect(exec(health)).toEqual(['/nodejs/bin/node', 'dist/src/cli/healthcheck.js']);
  });
});

describe('the image\'s /app, assembled as the Dockerfile does', () => {
  const root = mkdtempSync(join(tmpdir(), 'normserve-image-'));
  const app = join(root, 'app');
  let server: Started;
  let ports: number[];

  /** Replays the prod-deps stage: its COPYs from the build context, then its RUN, with its ARG defaults. */
  function prodDeps(): string {
    const dir = join(root, 'prod-deps');
    mkdirSync(dir, { recursive: true });
    const stage = STAGES.get('prod-deps')!;
    for (const copy of find(stage, 'COPY')) {
      const [...sources] = args(copy);
      const target = sources.pop()!;
      for (const s of sources) cpSync(s, sources.length > 1 ? join(dir, target, s) : join(dir, target), { recursive: true });
    }
    for (const run of find(stage, 'RUN')) {
      const r = spawnSync('sh', ['-c', run.getRawArgumentsContent()!.replace(/\\\n/g, ' ')], { cwd: dir, env: { ...process.env, ...argDefaults(stage) }, encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
    }
    return dir;
  }

  beforeAll(async () => {
    const built = { 'prod-deps': prodDeps(), build: process.cwd() };
    const data = join(root, 'data');
    mkdirSync(data);
    // The runtime stage's COPYs: from the context, or from a stage (whose /src is its WORKDIR).
    for (const copy of find(runtime, 'COPY')) {
      const from = (copy as Copy).getFlags().find((f) => f.getName() === 'from')?.getValue();
      const [source, target] = args(copy) as [string, string];
      const origin = from === undefined ? source : source === '/data' ? data : join(built[from as keyof typeof built], source.replace(/^\/src\//, ''));
      expect(existsSync(origin), `COPY ${from ? `--from=${from} ` : ''}${source}`).toBe(true);
      if (target.startsWith('/')) continue;
      cpSync(origin, join(app, target), { recursive: true });
    }
    ports = await freePorts(3);
    server = await startMain([], {
      ...imageEnv(),
      NORMSERVE_STORE: `sqlite:${data}`,
      NORMSERVE_HOST: '127.0.0.1',
      NORMSERVE_PORT: String(ports[0]),
      NORMSERVE_HEALTH_PORT: String(ports[1]),
      NORMSERVE_METRICS_PORT: String(ports[2]),
    }, join(app, exec(find(runtime, 'CMD')[0]!)[0]!));
  }, 400_000);

  afterAll(async () => {
    expect(await server?.stop()).toBe(0);
    rmSync(root, { recursive: true, force: true });
  });

  it('carries the production dependencies and the native backend, and no dev dependency or GPU stack', () => {
    const modules = new Set(readdirSync(join(app, 'node_modules')).flatMap((d) => (d.startsWith('@') ? readdirSync(join(app, 'node_modules', d)).map((e) => `${d}/${e}`) : [d])));
    for (const dep of Object.keys(pkg.dependencies)) expect(modules, dep).toContain(dep);
    for (const dev of Object.keys(pkg.devDependencies)) if (!(dev in pkg.dependencies) && dev !== '@types/node') expect(modules, dev).not.toContain(dev);
    for (const gpu of ['webgpu', 'gl']) expect(modules).not.toContain(gpu);
    expect(readdirSync(join(app, 'node_modules/better-sqlite3/build/Release'))).toEqual(['better_sqlite3.node']);
    expect(existsSync(join(app, 'dist/src/main.js')) && existsSync(join(app, 'proto/normserve/v1/batch_norm.proto'))).toBe(true);
    expect(existsSync(join(app, 'dist/bench')) || existsSync(join(app, 'test')) || existsSync(join(app, 'src'))).toBe(false);
  });

  it('serves from /app on the native backend and answers the HEALTHCHECK command', async () => {
    expect(server.lines.find((l) => l.msg === 'compute backend chosen')).toMatchObject({ backend: 'native', requested: 'native' });
    const client = new NormserveClient(`127.0.0.1:${ports[0]}`);
    await client.createModule('image/bn', { kind: 'BATCH_NORM_1D', numFeatures: 2 });
    const y = await client.forward('image/bn', { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) });
    expect([...y.data].map((v) => Math.round(v * 1e4) / 1e4)).toEqual([-1, -1, 1, 1]);
    client.close();
    const [, script] = exec(find(runtime, 'HEALTHCHECK')[0]!) as [string, string];
    const check = await runNode(join(app, script), [], { ...imageEnv(), NORMSERVE_HOST: '127.0.0.1', NORMSERVE_HEALTH_PORT: String(ports[1]) });
    expect(check).toMatchObject({ code: 0, stderr: '' });
  });

  it('stays small', () => {
    const size = (p: string): number => (statSync(p).isDirectory() ? readdirSync(p).reduce((a, e) => a + size(join(p, e)), 0) : statSync(p).size);
    // The application and its dependencies; the distroless base adds about 40 MB (docs/deployment.md).
    expect(size(app) / 2 ** 20).toBeLessThan(64);
  });
});
