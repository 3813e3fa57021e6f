"""Remote training held to PyTorch's own float32 error after every step (issue 13): the
scenarios of drift.py in lockstep, and proof that defects far below the old rtol 1e-4 are caught."""
from __future__ import annotations

from typing import Callable

import pytest
from torch.nn.modules.batchnorm import _BatchNorm

import normserve
from drift import HELD_OUT, RESNET18, SCENARIOS, Record, Scenario, Tolerance, Trio, run


def expected_quantities(scenario: Scenario) -> tuple[set[str], set[str]]:
    """What every step and every eval batch must compare: the loss and output, each BatchNorm's
    output, every parameter and its gradient, every buffer and counter; in eval, each BatchNorm's
    output and the model's."""
    model = scenario.make()
    norms = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    step = {"loss", "output", *(f"output of {n}" for n in norms), *model.state_dict(), *(f"{p}.grad" for p, _ in model.named_parameters())}
    return step, {*(f"eval {n}" for n in norms), "eval output"}


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_step_holds_to_pytorch_float32_error(backend_client: normserve.Client, prefix: str, name: str) -> None:
    """On every compute backend's server."""
    scenario = SCENARIOS[name]
    record = run(scenario, backend_client, prefix, lockstep=True)

    local_norms = {name: type(m).__name__ for name, m in scenario.make().named_modules() if isinstance(m, _BatchNorm)}
    remote_norms = {name: type(m).__name__ for name, m in record.remote.named_modules() if isinstance(m, normserve.RemoteNorm)}
    assert remote_norms == {name: f"Remote{kind}" for name, kind in local_norms.items()}
    assert all(backend_client.get_module(prefix + name).training for name in remote_norms)
    assert len(record.steps) == scenario.steps
    step, evals = expected_quantities(scenario)
    assert all(set(s) == step for s in record.steps), sorted(step ^ set(record.steps[0]))
    assert len(record.eval) == 1 + HELD_OUT and all(set(e) == evals for e in record.eval)
    failures = record.failures(Tolerance())
    assert not failures, "\n".join(failures)
    # A step with a ReLU input across zero from float64 leaves its gradients and parameters out
    # (Record.series); nearly every step must count in full.
    kinked = [i for i, k in enumerate(record.kinks) if k.remote or k.local]
    assert len(kinked) <= max(1, scenario.steps // 10), f"steps with a ReLU input across zero: {kinked}"


def test_torchvision_resnet18_trains_as_pytorch(client: normserve.Client, prefix: str) -> None:
    """A real model (issue 16): ReLU(inplace=True) on the remote outputs and `out += identity`
    modify them in place, which autograd allows only on tensors that are not views."""
    record = run(RESNET18, client, prefix, lockstep=True)
    remote_norms = [name for name, m in record.remote.named_modules() if isinstance(m, normserve.RemoteBatchNorm2d)]
    assert len(remote_norms) == 20
    assert len(record.steps) == RESNET18.steps
    step, evals = expected_quantities(RESNET18)
    assert all(set(s) == step for s in record.steps), sorted(step ^ set(record.steps[0]))
    assert all(set(e) == evals for e in record.eval)
    failures = record.failures(Tolerance())
    assert not failures, "\n".join(failures)
    kinked = [i for i, k in enumerate(record.kinks) if k.remote or k.local]
    assert len(kinked) <= 1, f"steps with a ReLU input across zero: {kinked}"


def _tampered(client: normserve.Client, prefix: str, change: Callable[[Trio], None], steps: int = 6) -> Record:
    return run(SCENARIOS["2d"], client, prefix, lockstep=True, steps=steps, tamper=change)


def test_a_momentum_off_by_a_thousandth_is_caught(client: normserve.Client, prefix: str) -> None:
    """The server's bn1 updates its running statistics with momentum 0.1001, the local twins with
    0.1: the running mean drifts by about 1e-5 of itself per step."""
    record = _tampered(client, prefix, lambda trio: client.update_module(prefix + "bn1", momentum=0.1001))
    failures = record.failures(Tolerance())
    assert any(f.startswith("bn1.running_mean:") for f in failures), failures
    assert not any(f.startswith("bn2.") for f in failures), failures


def test_an_eps_off_by_a_fifth_is_caught(client: normserve.Client, prefix: str) -> None:
    """eps 1.2e-5 instead of 1e-5 on the server's bn1 moves its outputs by about 2e-6 of
    themselves, a fiftieth of rtol 1e-4: its output, and the statistics of the next BatchNorm,
    are flagged."""
    record = _tampered(client, prefix, lambda trio: client.update_module(prefix + "bn1", eps=1.2e-5))
    flagged = {f.split(":")[0] for f in record.failures(Tolerance())}
    assert {"output of bn1", "bn2.running_mean", "bn2.running_var"} <= flagged, flagged


def test_parameters_not_sent_after_an_optimiser_step_are_caught(client: normserve.Client, prefix: str) -> None:
    """The server normalising with bn1's initial weight and bias while the optimiser moves the
    local Parameters (a parameter sync that never happens) is flagged from the second step."""

    def never_push(trio: Trio) -> None:
        module = trio.remote.get_submodule("bn1")
        assert isinstance(module, normserve.RemoteNorm)
        # It believes the server holds whatever it has: neither Forward nor LoadState carries them.
        module._unchanged = lambda local: True  # type: ignore[method-assign]

    failures = _tampered(client, prefix, never_push).failures(Tolerance())
    flagged = {f.split(":")[0] for f in failures}
    assert {"output of bn1", "bn1.weight.grad", "conv1.weight.grad", "eval bn1"} <= flagged, flagged
