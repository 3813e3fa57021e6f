/**
 * One rank of the GatherStats latency benchmark (bench/sync-latency.ts starts several): it runs
 * `warmup + steps` group steps of GatherStats with C channels and prints the round-trip time of
 * each measured call, in milliseconds, as JSON on stdout.
 *
 *   node dist/bench/sync-rank.js <address> <module> <rank> <world> <channels> <warmup> <steps>
 */
import { NormserveClient } from '../src/client/client.js';

const [address, name, rankText, worldText, channelsText, warmupText, stepsText] = process.argv.slice(2);
const rank = Number(rankText);
const worldSize = Number(worldText);
const channels = Number(channelsText);
const warmup = Number(warmupText);
const steps = Number(stepsText);

const client = new NormserveClient(address!);
const mean = Array.from({ length: channels }, (_, c) => Math.sin(rank + c));
const variance = Array.from({ length: channels }, (_, c) => 1 + ((rank + c) % 3));
const times: number[] = [];
for (let step = 0; step < warmup + steps; step++) {
  const t = process.hrtime.bigint();
  await client.gatherStats(name!, { step, rank, worldSize }, { count: 256 + rank, mean, var: variance });
  if (step >= warmup) times.push(Number(process.hrtime.bigint() - t) / 1e6);
}
client.close();
process.stdout.write(JSON.stringify(times));
