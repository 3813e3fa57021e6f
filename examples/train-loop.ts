/**
 * A training loop with a remote BatchNorm2d: forward, a loss, backward through the service, and
 * a plain SGD step on the affine parameters, which live on the service (loaded back each step).
 * Then eval, as torch.nn.BatchNorm2d would be used.
 *
 *   NORMSERVE_ADDRESS=localhost:50051 node dist/examples/train-loop.js
 *
 * In an application, import from 'normserve' instead of '../src/index.js'.
 */
import { NormserveClient, RemoteBatchNorm } from '../src/index.js';

const address = process.env.NORMSERVE_ADDRESS ?? 'localhost:50051';
const client = new NormserveClient(address, { deadlineMs: 30_000 });
const [N, C, H, W] = [8, 4, 6, 6];
const lr = 0.1;

// A fixed "batch": channel c drawn around c with spread 1 + c (a simple deterministic generator).
let seed = 7;
const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) * 2 - 1;
const x = { shape: [N, C, H, W], data: Float32Array.from({ length: N * C * H * W }, (_, i) => Math.floor(i / (H * W)) % C + (1 + (Math.floor(i / (H * W)) % C)) * rand()) };

const bn = await RemoteBatchNorm.create(client, `examples/train-loop-${process.pid}`, { kind: 'BATCH_NORM_2D', numFeatures: C });
for (let step = 0; step < 5; step++) {
  const y = await bn.forward(x);
  // loss = mean((y - 1)^2); dloss/dy = 2 (y - 1) / n
  let loss = 0;
  const dy = new Float32Array(y.data.length);
  for (let i = 0; i < y.data.length; i++) {
    const d = y.data[i]! - 1;
    loss += d * d;
    dy[i] = (2 * d) / y.data.length;
  }
  loss /= y.data.length;
  const grads = await y.backward({ shape: y.shape, data: dy });
  const state = await bn.stateDict();
  const weight = state.weight!.map((w, c) => w - lr * grads.gradWeight![c]!);
  const bias = state.bias!.map((b, c) => b - lr * grads.gradBias![c]!);
  await bn.loadStateDict({ ...state, weight, bias });
  console.log(`step ${step}: loss ${loss.toFixed(6)}`);
}
await bn.eval();
const evalOut = await bn.forward(x);
const info = await bn.refresh();
console.log(`eval: mean output ${(evalOut.data.reduce((a, v) => a + v, 0) / evalOut.data.length).toFixed(6)}, num_batches_tracked ${info.numBatchesTracked}`);
await bn.delete();
await client.close();
