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


def test_a_training_step_makes_one_forward_and_one_backward_per_module(client: normserve.Client, prefix: str, monkeypatch) -> None:
    """Issue 16: the parameters an optimiser step changed ride on the next Forward, and train() or
    eval() calls the server only when the mode changes; the server still holds every local value."""
    torch.manual_seed(4)
    local = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    remote = normserve.convert_remote_batchnorm(copy.deepcopy(local), client, prefix=prefix)
    models = (local, remote)
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    calls: list[str] = []
    routed = client._routed
    monkeypatch.setattr(client, "_routed", lambda method, name, attempt: (calls.append(method), routed(method, name, attempt))[1])
    x = torch.randn(5, 3, 9, 9)
    for step in range(3):
        calls.clear()
        for model, optimiser in zip(models, optimisers):
            optimiser.zero_grad()
            model(x).square().mean().backward()
            optimiser.step()
        assert sorted(calls) == ["Backward", "Backward", "Forward", "Forward"], f"step {step}: {calls}"
    calls.clear()
    for model in models:
        model.train()
    assert calls == []
    for model in models:
        model.eval()
    assert calls == ["UpdateModule", "UpdateModule"]
    calls.clear()
    for model in models:
        model.eval()
    assert calls == []
    assert_close(remote(x), local(x), "eval output after the last optimiser step")
    for (key, want), got in zip(local.state_dict().items(), remote.state_dict().values()):
        assert_close(got, want, key)
