"""The Client's transport: streaming, routing among replicas, retries, deadlines, tokens."""
from __future__ import annotations

import time
from concurrent import futures
from typing import Iterator

import grpc
import pytest
import torch
from torch import nn

import normserve
from normserve.v1 import batch_norm_pb2 as bn
from normserve.v1 import batch_norm_pb2_grpc

from conftest import assert_close


def test_streamed_calls_equal_unary_calls(address: str, prefix: str) -> None:
    """Every tensor call through its *Stream method, in 1000-byte chunks, against the same call
    in one message."""
    torch.manual_seed(4)
    x, dy = torch.randn(4, 3, 7, 9), torch.randn(4, 3, 7, 9)
    results = []
    for mode, stream_above_bytes in (("unary", 1 << 40), ("stream", 0)):
        with normserve.Client(address, stream_above_bytes=stream_above_bytes, chunk_bytes=1000) as client:
            plain, group = f"{prefix}{mode}/bn", f"{prefix}{mode}/sync"
            client.create_module(plain, "BATCH_NORM_2D", 3)
            client.create_module(group, "SYNC_BATCH_NORM", 3, world_size=1)
            f = client.forward(plain, x, save_for_backward=True)
            g = client.backward(plain, f.context_id, dy)
            sf = client.sync_forward(group, x, step=0, rank=0, world_size=1, save_for_backward=True)
            sg = client.sync_backward(group, sf.context_id, dy, step=0, rank=0, world_size=1)
            results.append([f.output, g.grad_input, g.grad_weight, g.grad_bias, sf.output, sg.grad_input, sg.grad_weight_total, sf.mean])
    for unary, streamed in zip(*results):
        assert torch.equal(unary, streamed)
    assert_close(results[0][0], nn.BatchNorm2d(3)(x).detach(), "output")


def test_tensors_over_32_mib_stream_by_default(address: str, prefix: str) -> None:
    """36 MB is past this server's 32 MiB message limit: over the wire only the streamed form gets
    through (and shared memory, which carries no tensor in messages, takes it in one call)."""
    name = prefix + "bn"
    x, dy = torch.randn(9, 4, 500, 500), torch.randn(9, 4, 500, 500)
    with normserve.Client(address, stream_above_bytes=1 << 40, shared_memory=False) as unary:
        unary.create_module(name, "BATCH_NORM_2D", 4)
        with pytest.raises(normserve.RemoteError) as info:
            unary.forward(name, x)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with normserve.Client(address, shared_memory=False) as client:
        r = client.forward(name, x, save_for_backward=True)
        g = client.backward(name, r.context_id, dy)
    with normserve.Client(address) as shm:
        shm.create_module(name + "-shm", "BATCH_NORM_2D", 4)
        rs = shm.forward(name + "-shm", x, save_for_backward=True)
        gs = shm.backward(name + "-shm", rs.context_id, dy)
        assert shm.shared_memory_directory() is not None
    assert torch.equal(rs.output, r.output) and torch.equal(gs.grad_input, g.grad_input)
    local = nn.BatchNorm2d(4)
    xs = x.clone().requires_grad_()
    y = local(xs)
    (y * dy).sum().backward()
    assert_close(r.output, y.detach(), "output")
    assert_close(g.grad_input, xs.grad, "grad_input")


def test_a_client_that_knows_one_replica_follows_not_owner_to_each_owner(replicas: list[str], prefix: str) -> None:
    names = [f"{prefix}m{i}" for i in range(24)]
    with normserve.Client(replicas[0]) as client:
        for name in names:
            assert client.address_for(name) == replicas[0]
            remote = normserve.RemoteBatchNorm1d(2, client=client, name=name)
            remote(torch.randn(3, 2))
        owners = {name: client.address_for(name) for name in names}
    # With 24 names, both replicas own some (each owns about half of the slots).
    assert set(owners.values()) == set(replicas)
    for name, owner in owners.items():
        with normserve.Client(owner, follow_owner=False) as at_owner:
            assert at_owner.get_module(name).num_batches_tracked == 1
        other = next(r for r in replicas if r != owner)
        with normserve.Client(other, follow_owner=False) as elsewhere:
            with pytest.raises(normserve.RemoteError) as refused:
                elsewhere.get_module(name)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.reason == "BN_ERR_NOT_OWNER"
        assert refused.value.info["owner"] == owner
        assert "send its calls there" in str(refused.value)


