"""PyTorch's module conventions on remote modules (issue 16): buffers, resets, dtype moves, and
bfloat16/float16 inputs computed in float32 and answered in their own dtype."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normserve

from conftest import assert_close


def _pair(client: normserve.Client, prefix: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(6)
    local = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2, momentum=None))
    remote = normserve.convert_remote_batchnorm(copy.deepcopy(local), client, prefix)
    x = torch.randn(5, 3, 7, 7)
    for m in (local, remote):
        m(x)
        m(x * 2 + 1)
    return local, remote


def test_named_buffers_are_the_servers_under_pytorchs_names(client: normserve.Client, prefix: str) -> None:
    local, remote = _pair(client, prefix)
    mine, theirs = dict(remote.named_buffers()), dict(local.named_buffers())
    assert list(mine) == list(theirs)
    for key, value in theirs.items():
        assert_close(mine[key], value, key)
    assert len(list(remote.buffers())) == 6


def test_setting_a_buffer_to_none_or_a_tensor_sets_the_servers(client: normserve.Client, prefix: str) -> None:
    local, remote = _pair(client, prefix)
    for m in (local, remote):
        m.get_submodule("1").running_mean = None
    assert [k for k, _ in remote.named_buffers()] == [k for k, _ in local.named_buffers()]
    assert "running_mean" not in client.get_state(prefix + "1")
    bn = remote.get_submodule("4")
    bn.running_var = torch.full((2,), 3.0)
    assert torch.equal(client.get_state(prefix + "4")["running_var"], torch.full((2,), 3.0))


def test_reset_running_stats_and_reset_parameters_as_pytorch(client: normserve.Client, prefix: str) -> None:
    local, remote = _pair(client, prefix)
    for m in (local, remote):
        with torch.no_grad():
            m.get_submodule("4").weight.mul_(3)
        m.get_submodule("1").reset_running_stats()
        m.get_submodule("4").reset_parameters()
    for (key, want), got in zip(local.state_dict().items(), remote.state_dict().values()):
        assert_close(got, want, key)
    x = torch.randn(5, 3, 7, 7)
    assert_close(remote(x), local(x), "output after the resets")
    # PyTorch raises AttributeError when a buffer is None; so does the server, changing nothing.
    for m in (local, remote):
        m.get_submodule("1").running_var = None
    with pytest.raises(AttributeError):
        local.get_submodule("1").reset_running_stats()
    with pytest.raises(AttributeError):
        remote.get_submodule("1").reset_running_stats()


def test_dtype_moves_leave_the_buffers_on_the_server(client: normserve.Client, prefix: str) -> None:
    _, remote = _pair(client, prefix)
    before = client.get_state(prefix + "1")
    remote.to(torch.bfloat16)
    assert remote.get_submodule("1").weight.dtype == torch.bfloat16
    after = client.get_state(prefix + "1")
    assert all(torch.equal(after[k], before[k]) for k in ("running_mean", "running_var", "num_batches_tracked"))


def test_bfloat16_under_autocast_and_float16_inputs_as_pytorch(client: normserve.Client, prefix: str) -> None:
    """Under CPU autocast(bfloat16) the conv hands BatchNorm bfloat16; PyTorch computes in float32
    and answers bfloat16, and so does the remote module. float16 (which PyTorch's CPU BatchNorm
    does not take, its GPU one does) is computed the same way."""
    local, remote = _pair(client, prefix)
    x = torch.randn(5, 3, 7, 7)
    outputs, grads = [], []
    for m in (local, remote):
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xs)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        outputs.append(y.float())
        grads.append(xs.grad)
    assert grads[1].dtype == grads[0].dtype == torch.float32
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(grads[1], grads[0], rtol=5e-2, atol=5e-2)
    bn = remote.get_submodule("4")
    h = (torch.randn(4, 2, 3, 3) * 2).requires_grad_()
    out = bn(h.half())
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert h.grad is not None and h.grad.dtype == torch.float32
    reference = nn.BatchNorm2d(2)
    reference.load_state_dict(bn.state_dict())
    reference.eval()
    bn.eval()
    assert_close(bn(h.detach().half()).float(), reference(h.detach().half().float()).half().float(), "float16 eval output")


def test_pickle_save_and_deepcopy_reconnect_by_address_and_name(client: normserve.Client, prefix: str) -> None:
    import io
    import pickle

    _, remote = _pair(client, prefix)
    remote.eval()
    x = torch.randn(3, 3, 7, 7)
    with torch.no_grad():
        want = remote(x)
    buffer = io.BytesIO()
    torch.save(remote, buffer)
    buffer.seek(0)
    for copy_ in (torch.load(buffer), pickle.loads(pickle.dumps(remote)), copy.deepcopy(remote)):
        bn = copy_.get_submodule("1")
        assert isinstance(bn, normserve.RemoteBatchNorm2d) and bn.name == prefix + "1"
        assert bn.client is not client
        with torch.no_grad():
            assert torch.equal(copy_(x), want)
        # The copy is the same module on the server, not a new one.
        assert [k for k, _ in copy_.named_buffers()] == [k for k, _ in remote.named_buffers()]
        bn.client.close()
    secure = normserve.Client("localhost:1", credentials=__import__("grpc").ssl_channel_credentials())
    with pytest.raises(TypeError, match="TLS credentials cannot be pickled"):
        pickle.dumps(secure)


def test_convert_local_batchnorm_is_the_way_back_for_save_onnx_and_torchscript(client: normserve.Client, prefix: str) -> None:
    import io

    local, remote = _pair(client, prefix)
    weight = remote.get_submodule("1").weight
    with pytest.raises(RuntimeError, match=r"cannot be traced or exported.*convert_local_batchnorm"):
        torch.onnx.export(remote.eval(), torch.randn(1, 3, 7, 7), io.BytesIO())
    with pytest.raises(RuntimeError, match="convert_local_batchnorm"):
        torch.jit.trace(remote, torch.randn(1, 3, 7, 7))
    back = normserve.convert_local_batchnorm(remote)
    assert [type(m) for m in back.modules()] == [type(m) for m in local.modules()]
    assert back.get_submodule("1").weight is weight
    assert back.get_submodule("4").momentum is None
    for (key, want), got in zip(local.state_dict().items(), back.state_dict().values()):
        assert_close(got, want, key)
    local.eval()
    x = torch.randn(2, 3, 7, 7)
    assert_close(back(x), local(x), "eval output after the way back")
    torch.onnx.export(back, x, io.BytesIO())
    assert_close(torch.jit.trace(back, x)(x), local(x), "traced output")
