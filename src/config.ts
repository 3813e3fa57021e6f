/**
 * Configuration: every setting, its flag, its environment variable and its default, in one table.
 * Read once at start (flags over environment over defaults) and passed down; nothing else reads
 * process.env. docs/configuration.md lists the same table and a test keeps them in step.
 */
import { parseArgs } from 'node:util';
import { z } from 'zod';
import { BACKEND_NAMES } from './kernels/kernels.js';

const BACKEND_CHOICES = ['auto', ...BACKEND_NAMES.filter((b) => b !== 'reference'), 'reference'] as const;
export type BackendChoice = (typeof BACKEND_CHOICES)[number];

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);

const HOST_PORT = '(?:\\[[0-9A-Fa-f:.]+\\]|[A-Za-z0-9_.-]+):\\d{1,5}';
const STORE_PATTERN = new RegExp(`^(?:sqlite:.+|etcd://${HOST_PORT}(?:,${HOST_PORT})*(?:/[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*)?)$`);

/** Where modules are kept (--store). */
export type StoreSpec =
  | { readonly kind: 'sqlite'; readonly dir: string }
  | { readonly kind: 'etcd'; readonly endpoints: readonly string[]; readonly prefix: string };

/** Parses a --store value (already checked against its pattern). */
export function parseStore(text: string): StoreSpec {
  if (text.startsWith('sqlite:')) return { kind: 'sqlite', dir: text.slice('sqlite:'.length) };
  const rest = text.slice('etcd://'.length);
  const slash = rest.indexOf('/');
  const hosts = slash < 0 ? rest : rest.slice(0, slash);
  const path = slash < 0 ? 'normserve' : rest.slice(slash + 1);
  return { kind: 'etcd', endpoints: hosts.split(','), prefix: `/${path}/` };
}

