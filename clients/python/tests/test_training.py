"""Autograd through remote modules outside a training step: eval-mode gradients, no_grad, outputs
modified in place, and parameters changed without an optimiser. Whole training runs against PyTorch are test_drift.py's."""
from __future__ import annotations

import copy

import torch
from torch import nn

import normserve

from conftest import assert_close


def test_gradients_flow_in_eval_and_without_grad_mode(client: normserve.Client, prefix: str) -> None:
    """Eval with running statistics differentiates dy·w·invstd; no_grad saves nothing and
    still updates the running statistics in training."""
    torch.manual_seed(1)
    local = nn.BatchNorm2d(3)
    with torch.no_grad():
        local.weight.uniform_(0.5, 1.5)
        local.bias.uniform_(-0.5, 0.5)
    remote = normserve.convert_remote_batchnorm(copy.deepcopy(local), client, prefix + "bn")
    with torch.no_grad():
        x = torch.randn(4, 3, 5, 5)
        assert_close(remote(x), local(x), "no_grad training output")
    assert_close(remote.running_mean, local.running_mean, "running_mean")
    assert_close(remote.num_batches_tracked, local.num_batches_tracked, "num_batches_tracked")

    local.eval()
    remote.eval()
    x = torch.randn(4, 3, 5, 5)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    dy = torch.randn(4, 3, 5, 5)
    (local(xs[0]) * dy).sum().backward()
    (remote(xs[1]) * dy).sum().backward()
    assert_close(xs[1].grad, xs[0].grad, "eval grad_input")
    for name in ("weight", "bias"):
        assert_close(remote.get_parameter(name).grad, local.get_parameter(name).grad, f"eval grad of {name}")


def test_parameters_changed_outside_an_optimiser_reach_the_server(client: normserve.Client, prefix: str) -> None:
    local = nn.BatchNorm1d(4)
    remote = normserve.RemoteBatchNorm1d(4, client=client, name=prefix + "bn")
    for module in (local, remote):
        weight, bias = module.get_parameter("weight"), module.get_parameter("bias")
        with torch.no_grad():
            weight.fill_(2.0)
            bias.copy_(torch.arange(4.0))
    x = torch.randn(6, 4)
    assert_close(remote(x), local(x), "after in-place init")
    remote.weight = nn.Parameter(torch.full((4,), -1.0))
    local.weight = nn.Parameter(torch.full((4,), -1.0))
    assert_close(remote(x), local(x), "after replacing the Parameter")
    assert torch.equal(client.get_state(prefix + "bn")["weight"], torch.full((4,), -1.0))


def test_outputs_may_be_modified_in_place(client: normserve.Client, prefix: str) -> None:
    """As torchvision's ResNets do (issue 16): `out += identity` and ReLU(inplace=True) on a remote
    module's output, then backward, give PyTorch's gradients."""
    torch.manual_seed(3)
    local = nn.BatchNorm2d(4)
    remote = normserve.RemoteBatchNorm2d(4, client=client, name=f"{prefix}inplace")
    x = torch.randn(3, 4, 5, 5)
    grads = []
    for m in (local, remote):
        xs = x.clone().requires_grad_()
        out = m(xs)
        out += xs
        torch.relu_(out)
        (out * torch.linspace(-1, 2, out.numel()).reshape(out.shape)).sum().backward()
        grads.append(xs.grad)
    assert_close(grads[1], grads[0], "grad_input")
