#!/usr/bin/env node
/**
 * The command line: read the configuration, pick the compute backend, serve until SIGTERM or
 * SIGINT, then drain and exit 0.
 */
import { pino } from 'pino';
import { ConfigError, HELP, loadConfig } from './config.js';
import { selectKernels } from './kernels/select.js';
import { startServer } from './server/server.js';

/** Log lines are written in batches of this many bytes, or whatever is buffered every LOG_FLUSH_MS. */
const LOG_BUFFER_BYTES = 4096;
const LOG_FLUSH_MS = 250;

async function main(): Promise<void> {
  let config;
  try {
    config = loadConfig(process.argv.slice(2), process.env);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`normserve: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
  if (config === null) {
    process.stdout.write(`${HELP}\n`);
    return;
  }
  // Asynchronous and buffered: the call log's line per call costs the calling path no system call
  // (30 µs each on a busy 2-core VM); lines go out in writes of 4 KiB, and at least every
  // LOG_FLUSH_MS. pino flushes what is buffered when the process exits, fatal errors included; a
  // SIGKILL loses at most the lines of the last interval.
  const logger = pino({ level: config.logLevel, base: { service: 'normserve' } }, pino.destination({ dest: 1, sync: false, minLength: LOG_BUFFER_BYTES }));
  setInterval(() => logger.flush(), LOG_FLUSH_MS).unref();
  process.on('uncaughtException', (err) => {
    logger.fatal({ err }, 'uncaught exception');
    process.exit(1);
  });
  process.on('unhandledRejection', (err) => {
    logger.fatal({ err }, 'unhandled rejection');
    process.exit(1);
  });

  const { kernels, attempts } = await selectKernels(config.backend);
  for (const a of attempts) {
    if (a.ok) logger.info({ backend: a.backend, detail: a.detail, requested: config.backend }, 'compute backend chosen');
    else logger.info({ backend: a.backend, reason: a.detail }, 'compute backend passed over');
  }
  const server = await startServer(config, { kernels, logger });
  // Signals are handled before anyone can learn the port: a SIGTERM right after the line drains.
  const stop = (signal: string) => {
    logger.info({ signal, grace_ms: config.shutdownGraceMs }, 'shutting down');
    server.shutdown(config.shutdownGraceMs).then(
      () => {
        logger.info('stopped');
        process.exit(0);
      },
      (err: unknown) => {
        logger.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));

  logger.info({ host: config.host, port: server.port, metrics_port: server.metricsPort, backend: kernels.backend }, 'normserve listening');
  // Scripts and probes wait for this line: it goes out now, not with the next batch.
  logger.flush();
  server.joined.catch(async (err: unknown) => {
    logger.fatal({ err }, 'cannot join the cluster');
    await server.shutdown(0).catch(() => undefined);
    process.exit(1);
  });
}

main().catch((err: unknown) => {
  process.stderr.write(`normserve: ${(err as Error).message}\n`);
  process.exit(1);
});
