"""state_dict and load_state_dict under PyTorch's keys, with the server's values."""
from __future__ import annotations

from typing import TypeVar

import pytest
import torch
from torch import nn

import normserve

from conftest import assert_close

KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
M = TypeVar("M", bound=nn.Module)


def trained(module: M, steps: int = 3) -> M:
    torch.manual_seed(2)
    for _ in range(steps):
        module(torch.randn(5, 3, 4, 4) * 2 + 1)
    return module


def test_state_dict_round_trip(client: normserve.Client, prefix: str) -> None:
    remote = trained(normserve.RemoteBatchNorm2d(3, momentum=0.2, client=client, name=prefix + "bn"))
    assert remote.weight is not None
    with torch.no_grad():
        remote.weight.mul_(3.0)
    state = remote.state_dict()
    assert list(state) == KEYS
    assert state._metadata[""]["version"] == 2  # type: ignore[attr-defined]
    assert state["num_batches_tracked"].dtype == torch.long and int(state["num_batches_tracked"]) == 3
    # The server's values: the weight just changed locally is sent before it is read.
    server = client.get_state(prefix + "bn")
    for key in KEYS:
        assert torch.equal(state[key], server[key]), key
    for key in KEYS[2:]:
        assert torch.equal(getattr(remote, key), server[key]), key

    local = nn.BatchNorm2d(3, momentum=0.2)
    local.load_state_dict(state)
    other = normserve.RemoteBatchNorm2d(3, momentum=0.2, client=client, name=prefix + "copy")
    other.load_state_dict(state)
    for module in (local, remote, other):
        module.eval()
    x = torch.randn(2, 3, 4, 4)
    assert_close(remote(x), local(x), "eval after loading the remote state into PyTorch")
    assert_close(other(x), local(x), "eval after a remote round trip")


def test_load_state_dict_from_pytorch(client: normserve.Client, prefix: str) -> None:
    local = trained(nn.BatchNorm2d(3))
    with torch.no_grad():
        local.weight.uniform_(0.5, 2.0)
        local.bias.uniform_(-1.0, 1.0)
    remote = normserve.RemoteBatchNorm2d(3, client=client, name=prefix + "bn")
    remote.load_state_dict(local.state_dict())
    for key, value in local.state_dict().items():
        assert torch.equal(remote.state_dict()[key], value), key
    assert remote.weight is not None and torch.equal(remote.weight, local.weight)
    # The server computes with the loaded parameters and statistics.
    x = torch.randn(4, 3, 4, 4)
    assert_close(remote(x), local(x), "training forward after the load")
    assert_close(remote.running_var, local.running_var, "running_var")


def test_load_state_dict_of_a_model(client: normserve.Client, prefix: str) -> None:
    """Keys under the model's names; the version-1 rule for a dict without metadata."""
    local = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    trained(local)
    remote = normserve.convert_remote_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), client, prefix)
    remote.load_state_dict(local.state_dict())
    assert list(remote.state_dict()) == list(local.state_dict())
    for key, value in local.state_dict().items():
        assert torch.equal(remote.state_dict()[key], value), key

    # A plain dict has no metadata: PyTorch's BatchNorm then sets a missing counter to 0.
    plain = {k: v for k, v in local.state_dict().items() if k != "1.num_batches_tracked"}
    fresh = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    trained(fresh)
    expected = fresh.load_state_dict(plain)
    assert remote.load_state_dict(plain) == expected
    assert int(remote.state_dict()["1.num_batches_tracked"]) == int(fresh.state_dict()["1.num_batches_tracked"]) == 0


def load_error(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> str:
    with pytest.raises(RuntimeError) as info:
        module.load_state_dict(state, strict=strict)
    return str(info.value)


def linear_bn() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False))


def test_load_state_dict_errors_mirror_pytorch(client: normserve.Client, prefix: str) -> None:
    local = linear_bn()
    remote = normserve.convert_remote_batchnorm(linear_bn(), client, prefix)
    good = local.state_dict()

    missing = {k: v for k, v in good.items() if k != "1.running_var"}
    unexpected = {**good, "1.weight": torch.ones(3), "1.extra": torch.ones(1)}
    wrong_size = {**good, "1.running_mean": torch.zeros(4)}
    for state in (missing, unexpected, wrong_size):
        assert load_error(remote, state) == load_error(local, state)
    # Non-strict loads return the same missing and unexpected keys.
    assert remote.load_state_dict(missing, strict=False) == local.load_state_dict(missing, strict=False)
    assert remote.load_state_dict(unexpected, strict=False) == local.load_state_dict(unexpected, strict=False)


def test_attributes_call_through(client: normserve.Client, prefix: str) -> None:
    remote = normserve.RemoteBatchNorm3d(2, client=client, name=prefix + "bn")
    remote.momentum = None
    remote.eps = 1e-3
    remote.eval()
    info = client.get_module(prefix + "bn")
    assert info.config.cumulative_average and info.config.eps == pytest.approx(1e-3)
    assert info.training is False and remote.training is False
    remote.track_running_stats = False
    assert client.get_module(prefix + "bn").track_running_stats is False
    assert repr(remote) == (
        f"RemoteBatchNorm3d(2, eps=0.001, momentum=None, affine=True, track_running_stats=False, name='{prefix}bn')"
    )
