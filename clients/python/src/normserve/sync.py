"""torch.nn.SyncBatchNorm whose group statistics are pooled by the normserve coordinator."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from normserve.client import Client, GroupStats, Rule, SyncGradients
from normserve.modules import RemoteNorm, _refuse_tracing, as_float32


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

    With `stats_only`, the rank normalises its shard itself and the server sees only statistics:
    GatherStats sends the shard's per-channel count, mean and biased variance (float64, 2C+1
    numbers) and answers the group's, which the rank normalises with (in float64, rounded once to
    the input's float32); the backward sends Σ dy and Σ dy·(x − mean) with ReduceGrads and gets the
    group's. No tensor crosses the wire, the weight and bias are the local Parameters (sent to the
    server only by state_dict()), and the server keeps the running statistics and the counter as
    with full shards.
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
        stats_only: bool = False,
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
        self.stats_only = stats_only

    @property
    def step(self) -> int:
        """The step the next forward takes."""
        return self._step

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, world_size={self.world_size}" + (", stats_only=True" if self.stats_only else "")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.stats_only:
            return super().forward(input)
        _refuse_tracing()
        params = [p for p in (self.weight, self.bias) if p is not None]
        save = torch.is_grad_enabled() and (input.requires_grad or any(p.requires_grad for p in params))
        return _StatsOnlyFunction.apply(input, self.weight, self.bias, self, save)

    def _remote_forward(self, input: torch.Tensor, save: bool) -> tuple[torch.Tensor, Any]:
        step = self._step
        self._step += 1
        r = self.client.sync_forward(self.name, input, step=step, rank=self.rank, world_size=self.world_size, save_for_backward=save)
        return r.output, (step, r.context_id)

    def _remote_backward(self, saved: Any, grad_output: torch.Tensor) -> SyncGradients:
        step, context_id = saved
        return self.client.sync_backward(self.name, context_id, grad_output, step=step, rank=self.rank, world_size=self.world_size)

    def _gather(self, x: torch.Tensor) -> tuple[int, GroupStats, bool]:
        """GatherStats for shard `x`: the step, the statistics to normalise with, and whether they
        are a batch's (else the running statistics)."""
        step = self._step
        self._step += 1
        channels = x.shape[1]
        count = x.numel() // channels if channels else 0
        if count:
            # PyTorch's CPU BatchNorm kernel collects the shard's statistics in one pass, summing
            # in double; its mean and invstd come back rounded to float32.
            _, mean32, invstd32 = torch.native_batch_norm(x.detach(), None, None, None, None, True, 0.0, self.eps)
            mean = mean32.to(torch.float64)
            var = (1 / invstd32.to(torch.float64) ** 2 - self.eps).clamp_(min=0)
        else:
            mean = var = torch.zeros(0, dtype=torch.float64)
        stats = self.client.gather_stats(self.name, step=step, rank=self.rank, world_size=self.world_size, count=count, mean=mean, var=var)
        # Not synced: the rank's own batch statistics came back (training without a group, or no
        # running statistics), or else the running statistics.
        batch = stats.synced or (stats.count == count and count > 0 and torch.equal(stats.mean, mean))
        return step, stats, batch


class _StatsOnlyFunction(torch.autograd.Function):
    """A stats-only RemoteSyncBatchNorm call: nn.SyncBatchNorm's algorithm, with the coordinator's
    GatherStats and ReduceGrads where PyTorch has its all_gather and all_reduce, and PyTorch's CPU
    BatchNorm kernels for the element-wise passes (nn.SyncBatchNorm's own run on GPUs only)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], module: RemoteSyncBatchNorm, save: bool
    ) -> torch.Tensor:
        dtype = input.dtype
        input = as_float32(input).contiguous()
        ctx.dtype = dtype
        step, stats, batch = module._gather(input)
        mean, var = stats.mean.to(torch.float32), stats.var.to(torch.float32)
        if save:
            ctx.module, ctx.step, ctx.synced, ctx.batch, ctx.count = module, step, stats.synced, batch, stats.count
            ctx.save_for_backward(input, weight, mean, var)
        if input.numel() == 0:
            return torch.empty_like(input, dtype=dtype)
        # (x - mean) / sqrt(var + eps) * weight + bias, with the statistics given.
        return torch.nn.functional.batch_norm(input, mean, var, weight, bias, False, 0.0, module.eps).to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        x, weight, mean, var = ctx.saved_tensors
        module: RemoteSyncBatchNorm = ctx.module
        dy = as_float32(grad_output).contiguous()
        channels = x.shape[1]
        wants = ctx.needs_input_grad
        w = weight if weight is not None else torch.ones(channels)
        invstd = 1 / torch.sqrt(var.to(torch.float64) + module.eps)
        if x.numel() > 0:
            # With the statistics as constants: dy * invstd * w, and this rank's Σ dy·x̂ and Σ dy.
            grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                dy, x, w, mean, var, None, None, False, module.eps, [wants[0], True, True]
            )
        else:
            grad_input, grad_weight, grad_bias = torch.empty_like(dy), torch.zeros(channels), torch.zeros(channels)
        sum_dy = grad_bias.to(torch.float64)
        sum_dy_xmu = grad_weight.to(torch.float64) / invstd
        count = ctx.count
        if ctx.synced:
            # Every rank sends its sums, even one that needs no input gradient: the others wait.
            group = module.client.reduce_grads(
                module.name, step=ctx.step, rank=module.rank, world_size=module.world_size, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu
            )
            sum_dy, sum_dy_xmu, count = group.sum_dy, group.sum_dy_xmu, group.count
        if wants[0] and ctx.batch and x.numel() > 0:
            # The terms through the batch statistics: − invstd·w·(Σdy/N) − (x − mean)·invstd³·w·(Σdy·(x−mean)/N).
            k1 = invstd * w.to(torch.float64)
            k2 = k1 * invstd * invstd * sum_dy_xmu / count
            shape = (1, channels) + (1,) * (x.dim() - 2)
            grad_input.addcmul_(x, k2.to(torch.float32).view(shape), value=-1)
            grad_input.sub_((k1 * sum_dy / count - k2 * mean.to(torch.float64)).to(torch.float32).view(shape))
        # This rank's partial parameter gradients, as nn.SyncBatchNorm returns them.
        affine = weight is not None
        return (
            grad_input.to(ctx.dtype) if wants[0] else None,
            grad_weight if affine and wants[1] else None,
            grad_bias if affine and wants[2] else None,
            None,
            None,
        )


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
