"""Tensors through mmap'ed regions with a server on this host (its --shm-dir), and the way back to
the wire when regions cannot be had."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

import normserve
from normserve import _shm
from normserve.v1 import batch_norm_pb2 as bn


def _regions(client: normserve.Client) -> list[str]:
    stub = client._endpoint(client._address).modules
    return [r.name for r in stub.ListRegions(bn.ListRegionsRequest()).regions]


def test_a_client_on_this_host_moves_tensors_through_shared_memory(address: str, prefix: str) -> None:
    wire = normserve.Client(address, shared_memory=False)
    shm = normserve.Client(address)
    try:
        name = prefix + "bn"
        wire.create_module(name, "BATCH_NORM_2D", 32)
        torch.manual_seed(0)
        x = torch.randn(8, 32, 16, 16)
        dy = torch.randn_like(x)
        # Training: two modules of one configuration, one per transport, must agree bit for bit.
        shm.create_module(name + "-shm", "BATCH_NORM_2D", 32)
        a = wire.forward(name, x, save_for_backward=True)
        b = shm.forward(name + "-shm", x, save_for_backward=True)
        assert shm.shared_memory_directory() is not None
        assert torch.equal(a.output, b.output)
        ga, gb = wire.backward(name, a.context_id, dy), shm.backward(name + "-shm", b.context_id, dy)
        assert torch.equal(ga.grad_input, gb.grad_input) and torch.equal(ga.grad_weight, gb.grad_weight)
        assert wire.get_state(name)["running_var"].tolist() == wire.get_state(name + "-shm")["running_var"].tolist()
        # The output is the caller's own: the next call through the same region leaves it alone.
        kept = b.output.clone()
        shm.forward(name + "-shm", x * 3)
        assert torch.equal(b.output, kept)
        # Its regions are registered with the server and are files in the server's directory.
        directory = shm.shared_memory_directory()
        mine = [r for r in _regions(shm) if r.startswith(f"py-{os.getpid()}-")]
        assert mine
        files = [f for f in os.listdir(directory) if f.startswith(f"normserve-py-{os.getpid()}-")]
        assert len(files) >= len(mine)
        # Tensors at or under the threshold stay in messages: nothing new is registered.
        shm.forward(name + "-shm", torch.randn(2, 32, 2, 2))
        assert len([r for r in _regions(shm) if r.startswith(f"py-{os.getpid()}-")]) == len(mine)
    finally:
        wire.close()
        shm.close()
    assert not [r for r in _regions(wire) if r in mine]
    assert not [f for f in os.listdir(directory) if f in files]


def test_a_server_without_shared_memory_is_served_over_the_wire(replicas: list[str], prefix: str) -> None:
    with normserve.Client(replicas[0]) as client:
        client.create_module(prefix + "bn", "BATCH_NORM_1D", 256)
        x = torch.randn(128, 256)
        out = client.forward(prefix + "bn", x).output
        assert client.shared_memory_directory(client.address_for(prefix + "bn")) is None
        assert torch.allclose(out.mean(0), torch.zeros(256), atol=1e-5)


def test_a_directory_the_server_cannot_see_falls_back_to_the_wire(address: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a client in another container would: its files are not under the server's directory, so
    RegisterRegion is refused; the call goes over the wire and gives the same answer."""
    elsewhere = tempfile.mkdtemp(prefix="normserve-not-shared-")
    monkeypatch.setattr(_shm, "usable_directory", lambda directory: elsewhere)
    with normserve.Client(address) as client, normserve.Client(address, shared_memory=False) as wire:
        client.create_module(prefix + "bn", "BATCH_NORM_2D", 16)
        client.eval(prefix + "bn")
        x = torch.randn(4, 16, 32, 32)
        assert torch.equal(client.forward(prefix + "bn", x).output, wire.forward(prefix + "bn", x).output)
        assert client.shared_memory_directory() is None
    assert os.listdir(elsewhere) == []
    os.rmdir(elsewhere)
