"""Fixtures: the servers that test/integration/python-client.test.ts starts for these tests."""
from __future__ import annotations

import os
import re
import uuid
from typing import Iterator, Optional

import pytest
import torch

import normserve

# Float32 agreement with PyTorch, as the golden fixtures hold the service to for gradients
# (docs/testing.md); outputs and statistics are held to the same over several training steps.
RTOL = 1e-4
ATOL = 1e-5


def assert_close(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], what: str) -> None:
    """Both present (a buffer or gradient that is None fails) and equal within float32 tolerance."""
    assert actual is not None and expected is not None, f"{what}: {actual} vs {expected}"
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """A copy of a parameter's gradient, which the step must have set."""
    assert p.grad is not None
    return p.grad.clone()


def pytest_configure(config: pytest.Config) -> None:
    missing = [v for v in ("NORMSERVE_ADDRESS", "NORMSERVE_REPLICAS") if not os.environ.get(v)]
    if missing:
        raise pytest.UsageError(
            f"set {' and '.join(missing)}: test/integration/python-client.test.ts starts the servers and runs these tests"
        )


def backend_addresses() -> dict[str, str]:
    """A server per compute backend, from NORMSERVE_BACKENDS ("native=host:port,webasm=host:port");
    without it, the single server, whose backend is native."""
    listed = os.environ.get("NORMSERVE_BACKENDS", "")
    pairs = [entry.split("=", 1) for entry in listed.split(",") if entry]
    return {name: address for name, address in pairs} or {"native": os.environ["NORMSERVE_ADDRESS"]}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests that take `backend_client` run once per backend's server."""
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", list(backend_addresses()))


@pytest.fixture
def backend_client(backend: str) -> Iterator[normserve.Client]:
    with normserve.Client(backend_addresses()[backend]) as c:
        yield c


@pytest.fixture(scope="session")
def address() -> str:
    """A single server, whose messages are limited to 32 MiB (--max-message-bytes 33554432)."""
    return os.environ["NORMSERVE_ADDRESS"]


@pytest.fixture(scope="session")
def replicas() -> list[str]:
    """Two replicas that share their modules through etcd, each owning about half of the slots."""
    return os.environ["NORMSERVE_REPLICAS"].split(",")


@pytest.fixture
def client(address: str) -> Iterator[normserve.Client]:
    with normserve.Client(address) as c:
        yield c


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """Module names no other test, or earlier run against the same server, uses."""
    test = re.sub(r"[^A-Za-z0-9_.:/-]", "-", request.node.name)
    return f"pytest/{uuid.uuid4().hex[:8]}/{test}/"
