#!/usr/bin/env node
// Generates TypeScript types for the protos into src/generated/ (git-ignored), then adds the
// ".js" extension to relative imports, which Node's ESM resolution (tsconfig NodeNext) requires
// and proto-loader-gen-types does not write.
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const outDir = 'src/generated';
rmSync(outDir, { recursive: true, force: true });
execFileSync(
  process.execPath,
  [
    'node_modules/@grpc/proto-loader/build/bin/proto-loader-gen-types.js',
    '--grpcLib=@grpc/grpc-js', '--longs=String', '--enums=String', '--defaults', '--oneofs',
    '--keepCase', '--includeDirs=proto', `--outDir=${outDir}`,
    'normserve/v1/batch_norm.proto', 'normserve/v1/sync_batch_norm.proto', 'inference/grpc_predict_v2.proto',
    'google/rpc/status.proto', 'google/rpc/error_details.proto',
  ],
  { stdio: 'inherit' },
);

function walk(dir) {
  for (const entry of readdirSync(dir)) {
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) walk(path);
    else if (path.endsWith('.ts')) {
      const text = readFileSync(path, 'utf8');
      writeFileSync(path, text.replace(/(from '\.{1,2}\/[^']+?)(?<!\.js)'/g, "$1.js'"));
    }
  }
}
walk(outDir);
