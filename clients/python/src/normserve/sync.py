"""torch.nn.SyncBatchNorm whose group statistics are pooled by the normserve coordinator."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from normserve.client import Client, Rule, SyncGradients
from normserve.modules import RemoteNorm


class RemoteSyncBatchNorm(RemoteNorm):
    """torch.nn.SyncBatchNorm: every rank of a data-parallel job holds one, under the same name,
    and each gets what BatchNorm over the whole group's batch gives. No GPUs or NCCL needed.

    The rank and the group's size come from torch.distributed (of `process_group`, or the default
    group) when it is initialised, else from `rank` and `world_size` (default: a group of one).
    The first rank to construct the module creates it on the server; the others join it. Steps
    are numbered from `first_step` (default 0): a job that resumes on an existing module passes
    the step it resumes at (`module.step` when it stopped), since the server answers a step it has
    already completed with the result it kept, for retries.
    `sync_rule` is "SYNC_WHEN_BATCH_STATS" (the server's default, PR #44445) or
    "SYNC_WHEN_TRAINING" (PyTorch 1.9 and later: no pooling in eval).
    """

    _kind = "SYNC_BATCH_NORM"
    # SyncForward carries no parameters: they go by LoadState before the forward that needs them.
    _parameters_ride_forward = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        *,
        client: Client,
        name: str,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        sync_rule: Optional[Rule] = None,
        first_step: int = 0,
    ) -> None:
        rank, world_size = group_place(process_group, rank, world_size)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats,
            client=client, name=name, exist_ok=True, world_size=world_size, sync_rule=sync_rule,
        )
        self.process_group = process_group
        self.rank = rank
        self.world_size = world_size
        # The group's step number. Every rank advances it the same way, one per forward (a
        # backward uses its forward's), so that the ranks' calls meet in the same step on the
        # server without talking to each other. A failed step is skipped by every rank alike:
        # the server fails it for all of them.
        self._step = first_step

    @property
    def step(self) -> int:
        """The step the next forward takes."""
        return self._step

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, world_size={self.world_size}"

    def _remote_forward(self, input: torch.Tensor, save: bool) -> tuple[torch.Tensor, Any]:
        step = self._step
        self._step += 1
        r = self.client.sync_forward(self.name, input, step=step, rank=self.rank, world_size=self.world_size, save_for_backward=save)
        return r.output, (step, r.context_id)

    def _remote_backward(self, saved: Any, grad_output: torch.Tensor) -> SyncGradients:
        step, context_id = saved
        return self.client.sync_backward(self.name, context_id, grad_output, step=step, rank=self.rank, world_size=self.world_size)


def group_place(process_group: Optional[Any], rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """This process's rank and its group's size."""
    if dist.is_available() and dist.is_initialized():
        found = (dist.get_rank(process_group), dist.get_world_size(process_group))
        given = (found[0] if rank is None else rank, found[1] if world_size is None else world_size)
        if given != found:
            raise ValueError(f"rank={rank}, world_size={world_size} disagree with torch.distributed: rank {found[0]} of {found[1]}")
        return found
    if process_group is not None:
        raise ValueError("a process_group needs torch.distributed to be initialised; without it, pass rank and world_size")
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return rank, world_size