/** The settings. `flag` is the long option; `env` the environment variable. */
export const SETTINGS = {
  host: {
    flag: 'host',
    env: 'NORMSERVE_HOST',
    default: '0.0.0.0',
    schema: z.string().min(1),
    description: 'Address the gRPC server binds to.',
  },
  port: {
    flag: 'port',
    env: 'NORMSERVE_PORT',
    default: 50051,
    schema: int(0, 65535),
    description: 'gRPC port; 0 picks a free one (the log says which).',
  },
  tlsCert: {
    flag: 'tls-cert',
    env: 'NORMSERVE_TLS_CERT',
    default: '',
    schema: z.string(),
    description: 'PEM certificate chain of the gRPC server; with --tls-key, gRPC is served over TLS. Empty: plaintext.',
  },
  tlsKey: {
    flag: 'tls-key',
    env: 'NORMSERVE_TLS_KEY',
    default: '',
    schema: z.string(),
    description: 'PEM private key for --tls-cert.',
  },
  tlsClientCa: {
    flag: 'tls-client-ca',
    env: 'NORMSERVE_TLS_CLIENT_CA',
    default: '',
    schema: z.string(),
    description: 'PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).',
  },
  authTokensFile: {
    flag: 'auth-tokens-file',
    env: 'NORMSERVE_AUTH_TOKENS_FILE',
    default: '',
    schema: z.string(),
    description: 'JSON file of bearer tokens (SHA-256) and their read/write grants on module-name prefixes; empty: no authentication.',
  },
  metricsPort: {
    flag: 'metrics-port',
    env: 'NORMSERVE_METRICS_PORT',
    default: 9464,
    schema: int(0, 65535),
    description: 'HTTP port of the Prometheus metrics (GET /metrics, on the same host as gRPC); 0 picks a free one.',
  },
  healthPort: {
    flag: 'health-port',
    env: 'NORMSERVE_HEALTH_PORT',
    default: 0,
    schema: int(0, 65535),
    description: 'Extra plaintext port that serves only grpc.health.v1, for Kubernetes probes when gRPC itself uses TLS; 0: none (health is always on the gRPC port too).',
  },
  store: {
    flag: 'store',
    env: 'NORMSERVE_STORE',
    default: 'sqlite:./data',
    schema: z.string().regex(STORE_PATTERN, 'use sqlite:DIR or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]'),
    description:
      'Where modules are kept. sqlite:DIR: one server, its SQLite database in DIR. etcd://HOST:PORT[,HOST:PORT...][/PREFIX]: replicas that share their modules through etcd, under the key prefix /PREFIX/ (default /normserve/); each module belongs to one replica at a time (docs/scale-out.md).',
  },
  advertiseAddress: {
    flag: 'advertise-address',
    env: 'NORMSERVE_ADVERTISE_ADDRESS',
    default: '',
    schema: z.string().regex(/^$|^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$/, 'use host:port'),
    description: "With an etcd store: the host:port at which clients reach this replica; other replicas send callers of this replica's modules here. '': this host's name and the gRPC port.",
  },
  leaseTtlSeconds: {
    flag: 'lease-ttl-seconds',
    env: 'NORMSERVE_LEASE_TTL_SECONDS',
    default: 10,
    schema: int(2, 600),
    description: "With an etcd store: the time to live of this replica's etcd lease. A replica that dies (or loses etcd) hands its modules to the others about this long after.",
  },
  backend: {
    flag: 'backend',
    env: 'NORMSERVE_BACKEND',
    default: 'auto' as BackendChoice,
    schema: z.enum(BACKEND_CHOICES),
    description: `Compute backend: ${BACKEND_CHOICES.join(', ')}. auto takes a hardware GPU (webgpu, then headlessgl) and otherwise native, then webasm, then cpu (docs/backends.md).`,
  },
  logLevel: {
    flag: 'log-level',
    env: 'NORMSERVE_LOG_LEVEL',
    default: 'info',
    schema: z.enum(LOG_LEVELS),
    description: `pino log level: ${LOG_LEVELS.join(', ')}. Each call logs one line at info; lines are written in batches, at least every 250 ms, and at exit.`,
  },
  durability: {
    flag: 'durability',
    env: 'NORMSERVE_DURABILITY',
    default: 'strict' as 'strict' | 'process' | 'relaxed',
    schema: z.enum(['strict', 'process', 'relaxed']),
    description:
      'strict: every change is on disk before its call is answered. process (sqlite only): every change is written before its call is answered and synced to disk every --checkpoint-ms; the death of the process loses nothing, a crash of the machine at most that interval. relaxed (sqlite only): changes are written every --checkpoint-ms; a crash of the process loses at most that interval.',
  },
  checkpointMs: {
    flag: 'checkpoint-ms',
    env: 'NORMSERVE_CHECKPOINT_MS',
    default: 1000,
    schema: int(10, 3_600_000),
    description: 'With --durability relaxed, how often changes are written; with process, how often written changes are synced to disk.',
  },
  maxMessageBytes: {
    flag: 'max-message-bytes',
    env: 'NORMSERVE_MAX_MESSAGE_BYTES',
    default: 68_157_440,
    schema: int(1024, 2 ** 31 - 1),
    description: 'Largest gRPC message received or sent, in bytes (64 MiB of tensor plus 1 MiB).',
  },
  flowControlWindow: {
    flag: 'flow-control-window',
    env: 'NORMSERVE_FLOW_CONTROL_WINDOW',
    default: 16_777_216,
    schema: int(65_535, 2 ** 31 - 1),
    description: 'HTTP/2 flow-control window the server advertises, per stream and per connection, in bytes (65535 keeps HTTP/2\'s default).',
  },
  streamBudgetBytes: {
    flag: 'stream-budget-bytes',
    env: 'NORMSERVE_STREAM_BUDGET_BYTES',
    default: 1_073_741_824,
    schema: int(1024, 2 ** 40),
    description: 'Most bytes that streamed calls (ForwardStream and the like) hold at once, input and output counted; a stream over it gets RESOURCE_EXHAUSTED.',
  },
  streamChunkBytes: {
    flag: 'stream-chunk-bytes',
    env: 'NORMSERVE_STREAM_CHUNK_BYTES',
    default: 1_048_576,
    schema: int(1024, 2 ** 30),
    description: 'Bytes per chunk in the answers of streamed calls.',
  },
  shmDir: {
    flag: 'shm-dir',
    env: 'NORMSERVE_SHM_DIR',
    default: '',
    schema: z.string(),
    description: "Directory under which co-located clients may register shared-memory regions (such as /dev/shm); '' turns shared memory off.",
  },
  maxTensorElements: {
    flag: 'max-tensor-elements',
    env: 'NORMSERVE_MAX_TENSOR_ELEMENTS',
    default: 16_777_216,
    schema: int(1, 2 ** 24),
    description: 'Most elements in one tensor (2^24; the gpu.js GL backends address elements through float32).',
  },
  maxModules: {
    flag: 'max-modules',
    env: 'NORMSERVE_MAX_MODULES',
    default: 10_000,
    schema: int(1, 10_000_000),
    description: 'Most modules one server holds.',
  },
  maxCalls: {
    flag: 'max-calls',
    env: 'NORMSERVE_MAX_CALLS',
    default: 1024,
    schema: int(1, 1_000_000),
    description: 'Calls being handled at once, over all modules; more are refused with RESOURCE_EXHAUSTED.',
  },
  maxCallsPerModule: {
    flag: 'max-calls-per-module',
    env: 'NORMSERVE_MAX_CALLS_PER_MODULE',
    default: 64,
    schema: int(1, 1_000_000),
    description: 'Calls queued on one module at once (they run one at a time); more are refused with RESOURCE_EXHAUSTED.',
  },
  contextBudgetBytes: {
    flag: 'context-budget-bytes',
    env: 'NORMSERVE_CONTEXT_BUDGET_BYTES',
    default: 1_073_741_824,
    schema: int(0, Number.MAX_SAFE_INTEGER),
    description: 'Bytes that forwards saved for backward may hold in all; the oldest are evicted past it (1 GiB).',
  },
  contextTtlMs: {
    flag: 'context-ttl-ms',
    env: 'NORMSERVE_CONTEXT_TTL_MS',
    default: 300_000,
    schema: int(1, 86_400_000),
    description: 'How long a saved forward waits for its backward (5 minutes).',
  },
  stepTimeoutMs: {
    flag: 'step-timeout-ms',
    env: 'NORMSERVE_STEP_TIMEOUT_MS',
    default: 60_000,
    schema: int(1, 86_400_000),
    description: 'How long a SyncBatchNorm step waits for all its ranks before it is aborted.',
  },
  stepResultsKept: {
    flag: 'step-results-kept',
    env: 'NORMSERVE_STEP_RESULTS_KEPT',
    default: 16,
    schema: int(1, 10_000),
    description: 'Completed SyncBatchNorm steps per group and phase whose results are kept for retries.',
  },
  shutdownGraceMs: {
    flag: 'shutdown-grace-ms',
    env: 'NORMSERVE_SHUTDOWN_GRACE_MS',
    default: 10_000,
    schema: int(0, 3_600_000),
    description: 'On SIGTERM or SIGINT, how long calls in flight may finish before they are cancelled.',
  },
} as const;

