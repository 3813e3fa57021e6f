#!/usr/bin/env node
/**
 * The command line: read the configuration, pick the compute backend, serve until SIGTERM or
 * SIGINT, then drain and exit 0.
 */
import { pino } from 'pino';
import { ConfigError, HELP, loadConfig } from './config.js';
import { selectKernels } from './kernels/select.js';
import { startServer } from './server/server.js';

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
  // Asynchronous: the call log's line per call is written off the calling path (pino flushes what
  // is buffered when the process exits, fatal errors included).
  const logger = pino({ level: config.logLevel, base: { service: 'normserve' } }, pino.destination({ dest: 1, sync: false }));
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
  logger.info({ host: config.host, port: server.port, metrics_port: server.metricsPort, backend: kernels.backend }, 'normserve listening');
  server.joined.catch(async (err: unknown) => {
    logger.fatal({ err }, 'cannot join the cluster');
    await server.shutdown(0).catch(() => undefined);
    process.exit(1);
  });

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
}

main().catch((err: unknown) => {
  process.stderr.write(`normserve: ${(err as Error).message}\n`);
  process.exit(1);
});
