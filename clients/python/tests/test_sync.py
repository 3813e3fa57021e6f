"""RemoteSyncBatchNorm across processes: 2 and 3 ranks, each its own process and Client, with
full shards or statistics only, give what one process running nn.BatchNorm2d on the whole
(concatenated) batch gives."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import normserve

from conftest import assert_close, grad_of
from sync_ranks import CHANNELS, LR, MOMENTUM, Job, batches, initial_parameters, run_rank, shard


def reference(world_size: int, averaged: bool) -> list[dict[str, Any]]:
    """nn.BatchNorm2d on the concatenated batches. With `averaged` (DDP), the step uses the
    gradient averaged over the ranks, so the reference steps with its gradient / world_size."""
    bn = nn.BatchNorm2d(CHANNELS, momentum=MOMENTUM)
    weight, bias = initial_parameters()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    optimiser = torch.optim.SGD(bn.parameters(), lr=LR)
    records = []
    *training, (eval_x, _) = batches(world_size)
    for x, dy in training:
        x = x.clone().requires_grad_()
        y = bn(x)
        (y * dy).sum().backward()
        state = {key: value.clone() for key, value in bn.state_dict().items()}
        records.append(
            {"output": y.detach(), "grad_input": x.grad, "grad_weight": grad_of(bn.weight), "grad_bias": grad_of(bn.bias), "state": state}
        )
        if averaged:
            for param in bn.parameters():
                param.grad = grad_of(param) / world_size
            optimiser.step()
        bn.zero_grad()
    bn.eval()
    with torch.no_grad():
        records.append({"output": bn(eval_x)})
    return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("world_size", "gloo", "stats_only"),
    [(2, False, False), (3, False, False), (3, True, False), (2, False, True), (3, True, True)],
    ids=[
        "2 ranks by argument",
        "3 ranks by argument",
        "3 ranks with gloo and DDP",
        "2 ranks by argument, statistics only",
        "3 ranks with gloo and DDP, statistics only",
    ],
)
def test_ranks_match_batchnorm_on_the_whole_batch(
    address: str, prefix: str, tmp_path: Path, world_size: int, gloo: bool, stats_only: bool
) -> None:
    job = Job(address, prefix, world_size, free_port() if gloo else None, tmp_path, stats_only)
    mp.spawn(run_rank, args=(job,), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    expected = reference(world_size, averaged=gloo)

    for step, e in enumerate(expected[:-1]):
        for rank, records in enumerate(ranks):
            a = records[step]
            where = f"step {step} rank {rank}"
            assert_close(a["output"], shard(e["output"], world_size, rank), f"{where} output")
            assert_close(a["grad_input"], shard(e["grad_input"], world_size, rank), f"{where} grad_input")
            assert list(a["state"]) == list(e["state"])
            for key, value in e["state"].items():
                assert_close(a["state"][key], value, f"{where} {key}")
            if gloo:
                # DDP averaged the ranks' partial gradients.
                assert_close(a["grad_weight"], e["grad_weight"] / world_size, f"{where} grad_weight")
                assert_close(a["grad_bias"], e["grad_bias"] / world_size, f"{where} grad_bias")
        if not gloo:
            # Each rank holds its partial parameter gradients, as PyTorch's SyncBatchNorm does.
            for key in ("grad_weight", "grad_bias"):
                assert_close(torch.stack([r[step][key] for r in ranks]).sum(0), e[key], f"step {step} {key}")
    for rank, records in enumerate(ranks):
        assert_close(records[-1]["output"], shard(expected[-1]["output"], world_size, rank), f"eval rank {rank}")


def test_a_group_of_one_is_batchnorm(client: normserve.Client, prefix: str) -> None:
    """Without torch.distributed and without arguments, a group of one rank."""
    torch.manual_seed(3)
    remote = normserve.RemoteSyncBatchNorm(3, client=client, name=prefix + "bn")
    assert (remote.rank, remote.world_size) == (0, 1)
    local = nn.BatchNorm3d(3)
    x, dy = torch.randn(2, 3, 2, 3, 4), torch.randn(2, 3, 2, 3, 4)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    (remote(xs[0]) * dy).sum().backward()
    (local(xs[1]) * dy).sum().backward()
    assert_close(xs[0].grad, xs[1].grad, "grad_input")
    assert remote.weight is not None
    assert_close(remote.weight.grad, local.weight.grad, "grad_weight")
    assert_close(remote.running_var, local.running_var, "running_var")


def test_a_resumed_job_continues_its_steps(client: normserve.Client, prefix: str) -> None:
    """A new module object on the same server module resumes at `first_step`; starting again at
    0 would meet steps the server has completed and kept, and change nothing."""
    x = torch.randn(4, 3, 5)
    first = normserve.RemoteSyncBatchNorm(3, client=client, name=prefix + "bn")
    for _ in range(2):
        first(x)
    assert first.step == 2
    assert int(first.num_batches_tracked) == 2
    replayed = normserve.RemoteSyncBatchNorm(3, client=client, name=prefix + "bn")
    replayed(x)
    assert int(replayed.num_batches_tracked) == 2
    resumed = normserve.RemoteSyncBatchNorm(3, client=client, name=prefix + "bn", first_step=first.step)
    resumed(x)
    assert (resumed.step, int(resumed.num_batches_tracked)) == (3, 3)


@pytest.mark.parametrize("affine", [True, False])
def test_statistics_only_sends_no_tensor_and_is_batchnorm(client: normserve.Client, prefix: str, monkeypatch: pytest.MonkeyPatch, affine: bool) -> None:
    """A group of one in statistics-only mode: training and eval (with gradients through the
    running statistics) agree with nn.BatchNorm3d, and the calls are GatherStats and ReduceGrads."""
    torch.manual_seed(5)
    local = nn.BatchNorm3d(3, affine=affine, momentum=None)
    remote = normserve.RemoteSyncBatchNorm(3, affine=affine, momentum=None, client=client, name=prefix + "bn", stats_only=True)
    if affine:
        with torch.no_grad():
            for m in (local, remote):
                m.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))  # type: ignore[union-attr]
                m.bias.copy_(torch.tensor([0.1, 0.0, 3.0]))  # type: ignore[union-attr]
    calls: list[str] = []
    routed = client._routed
    monkeypatch.setattr(client, "_routed", lambda method, name, attempt: (calls.append(method), routed(method, name, attempt))[1])
    for step, training in enumerate([True, True, False]):
        local.train(training)
        remote.train(training)
        calls.clear()
        x, dy = torch.randn(2, 3, 2, 3, 4) * 3 + step, torch.randn(2, 3, 2, 3, 4)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [local(xs[0]), remote(xs[1])]
        for y in ys:
            (y * dy).sum().backward()
        where = f"step {step} ({'train' if training else 'eval'})"
        assert calls == (["GatherStats", "ReduceGrads"] if training else ["GatherStats"]), f"{where}: {calls}"
        assert_close(ys[1], ys[0].detach(), f"{where} output")
        assert_close(xs[1].grad, xs[0].grad, f"{where} grad_input")
        if affine:
            for name in ("weight", "bias"):
                assert_close(grad_of(remote.get_parameter(name)), grad_of(local.get_parameter(name)), f"{where} grad of {name}")
                remote.get_parameter(name).grad = None
                local.get_parameter(name).grad = None
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(remote, key), getattr(local, key), f"{where} {key}")
