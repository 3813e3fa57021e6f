#!/usr/bin/env node
/**
 * The container's health check (Dockerfile HEALTHCHECK): asks this replica's grpc.health.v1 for
 * the readiness of the module API and exits 0 when it is SERVING, 1 otherwise. It reads the
 * server's own settings from the environment, and uses the plaintext --health-port when there is
 * one, the gRPC port otherwise (which must then be plaintext too).
 *
 *   node dist/src/cli/healthcheck.js [service]     (default service: normserve.v1.BatchNormService)
 */
import { NormserveClient } from '../client/client.js';
import { loadConfig } from '../config.js';
import { BATCH_NORM_SERVICE_NAME } from '../wire/proto.js';

const TIMEOUT_MS = 3000;

function fail(message: string): never {
  process.stderr.write(`normserve-healthcheck: ${message}\n`);
  process.exit(1);
}

const config = loadConfig([], process.env);
if (config === null) process.exit(0);
const service = process.argv[2] ?? BATCH_NORM_SERVICE_NAME;
const port = config.healthPort !== 0 ? config.healthPort : config.port;
if (config.healthPort === 0 && config.tlsCert !== '') fail('gRPC uses TLS here: set NORMSERVE_HEALTH_PORT so that health can be asked in plaintext');
const host = config.host === '0.0.0.0' || config.host === '::' ? '127.0.0.1' : config.host;
const address = `${host.includes(':') ? `[${host}]` : host}:${port}`;
// One attempt: the container runtime repeats the check itself.
const client = new NormserveClient(address, { deadlineMs: TIMEOUT_MS, retry: false });
try {
  const status = await client.health(service);
  if (status !== 'SERVING') fail(`${service || "''"} is ${status}`);
} catch (err) {
  fail(`${address}: ${(err as Error).message}`);
} finally {
  await client.close();
}
process.exit(0);