class FlakyModules(batch_norm_pb2_grpc.BatchNormServiceServicer):
    """GetModule answers UNAVAILABLE `failures` times, then succeeds; GetState fails with a
    PyTorch error carried only in the plain trailers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.metadata: list[tuple[tuple[str, str], ...]] = []

    def GetModule(self, request: bn.GetModuleRequest, context: grpc.ServicerContext) -> bn.Module:
        self.calls += 1
        self.metadata.append(tuple(context.invocation_metadata()))
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        return bn.Module(name=request.name)

    def Forward(self, request: bn.ForwardRequest, context: grpc.ServicerContext) -> None:
        # A bare UNAVAILABLE, as a broken connection gives: the server may have run the call.
        self.calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")

    def GetState(self, request: bn.GetStateRequest, context: grpc.ServicerContext) -> None:
        self.calls += 1
        context.set_trailing_metadata((("normserve-error-reason", "BN_ERR_INPUT_RANK"), ("normserve-python-type", "ValueError")))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected 4D input (got 3D input)")


@pytest.fixture
def flaky() -> Iterator[tuple[str, FlakyModules]]:
    servicer = FlakyModules(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    batch_norm_pb2_grpc.add_BatchNormServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_unavailable_is_retried_with_backoff(flaky: tuple[str, FlakyModules]) -> None:
    address, servicer = flaky
    with normserve.Client(address, token="secret") as client:
        start = time.monotonic()
        assert client.get_module("m").name == "m"
        # Two waits before the third try: 0.05 s and 0.1 s, each jittered down to half at most.
        assert time.monotonic() - start >= 0.075
    assert servicer.calls == 3
    assert all(("authorization", "Bearer secret") in m for m in servicer.metadata)


def test_retries_are_bounded(flaky: tuple[str, FlakyModules]) -> None:
    address, servicer = flaky
    with normserve.Client(address, retries=1) as client:
        with pytest.raises(normserve.RemoteError) as info:
            client.get_module("m")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 2


def test_a_training_forward_is_not_repeated_after_a_bare_unavailable(flaky: tuple[str, FlakyModules]) -> None:
    address, servicer = flaky
    with normserve.Client(address) as client:
        with pytest.raises(normserve.RemoteError) as info:
            client.forward("m", torch.ones(2, 2), save_for_backward=True)
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.UNAVAILABLE, None)
    assert servicer.calls == 1


def test_other_errors_are_not_retried_and_plain_trailers_suffice(flaky: tuple[str, FlakyModules]) -> None:
    address, servicer = flaky
    with normserve.Client(address) as client:
        with pytest.raises(ValueError, match=r"^expected 4D input \(got 3D input\)$") as info:
            client.get_state("m")
    assert isinstance(info.value, normserve.RemoteValueError)
    assert (info.value.reason, info.value.python_type) == ("BN_ERR_INPUT_RANK", "ValueError")
    assert servicer.calls == 1


def test_deadline_ends_a_call(address: str, prefix: str) -> None:
    """Rank 1 of the group never comes: the deadline ends rank 0's wait, and is not retried."""
    name = prefix + "group"
    with normserve.Client(address, deadline=0.5) as client:
        client.create_module(name, "SYNC_BATCH_NORM", 2, world_size=2)
        start = time.monotonic()
        with pytest.raises(normserve.RemoteError) as info:
            client.sync_forward(name, torch.randn(2, 2), step=0, rank=0, world_size=2)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.4 < time.monotonic() - start < 2.0