type Settings = typeof SETTINGS;

/**
 * The settings the Helm chart sets itself, and from which of its values. Every other setting
 * is `config.<name>` in helm/normserve/values.yaml, with the same default.
 */
export const CHART_MANAGED: Readonly<Partial<Record<keyof Settings, string>>> = {
  port: 'ports.grpc',
  healthPort: 'ports.health',
  metricsPort: 'ports.metrics',
  store: 'store.type, persistence.mountPath, etcd.endpoints, etcd.prefix',
  advertiseAddress: "(the pod's IP and ports.grpc)",
  tlsCert: 'tls.enabled, tls.secretName',
  tlsKey: 'tls.enabled, tls.secretName',
  tlsClientCa: 'tls.clientAuth',
  authTokensFile: 'auth.enabled, auth.existingSecret',
};

/**
 * The JSON schema of values.yaml's `config`: each setting the chart does not set itself, with its
 * constraints, default and description (scripts/update-doc-tables.mjs writes it into
 * helm/normserve/values.schema.json).
 */
export function chartConfigSchema(): Record<string, unknown> {
  const properties: Record<string, unknown> = {};
  for (const [key, s] of Object.entries(SETTINGS)) {
    if (key in CHART_MANAGED) continue;
    const { $schema: _, ...json } = z.toJSONSchema(s.schema as z.ZodType, { io: 'input' }) as Record<string, unknown>;
    properties[key] = { ...json, default: s.default, description: s.description };
  }
  return { type: 'object', additionalProperties: false, required: Object.keys(properties), properties };
}

/** Where the chart's values.yaml sets a setting. */
export const helmValue = (key: keyof Settings): string => CHART_MANAGED[key] ?? `config.${key}`;
export type Config = { -readonly [K in keyof Settings]: z.infer<Settings[K]['schema']> };

export class ConfigError extends Error {
  override readonly name = 'ConfigError';
}

export const HELP = [
  'Usage: normserve [options]',
  '',
  ...Object.values(SETTINGS).map(
    (s) => `  --${s.flag.padEnd(22)} ${s.description} (env ${s.env}, default ${String(s.default)})`,
  ),
  '  --help                   Print this and exit.',
].join('\n');

/** Reads flags and environment; throws ConfigError naming the bad setting. Returns null for --help. */
export function loadConfig(argv: readonly string[], env: NodeJS.ProcessEnv): Config | null {
  const options = Object.fromEntries(Object.values(SETTINGS).map((s) => [s.flag, { type: 'string' as const }]));
  let values: Record<string, string | boolean | undefined>;
  try {
    ({ values } = parseArgs({ args: [...argv], options: { ...options, help: { type: 'boolean' } }, strict: true }));
  } catch (err) {
    throw new ConfigError(`${(err as Error).message}\n\n${HELP}`);
  }
  if (values.help) return null;
  const config: Record<string, unknown> = {};
  for (const [key, s] of Object.entries(SETTINGS)) {
    const fromFlag = values[s.flag];
    const raw = fromFlag ?? env[s.env] ?? s.default;
    const parsed = (s.schema as z.ZodType).safeParse(raw);
    if (!parsed.success) {
      const source = fromFlag !== undefined ? `--${s.flag}` : env[s.env] !== undefined ? s.env : 'default';
      throw new ConfigError(`invalid ${source}=${String(raw)}: ${parsed.error.issues.map((i) => i.message).join('; ')}`);
    }
    config[key] = parsed.data;
  }
  checkAcross(config as Config);
  return config as Config;
}

/** The rules across settings: etcd keeps every change before it is answered. */
function checkAcross(config: Pick<Config, 'store' | 'durability'>): void {
  if (parseStore(config.store).kind === 'etcd' && config.durability !== 'strict') {
    throw new ConfigError(`--durability ${config.durability} is for an sqlite store; with etcd every change is committed before its call is answered`);
  }
}

export function defaultConfig(overrides: Partial<Config> = {}): Config {
  const config = Object.fromEntries(Object.entries(SETTINGS).map(([k, s]) => [k, s.default])) as Config;
  return { ...config, ...overrides };
}
