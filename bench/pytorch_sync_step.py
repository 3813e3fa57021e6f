"""Data-parallel training with statistics-only RemoteSyncBatchNorm beside local BatchNorm (issue 15):
torchvision's resnet18 (weights=None) converted with nn.SyncBatchNorm.convert_sync_batchnorm and
convert_remote_batchnorm(stats_only=True), trained by `--ranks` rank processes on shards of
`--batch` samples each, against the same model with PyTorch's BatchNorm on the joined batch in
one process (what the group's statistics reproduce), and on one shard (what each rank computes).
Every phase: warm-up steps, then timed steps; the local phases run before and after the ranks, and
their medians pool both. A rank's step is timed from zero_grad() to optimizer.step(); the group's
step time is the slowest rank's, step by step (the ranks meet in every BatchNorm's GatherStats).

Run by bench/pytorch-step.ts; prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Callable

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn

import normserve

# The server's counters, read as bench/pytorch_step.py reads them (this folder is on sys.path).
from pytorch_step import scrape


def model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def batches(n: int, size: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(count)]


def timed_steps(
    m: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], warmup: int, steps: int, at_start: Callable[[], None] = lambda: None
) -> list[float]:
    """Step times after `warmup` steps; `at_start` runs once, just before the first timed step."""
    optimiser = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            at_start()
        x, y = data[i % len(data)]
        t = time.perf_counter()
        optimiser.zero_grad()
        F.cross_entropy(m(x), y).backward()
        optimiser.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def rank_main(rank: int, args: argparse.Namespace, prefix: str, out: str) -> None:
    torch.set_num_threads(1)
    client = normserve.Client(args.address)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model())
    remote = normserve.convert_remote_batchnorm(synced, client, prefix, rank=rank, world_size=args.ranks, stats_only=True)
    shard = [(x[rank * args.batch : (rank + 1) * args.batch], y[rank * args.batch : (rank + 1) * args.batch]) for x, y in batches(args.batch * args.ranks, args.size)]
    # Rank 0 reads the server's counters around the timed steps, which both ranks take together.
    counters: list[tuple[float, float]] = []
    times = timed_steps(remote, shard, args.warmup, args.steps, lambda: counters.append(scrape(args.metrics)) if rank == 0 else None)
    if rank == 0:
        counters.append(scrape(args.metrics))
    torch.save({"times": times, "counters": counters}, Path(out) / f"rank{rank}.pt")
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="samples per rank")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    joined, one = model(), model()
    joined_data, shard_data = batches(args.batch * args.ranks, args.size), batches(args.batch, args.size)
    local_joined = timed_steps(joined, joined_data, args.warmup, args.steps)
    local_shard = timed_steps(one, shard_data, args.warmup, args.steps)
    with TemporaryDirectory() as out:
        mp.spawn(rank_main, args=(args, f"bench/resnet18-sync/{uuid.uuid4().hex[:8]}/", out), nprocs=args.ranks, join=True)
        results = [torch.load(Path(out) / f"rank{r}.pt") for r in range(args.ranks)]
    ranks = [r["times"] for r in results]
    (before, after) = results[0]["counters"]
    local_joined += timed_steps(copy.deepcopy(joined), joined_data, args.warmup, args.steps)
    local_shard += timed_steps(copy.deepcopy(one), shard_data, args.warmup, args.steps)
    group = [max(step) for step in zip(*ranks)]
    steps_run = args.steps * args.ranks
    print(json.dumps({
        "model": "resnet18",
        "ranks": args.ranks,
        "input_per_rank": [args.batch, 3, args.size, args.size],
        "steps": args.steps,
        "torch_threads_local": torch.get_num_threads(),
        "torch_threads_per_rank": 1,
        "local_joined_ms": statistics.median(local_joined) * 1e3,
        "local_shard_ms": statistics.median(local_shard) * 1e3,
        "group_ms": statistics.median(group) * 1e3,
        "ratio_to_joined": statistics.median(group) / statistics.median(local_joined),
        "calls_per_rank_step": (after[0] - before[0]) / steps_run,
        "message_bytes_per_rank_step": (after[1] - before[1]) / steps_run,
    }))


if __name__ == "__main__":
    main()
