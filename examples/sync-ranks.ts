/**
 * SyncBatchNorm across ranks without NCCL or a GPU: each rank (here, two in one process; in a
 * real job, one per process, each with its own client) sends its shard of the batch, and every
 * rank's output is normalised with the whole group's statistics.
 *
 *   NORMSERVE_ADDRESS=localhost:50051 node dist/examples/sync-ranks.js
 *
 * In an application, import from 'normserve' instead of '../src/index.js'.
 */
import { NormserveClient, RemoteSyncBatchNorm } from '../src/index.js';

const address = process.env.NORMSERVE_ADDRESS ?? 'localhost:50051';
const worldSize = 2;
const name = `examples/sync-${process.pid}`;
const clients = Array.from({ length: worldSize }, () => new NormserveClient(address));
const ranks = await Promise.all(clients.map((client, rank) => RemoteSyncBatchNorm.create(client, name, { numFeatures: 3 }, { rank, worldSize })));

for (let step = 0; step < 3; step++) {
  // Rank r's shard: 2 + r samples of 3 channels and 4 positions.
  const shards = ranks.map((_, r) => {
    const n = 2 + r;
    return { shape: [n, 3, 4], data: Float32Array.from({ length: n * 12 }, (_, i) => Math.sin(i * (r + 1) + step) * (1 + (Math.floor(i / 4) % 3))) };
  });
  const outs = await Promise.all(ranks.map((bn, r) => bn.forward(shards[r]!)));
  const grads = await Promise.all(outs.map((y) => y.backward({ shape: y.shape, data: y.data.map((v) => v / y.data.length) })));
  console.log(
    `step ${step}: synced=${outs.every((o) => o.synced)} count=${outs[0]!.count} mean=[${[...outs[0]!.mean].map((m) => m.toFixed(4)).join(', ')}] ` +
      `grad_weight=[${[...grads[0]!.gradWeight!].map((g) => g.toFixed(4)).join(', ')}]`,
  );
}
await ranks[0]!.delete();
await Promise.all(clients.map((c) => c.close()));
