"""What each rank process of test_sync.py runs (torch.multiprocessing spawns it by name), and the
data both the ranks and the single-process reference use."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import normserve

from conftest import grad_of

CHANNELS = 4
MOMENTUM = 0.3
LR = 0.5
TRAINING_STEPS = 3
# Unequal shards of the global batch, per group size.
SHARDS = {2: (3, 5), 3: (2, 4, 3)}


@dataclass(frozen=True)
class Job:
    address: str
    prefix: str
    world_size: int
    #: torch.distributed (gloo on loopback) and DDP, or rank and world_size passed as arguments.
    gloo_port: Optional[int]
    out: Path
    #: Normalise on the rank, sending the server only statistics.
    stats_only: bool = False


def batches(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, dL/dy) of the whole group per step; the last pair is for eval."""
    g = torch.Generator().manual_seed(world_size)
    n = sum(SHARDS[world_size])
    return [
        (torch.randn(n, CHANNELS, 3, 3, generator=g) * 2 + 0.5, torch.randn(n, CHANNELS, 3, 3, generator=g))
        for _ in range(TRAINING_STEPS + 1)
    ]


def initial_parameters() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.rand(CHANNELS, generator=g) + 0.5, torch.randn(CHANNELS, generator=g)


def shard(t: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    sizes = SHARDS[world_size]
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def run_rank(rank: int, job: Job) -> None:
    torch.set_num_threads(1)
    client = normserve.Client(job.address)
    if job.gloo_port is not None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{job.gloo_port}", rank=rank, world_size=job.world_size)
        # The documented recipe: PyTorch's own conversion, then the remote one; rank and world
        # size come from torch.distributed.
        local: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(CHANNELS, momentum=MOMENTUM)))
        bn = normserve.convert_remote_batchnorm(local, client, job.prefix, stats_only=job.stats_only).get_submodule("0")
        assert isinstance(bn, normserve.RemoteSyncBatchNorm)
    else:
        bn = normserve.RemoteSyncBatchNorm(
            CHANNELS, momentum=MOMENTUM, client=client, name=job.prefix + "0", rank=rank, world_size=job.world_size, stats_only=job.stats_only
        )
    assert (bn.rank, bn.world_size, bn.stats_only) == (rank, job.world_size, job.stats_only)
    assert bn.weight is not None and bn.bias is not None
    weight, bias = initial_parameters()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    # With DDP the ranks' parameter gradients are averaged and every rank takes the same step.
    model: nn.Module = DistributedDataParallel(bn) if job.gloo_port is not None else bn
    optimiser = torch.optim.SGD(bn.parameters(), lr=LR) if job.gloo_port is not None else None

    records = []
    *training, (eval_x, _) = batches(job.world_size)
    for x, dy in training:
        xs = shard(x, job.world_size, rank).clone().requires_grad_()
        y = model(xs)
        (y * shard(dy, job.world_size, rank)).sum().backward()
        records.append(
            {
                "output": y.detach(),
                "grad_input": xs.grad,
                "grad_weight": grad_of(bn.weight),
                "grad_bias": grad_of(bn.bias),
                "state": {key: value.clone() for key, value in bn.state_dict().items()},
            }
        )
        if optimiser is not None:
            optimiser.step()
        bn.zero_grad()
    model.eval()
    with torch.no_grad():
        records.append({"output": model(shard(eval_x, job.world_size, rank))})
    torch.save(records, job.out / f"rank{rank}.pt")
    if job.gloo_port is not None:
        dist.destroy_process_group()
    client.close()
