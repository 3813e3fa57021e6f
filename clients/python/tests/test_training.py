"""Models trained with PyTorch's BatchNorm and, from the same initial weights, with remote
BatchNorm after convert_remote_batchnorm: the same losses, outputs, gradients and state."""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normserve

from conftest import assert_close, grad_of


def named(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def cnn() -> nn.Module:
    return named(
        conv1=nn.Conv2d(3, 8, 3, padding=1),
        bn1=nn.BatchNorm2d(8),
        relu=nn.ReLU(),
        conv2=nn.Conv2d(8, 6, 3, padding=1),
        bn2=nn.BatchNorm2d(6, momentum=0.3),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(6, 5),
    )


def net1d() -> nn.Module:
    """BatchNorm1d on (N, C, L) and on (N, C), the second without affine parameters."""
    return named(
        conv=nn.Conv1d(2, 4, 3, padding=1),
        bn1=nn.BatchNorm1d(4),
        relu=nn.ReLU(),
        flatten=nn.Flatten(),
        fc1=nn.Linear(4 * 7, 6),
        bn2=nn.BatchNorm1d(6, affine=False),
        fc2=nn.Linear(6, 5),
    )


def net3d() -> nn.Module:
    """BatchNorm3d with momentum=None (the cumulative average)."""
    return named(
        conv=nn.Conv3d(2, 4, 3, padding=1),
        # PyTorch 1.13 annotates momentum as float, though None is documented and works.
        bn=nn.BatchNorm3d(4, momentum=None),  # type: ignore[arg-type]
        relu=nn.ReLU(),
        pool=nn.AdaptiveAvgPool3d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(4, 5),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cnn": (cnn, (8, 3, 10, 10)),
    "1d": (net1d, (8, 2, 7)),
    "3d": (net3d, (6, 2, 4, 4, 4)),
}
STEPS = 4


@dataclass
class Step:
    loss: torch.Tensor
    output: torch.Tensor
    grads: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]


def train(model: nn.Module, optimiser: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Step]:
    steps = []
    for x, target in batches:
        optimiser.zero_grad()
        output = model(x)
        loss = F.cross_entropy(output, target)
        loss.backward()
        grads = {name: grad_of(p) for name, p in model.named_parameters()}
        state = {key: value.clone() for key, value in model.state_dict().items()}
        steps.append(Step(loss.detach(), output.detach(), grads, state))
        optimiser.step()
    return steps


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("model_name", MODELS)
def test_training_matches_pytorch(client: normserve.Client, prefix: str, model_name: str) -> None:
    make, shape = MODELS[model_name]
    torch.manual_seed(0)
    local = make()
    remote = copy.deepcopy(local)
    # Built before the conversion: the remote modules keep the Parameter objects themselves.
    local_sgd, remote_sgd = sgd(local), sgd(remote)
    remote = normserve.convert_remote_batchnorm(remote, client, prefix)
    kinds = {name: type(m).__name__ for name, m in remote.named_modules() if "bn" in name}
    assert all(kind.startswith("RemoteBatchNorm") for kind in kinds.values()), kinds
    for name in kinds:
        assert client.get_module(prefix + name).name == prefix + name

    batches = [(torch.randn(shape), torch.randint(0, 5, (shape[0],))) for _ in range(STEPS)]
    expected, actual = train(local, local_sgd, batches), train(remote, remote_sgd, batches)
    for i, (e, a) in enumerate(zip(expected, actual)):
        assert_close(a.loss, e.loss, f"step {i} loss")
        assert_close(a.output, e.output, f"step {i} output")
        assert a.grads.keys() == e.grads.keys()
        for key in e.grads:
            assert_close(a.grads[key], e.grads[key], f"step {i} grad of {key}")
        assert list(a.state) == list(e.state)
        for key in e.state:
            assert_close(a.state[key], e.state[key], f"step {i} {key}")

    local.eval()
    remote.eval()
    for name in kinds:
        assert client.get_module(prefix + name).training is False
    x = torch.randn(shape)
    with torch.no_grad():
        assert_close(remote(x), local(x), "eval output")


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
