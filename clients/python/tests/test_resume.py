"""A second run under the same prefix (issue 16): refused with the way out, resumed on purpose, or
started afresh after delete_modules; never silently mixed with the earlier run's state."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normserve

from conftest import assert_close


def _model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))


def _train(model: nn.Module, steps: int, seed: int = 0) -> None:
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimiser.zero_grad()
        model(torch.randn(6, 3, 8, 8, generator=g)).square().mean().backward()
        optimiser.step()


def test_a_second_run_on_the_same_names_is_refused_with_the_way_out(client: normserve.Client, prefix: str) -> None:
    first = normserve.convert_remote_batchnorm(_model(), client, prefix)
    _train(first, 3)
    before = client.get_state(prefix + "1")
    with pytest.raises(normserve.RemoteError) as info:
        normserve.convert_remote_batchnorm(_model(), client, prefix)
    assert info.value.reason == "BN_ERR_MODULE_EXISTS"
    assert "resume=True" in info.value.message and f"normserve.delete_modules(client, {prefix!r})" in info.value.message
    after = client.get_state(prefix + "1")
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_resume_goes_on_with_the_server_state(client: normserve.Client, prefix: str) -> None:
    local = _model()
    first = normserve.convert_remote_batchnorm(copy.deepcopy(local), client, prefix)
    _train(first, 3)
    _train(local, 3)
    again = _model()
    resumed = normserve.convert_remote_batchnorm(again, client, prefix, resume=True)
    bn = resumed.get_submodule("1")
    assert int(bn.num_batches_tracked) == 3
    # The local Parameters (the same objects) took the server's values.
    assert again.get_submodule("1").weight is bn.weight
    assert torch.equal(bn.weight.detach(), client.get_state(prefix + "1")["weight"])
    # The rest of the model comes from the job's checkpoint, as a resumed job loads it; training
    # then goes on from where the first run stopped, as the local model trained throughout does.
    resumed.load_state_dict(first.state_dict())
    _train(resumed, 1, seed=9)
    _train(local, 1, seed=9)
    assert int(bn.num_batches_tracked) == 4
    for key, value in local.state_dict().items():
        assert_close(resumed.state_dict()[key], value, key)


def test_delete_modules_clears_a_run_for_a_fresh_start(client: normserve.Client, prefix: str) -> None:
    normserve.convert_remote_batchnorm(_model(), client, prefix)
    keep = normserve.RemoteBatchNorm1d(2, client=client, name=prefix.rstrip("/") + "-other/bn")
    assert sorted(normserve.delete_modules(client, prefix)) == [prefix + "1", prefix + "5"]
    fresh = normserve.convert_remote_batchnorm(_model(), client, prefix)
    assert int(fresh.get_submodule("1").num_batches_tracked) == 0
    assert client.get_module(keep.name).name == keep.name
    with pytest.raises(ValueError, match="non-empty prefix"):
        normserve.delete_modules(client, "")


def test_a_rerun_sync_job_is_refused_not_replayed(client: normserve.Client, prefix: str) -> None:
    """The issue's case: before, the server answered the new run's steps 0..3 with the first run's
    kept results, the counter stayed at 0 instead of 4, and nothing said so."""
    def sync_model() -> nn.Module:
        return nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))

    torch.manual_seed(4)
    xs = [torch.randn(4, 3, 5, 5) * 2 + 1 for _ in range(5)]
    first = normserve.convert_remote_batchnorm(sync_model(), client, prefix, rank=0, world_size=1)
    for x in xs[:4]:
        first(x)
    with pytest.raises(ValueError, match=r"num_batches_tracked is 4 on the server and 0 here.*resume=True.*delete_modules"):
        normserve.convert_remote_batchnorm(sync_model(), client, prefix, rank=0, world_size=1)
    with pytest.raises(ValueError, match="needs first_step"):
        normserve.convert_remote_batchnorm(sync_model(), client, prefix, rank=0, world_size=1, resume=True)
    resumed = normserve.convert_remote_batchnorm(sync_model(), client, prefix, rank=0, world_size=1, resume=True, first_step=4)
    resumed(xs[4])
    local = nn.BatchNorm2d(3)
    for x in xs:
        local(x)
    bn = resumed.get_submodule("0")
    assert int(bn.num_batches_tracked) == 5
    assert_close(bn.running_mean, local.running_mean, "running_mean")
    assert_close(bn.running_var, local.running_var, "running_var")


def test_a_module_made_twice_names_the_way_out(client: normserve.Client, prefix: str) -> None:
    normserve.RemoteBatchNorm1d(3, client=client, name=prefix + "bn")
    with pytest.raises(normserve.RemoteError, match=r"already exists: pass exist_ok=True to join it.*client.delete_module") as info:
        normserve.RemoteBatchNorm1d(3, client=client, name=prefix + "bn")
    assert info.value.reason == "BN_ERR_MODULE_EXISTS"
    assert normserve.RemoteBatchNorm1d(3, client=client, name=prefix + "bn", exist_ok=True).created is False

