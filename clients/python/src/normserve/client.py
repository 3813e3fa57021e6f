"""normserve.Client: a typed wrapper over the gRPC stubs, with torch tensors in and out.

It behaves as the TypeScript client (src/client/client.ts): tensors travel as raw little-endian
bytes with an int64 shape, above 32 MiB through the `*Stream` methods in 1 MiB chunks, or, with a
server on this host that offers shared memory, through `mmap`ed regions (_shm.py); calls on a
module go to the replica that owns it, as replicas name it (docs/scale-out.md); failures raise
RemoteError.
"""
from __future__ import annotations

import enum
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence, TypeVar, Union

import grpc
import torch
from google.protobuf.message import Message

from normserve import _shm, _tensors
from normserve.errors import RemoteError, from_rpc_error
from normserve.v1 import batch_norm_pb2 as bn
from normserve.v1 import batch_norm_pb2_grpc, sync_batch_norm_pb2 as sbn, sync_batch_norm_pb2_grpc

# PyTorch's state_dict keys of a BatchNorm, in its order.
STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_TENSOR_KEYS = STATE_KEYS[:4]

STREAM_ABOVE_BYTES = 32 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
# Float32 tensors above this go through shared memory where the server offers it.
SHARED_MEMORY_ABOVE_BYTES = 64 * 1024
# Owners learnt from BN_ERR_NOT_OWNER answers are kept for this many names.
_LEARNT_OWNERS_LIMIT = 65_536
# BN_ERR_NOT_OWNER answers followed by one call (a module can move while the call is on its way).
_MAX_HOPS = 4
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 2.0

# The request type of each tensor call's streamed form.
_STREAM_REQUESTS: dict[str, Callable[..., Message]] = {
    "Forward": bn.ForwardStreamRequest,
    "Backward": bn.BackwardStreamRequest,
    "SyncForward": sbn.SyncForwardStreamRequest,
    "SyncBackward": sbn.SyncBackwardStreamRequest,
}

T = TypeVar("T")
Service = Literal["modules", "sync"]
#: A ModuleKind, by name ("BATCH_NORM_2D") or value (a string keeps it a forward reference:
#: protobuf's enum wrappers are not types at run time).
Kind = Union[str, "bn.ModuleKind"]
#: A SyncRule, by name ("SYNC_WHEN_TRAINING") or value.
Rule = Union[str, "bn.SyncRule"]


class _Unchanged(enum.Enum):
    UNCHANGED = enum.auto()


#: update_module's default for momentum, where None means PyTorch's momentum=None.
UNCHANGED = _Unchanged.UNCHANGED


@dataclass(frozen=True)
class ForwardResult:
    output: torch.Tensor
    #: Names what the server saved for Backward; empty without save_for_backward.
    context_id: str


@dataclass(frozen=True)
class Gradients:
    grad_input: torch.Tensor
    #: None when the module is not affine.
    grad_weight: Optional[torch.Tensor]
    grad_bias: Optional[torch.Tensor]


@dataclass(frozen=True)
class SyncForwardResult(ForwardResult):
    """The shard's output and the statistics that normalised it (the group's when `synced`)."""

    count: int
    mean: torch.Tensor
    invstd: torch.Tensor
    synced: bool


@dataclass(frozen=True)
class SyncGradients(Gradients):
    """This rank's partial parameter gradients (PyTorch's convention) and the group's totals."""

    grad_weight_total: Optional[torch.Tensor]
    grad_bias_total: Optional[torch.Tensor]


@dataclass(frozen=True)
class GroupStats:
    """What GatherStats answers: count, mean, biased variance and invstd (float64), the group's
    when `synced`, else those the module normalises with on its own (its running statistics, or
    the rank's batch)."""

    count: int
    mean: torch.Tensor
    var: torch.Tensor
    invstd: torch.Tensor
    synced: bool


@dataclass(frozen=True)
class ReducedGrads:
    """What ReduceGrads answers: the group's Σ dy and Σ dy·(x − mean), and its count."""

    sum_dy: torch.Tensor
    sum_dy_xmu: torch.Tensor
    count: int


@dataclass(frozen=True)
class LoadResult:
    module: bn.Module
    #: What load_state_dict(strict=False) returns.
    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclass(frozen=True)
class _Endpoint:
    """The stubs of one replica, sharing one channel."""

    address: str
    channel: grpc.Channel
    modules: Any
    sync: Any


class Client:
    """A connection to a normserve server, or to any replica of a cluster on etcd.

    `address` may be one server, any replica, or a Service in front of them: a replica that does not
    own a module answers BN_ERR_NOT_OWNER with the owner's address, and the client repeats the call
    there (the refused call changed nothing) and remembers the owner; when a remembered owner fails
    at the transport (it died, and its modules are moving to the others), the client forgets it and
    goes back to `address` (`follow_owner=False` turns this off: BN_ERR_NOT_OWNER is raised). `token` is sent as `authorization: Bearer <token>`; `credentials`
    (grpc.ssl_channel_credentials) turn on TLS; `deadline` bounds each call, retries included, in
    seconds. UNAVAILABLE is the one status retried, up to `retries` times (default 7: 8 attempts,
    backoff from 50 ms doubling to 2 s, with jitter, about 7 s in all, long enough for a survivor to
    take over a dead replica's modules) by the TypeScript client's rule: always when the server
    refused the call unchanged (it names a reason, such as BN_ERR_SHUTTING_DOWN or
    BN_ERR_SLOT_MOVING), and after a bare transport failure, when the server may have acted, only
    for calls that are safe to repeat (reads, assignments, and the sync calls, whose steps the server
    deduplicates; never a training Forward, which would count a batch twice). Tensors over
    `stream_above_bytes` are streamed in `chunk_bytes` chunks. With `shared_memory` (the default),
    float32 tensors over `shared_memory_above_bytes` go to a server on a loopback address through
    `mmap`ed files in the directory its ListRegions names (its --shm-dir), when this process can
    create files there; otherwise, or when the server refuses regions, over the wire.
    """

    def __init__(
        self,
        address: str,
        token: Optional[str] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        deadline: Optional[float] = None,
        *,
        retries: int = 7,
        follow_owner: bool = True,
        stream_above_bytes: int = STREAM_ABOVE_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
        shared_memory: bool = True,
        shared_memory_above_bytes: int = SHARED_MEMORY_ABOVE_BYTES,
    ) -> None:
        self._address = address
        self._token = token
        self._credentials = credentials
        self._deadline = deadline
        self._retries = retries
        self._follow_owner = follow_owner
        self._stream_above_bytes = stream_above_bytes
        self._chunk_bytes = chunk_bytes
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        self._endpoints: dict[str, _Endpoint] = {}
        self._owners: dict[str, str] = {}
        self._shared_memory = shared_memory
        self._shared_memory_above_bytes = shared_memory_above_bytes
        # Per replica: its region pool, or None where shared memory is off, refused or out of sight.
        self._pools: dict[str, Optional[_shm.RegionPool]] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (torch.save, copy.deepcopy, multiprocessing) as its settings: the copy opens
        its own connections to the same address. TLS credentials cannot be pickled."""
        if self._credentials is not None:
            raise TypeError(
                "a normserve.Client with TLS credentials cannot be pickled (grpc credentials cannot): "
                "save the model after normserve.convert_local_batchnorm(model), or its state_dict()"
            )
        settings = {
            "address": self._address, "token": self._token, "deadline": self._deadline, "retries": self._retries,
            "follow_owner": self._follow_owner, "stream_above_bytes": self._stream_above_bytes, "chunk_bytes": self._chunk_bytes,
            "shared_memory": self._shared_memory, "shared_memory_above_bytes": self._shared_memory_above_bytes,
        }
        return (_client_from_settings, (settings,))

    def shared_memory_directory(self, address: Optional[str] = None) -> Optional[str]:
        """The directory whose files carry this client's tensors to the replica at `address` (by
        default the client's own), or None while they travel over the wire."""
        pool = self._pools.get(self._address if address is None else address)
        return None if pool is None else pool.directory

    def close(self) -> None:
        for pool in self._pools.values():
            if pool is not None:
                pool.close()
        self._pools.clear()
        for endpoint in self._endpoints.values():
            endpoint.channel.close()
        self._endpoints.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def address_for(self, name: str) -> str:
        """The address calls on module `name` go to: the owner a replica named for it, or the
        client's own address."""
        return self._owners.get(name, self._address)

    # Modules.

    def create_module(
        self,
        name: str,
        kind: Kind,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        world_size: int = 0,
        sync_rule: Optional[Rule] = None,
    ) -> bn.Module:
        """PyTorch's constructor; momentum=None is the cumulative average. `world_size` and
        `sync_rule` ("SYNC_WHEN_BATCH_STATS", "SYNC_WHEN_TRAINING") are for SYNC_BATCH_NORM."""
        config = bn.ModuleConfig(
            kind=kind,
            num_features=num_features,
            eps=eps,
            momentum=momentum,
            cumulative_average=momentum is None,
            affine=affine,
            track_running_stats=track_running_stats,
            world_size=world_size,
            sync_rule=sync_rule,
        )
        return self._call("modules", "CreateModule", bn.CreateModuleRequest(name=name, config=config))

    def get_module(self, name: str) -> bn.Module:
        return self._call("modules", "GetModule", bn.GetModuleRequest(name=name))

    def list_modules(self, page_size: int = 0) -> Iterator[bn.Module]:
        """The modules of the replica at the client's address, in name order, page by page."""
        token = ""
        while True:
            page = self._call("modules", "ListModules", bn.ListModulesRequest(page_size=page_size, page_token=token), routed=False)
            yield from page.modules
            token = page.next_page_token
            if not token:
                return

    def delete_module(self, name: str) -> None:
        self._call("modules", "DeleteModule", bn.DeleteModuleRequest(name=name))

    def update_module(
        self,
        name: str,
        *,
        training: Optional[bool] = None,
        track_running_stats: Optional[bool] = None,
        momentum: Union[float, None, _Unchanged] = UNCHANGED,
        eps: Optional[float] = None,
        clear_buffers: Sequence[str] = (),
    ) -> bn.Module:
        """Assigns what is given (momentum=None is PyTorch's momentum=None), then sets the named
        buffers ("running_mean", "running_var", "num_batches_tracked") to None."""
        request = bn.UpdateModuleRequest(name=name, eps=eps, clear_buffers=[b.upper() for b in clear_buffers])
        if training is not None:
            request.training = training
        if track_running_stats is not None:
            request.track_running_stats = track_running_stats
        if momentum is None:
            request.cumulative_average = True
        elif not isinstance(momentum, _Unchanged):
            request.momentum = momentum
        return self._call("modules", "UpdateModule", request)

    def train(self, name: str, mode: bool = True) -> bn.Module:
        return self.update_module(name, training=mode)

    def eval(self, name: str) -> bn.Module:
        return self.update_module(name, training=False)

    def reset_running_stats(self, name: str) -> bn.Module:
        """module.reset_running_stats(): running_mean 0, running_var 1, the counter 0."""
        return self._call("modules", "ResetRunningStats", bn.ResetRunningStatsRequest(name=name))

    def reset_parameters(self, name: str) -> bn.Module:
        """module.reset_parameters(): reset_running_stats(), then weight 1 and bias 0."""
        return self._call("modules", "ResetParameters", bn.ResetParametersRequest(name=name))

    def get_state(self, name: str) -> dict[str, torch.Tensor]:
        """module.state_dict(): PyTorch's keys in its order; absent keys are buffers that are None."""
        state = self._call("modules", "GetState", bn.GetStateRequest(name=name))
        out = {key: _tensors.decode(getattr(state, key)) for key in _TENSOR_KEYS if state.HasField(key)}
        if state.HasField("num_batches_tracked"):
            out["num_batches_tracked"] = torch.tensor(state.num_batches_tracked, dtype=torch.long)
        return out

    def load_state(
        self,
        name: str,
        state: Mapping[str, Union[torch.Tensor, int]],
        *,
        strict: bool = True,
        version: Optional[int] = 2,
    ) -> LoadResult:
        """module.load_state_dict(state, strict), all or nothing. `version` is the state_dict's
        metadata version (None: a dict without metadata, which gets num_batches_tracked = 0)."""
        message = bn.ModuleState(version=0 if version is None else version)
        for key, value in state.items():
            if key == "num_batches_tracked":
                message.num_batches_tracked = int(value)
            elif key in _TENSOR_KEYS:
                getattr(message, key).CopyFrom(_tensors.encode(torch.as_tensor(value)))
            else:
                raise KeyError(f"a BatchNorm's state has the keys {', '.join(STATE_KEYS)}; got {key!r}")
        r = self._call("modules", "LoadState", bn.LoadStateRequest(name=name, state=message, strict=strict))
        return LoadResult(r.module, list(r.missing_keys), list(r.unexpected_keys))

    # Tensors.

    def forward(
        self,
        name: str,
        input: torch.Tensor,
        *,
        save_for_backward: bool = False,
        weight: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
    ) -> ForwardResult:
        """module(input) in the module's current mode. `weight` and `bias` (both or neither, for an
        affine module) are loaded first, in one change with the forward: a LoadState saved."""
        request = bn.ForwardRequest(name=name, save_for_backward=save_for_backward)
        if weight is not None or bias is not None:
            if weight is None or bias is None:
                raise ValueError("forward takes weight and bias together")
            request.weight.CopyFrom(_tensors.encode(weight))
            request.bias.CopyFrom(_tensors.encode(bias))
        r, output = self._tensor_call("modules", "Forward", request, "input", input, "output")
        return ForwardResult(output, r.context_id)

    def backward(self, name: str, context_id: str, grad_output: torch.Tensor, *, retain_context: bool = False) -> Gradients:
        """The gradients of a forward saved for backward; the context is released unless retained."""
        request = bn.BackwardRequest(name=name, context_id=context_id, retain_context=retain_context)
        r, grad_input = self._tensor_call("modules", "Backward", request, "grad_output", grad_output, "grad_input")
        return Gradients(grad_input, _optional(r, "grad_weight"), _optional(r, "grad_bias"))

    def sync_forward(
        self, name: str, input: torch.Tensor, *, step: int, rank: int, world_size: int, save_for_backward: bool = False
    ) -> SyncForwardResult:
        """This rank's shard of `step`, normalised with the group's statistics."""
        request = sbn.SyncForwardRequest(name=name, step=step, rank=rank, world_size=world_size, save_for_backward=save_for_backward)
        r, output = self._tensor_call("sync", "SyncForward", request, "input", input, "output")
        return SyncForwardResult(output, r.context_id, r.count, _float64(r.mean), _float64(r.invstd), r.synced)

    def sync_backward(
        self,
        name: str,
        context_id: str,
        grad_output: torch.Tensor,
        *,
        step: int,
        rank: int,
        world_size: int,
        retain_context: bool = False,
    ) -> SyncGradients:
        """The input gradient from the group's reduced sums; partial and total parameter gradients."""
        request = sbn.SyncBackwardRequest(
            name=name, step=step, rank=rank, world_size=world_size, context_id=context_id, retain_context=retain_context
        )
        r, grad_input = self._tensor_call("sync", "SyncBackward", request, "grad_output", grad_output, "grad_input")
        return SyncGradients(
            grad_input,
            _optional(r, "grad_weight"),
            _optional(r, "grad_bias"),
            _optional(r, "grad_weight_total"),
            _optional(r, "grad_bias_total"),
        )

    def gather_stats(
        self, name: str, *, step: int, rank: int, world_size: int, count: int, mean: torch.Tensor, var: torch.Tensor
    ) -> GroupStats:
        """Statistics-only SyncBatchNorm: this rank's per-channel count, mean and biased variance
        in, the statistics to normalise with out (the group's when `synced`)."""
        request = sbn.GatherStatsRequest(
            name=name, step=step, rank=rank, world_size=world_size, count=count, mean=mean.tolist(), var=var.tolist()
        )
        r = self._call("sync", "GatherStats", request)
        return GroupStats(r.count, _float64(r.mean), _float64(r.var), _float64(r.invstd), r.synced)

    def reduce_grads(
        self, name: str, *, step: int, rank: int, world_size: int, sum_dy: torch.Tensor, sum_dy_xmu: torch.Tensor
    ) -> ReducedGrads:
        """Statistics-only backward: this rank's Σ dy and Σ dy·(x − mean) in, the group's out."""
        request = sbn.ReduceGradsRequest(
            name=name, step=step, rank=rank, world_size=world_size, sum_dy=sum_dy.tolist(), sum_dy_xmu=sum_dy_xmu.tolist()
        )
        r = self._call("sync", "ReduceGrads", request)
        return ReducedGrads(_float64(r.sum_dy), _float64(r.sum_dy_xmu), r.count)

    # Transport.

    def _call(self, service: Service, method: str, request: Any, *, routed: bool = True) -> Any:
        def attempt(endpoint: _Endpoint, timeout: Optional[float]) -> Any:
            return getattr(getattr(endpoint, service), method)(request, timeout=timeout, metadata=self._metadata)

        return self._routed(method, request.name if routed else None, attempt)

    def _tensor_call(
        self, service: Service, method: str, request: Any, in_field: str, tensor: torch.Tensor, out_field: str
    ) -> tuple[Any, torch.Tensor]:
        """A call with one tensor in and one out: through a shared-memory region where one can be
        had (see the class), else in one message, or above stream_above_bytes as `<method>Stream`
        (a head whose tensor has no data, then its bytes; the answer likewise)."""
        getattr(request, in_field).CopyFrom(_tensors.tensor_head(tensor))
        nbytes = tensor.numel() * tensor.element_size()
        data: Optional[bytes] = None

        def over_the_wire(endpoint: _Endpoint, timeout: Optional[float]) -> tuple[Any, torch.Tensor]:
            nonlocal data
            if data is None:
                data = _tensors.tensor_bytes(tensor)
            if len(data) > self._stream_above_bytes:
                return self._stream(getattr(endpoint, service), method, request, data, out_field, timeout)
            # The request itself: a region attempt, which goes first, works on a copy of it.
            getattr(request, in_field).data = data
            response = getattr(getattr(endpoint, service), method)(request, timeout=timeout, metadata=self._metadata)
            return response, _tensors.decode(getattr(response, out_field))

        regions = (
            self._shared_memory
            and tensor.dtype == torch.float32
            and nbytes > self._shared_memory_above_bytes
            and f"{in_field}_region" in request.DESCRIPTOR.fields_by_name
        )
        if not regions:
            return self._routed(method, request.name, over_the_wire)

        def attempt(endpoint: _Endpoint, timeout: Optional[float]) -> tuple[Any, torch.Tensor]:
            pool = self._pool(endpoint)
            answer = None if pool is None else self._through_region(pool, endpoint, service, method, request, in_field, tensor, nbytes, out_field, timeout)
            return over_the_wire(endpoint, timeout) if answer is None else answer

        return self._routed(method, request.name, attempt)

    def _through_region(
        self,
        pool: _shm.RegionPool,
        endpoint: _Endpoint,
        service: Service,
        method: str,
        request: Any,
        in_field: str,
        tensor: torch.Tensor,
        nbytes: int,
        out_field: str,
        timeout: Optional[float],
    ) -> Optional[tuple[Any, torch.Tensor]]:
        """The call with its input and its answer in a leased region; None when the server will
        not take regions (then shared memory is off for it, and the call goes over the wire)."""
        try:
            region = pool.lease(2 * nbytes)
        except (grpc.RpcError, OSError):
            self._stop_shared_memory(endpoint.address)
            return None
        try:
            region.write(0, _tensors.wire_array(tensor))
            message = type(request)()
            message.CopyFrom(request)
            # An earlier attempt over the wire (at another replica) may have put the bytes in.
            getattr(message, in_field).ClearField("data")
            getattr(message, f"{in_field}_region").CopyFrom(bn.RegionRef(region=region.name, offset=0))
            getattr(message, f"{out_field}_region").CopyFrom(bn.RegionRef(region=region.name, offset=nbytes))
            try:
                response = getattr(getattr(endpoint, service), method)(message, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                # Refused before any work (the server checks both places first): the wire will do.
                reason = from_rpc_error(rpc_error).reason or ""
                if reason.startswith("BN_ERR_REGION") or reason == "BN_ERR_SHM_DISABLED":
                    self._stop_shared_memory(endpoint.address)
                    return None
                raise
            out = getattr(response, out_field)
            shape = tuple(out.shape)
            return response, torch.from_numpy(region.read_float32(nbytes, math.prod(shape)).reshape(shape))
        finally:
            pool.give_back(region)

    def _pool(self, endpoint: _Endpoint) -> Optional[_shm.RegionPool]:
        """The replica's region pool, found out once: a loopback replica whose ListRegions names a
        directory this process can write to."""
        if endpoint.address in self._pools:
            return self._pools[endpoint.address]
        if not _shm.is_loopback(endpoint.address):
            self._pools[endpoint.address] = None
            return None
        try:
            listed = endpoint.modules.ListRegions(bn.ListRegionsRequest(), timeout=self._deadline, metadata=self._metadata)
        except grpc.RpcError as rpc_error:
            # Not reachable now: ask again on the next call. Any other answer (an older server,
            # no permission) is final.
            if rpc_error.code() != grpc.StatusCode.UNAVAILABLE:
                self._pools[endpoint.address] = None
            return None
        directory = _shm.usable_directory(listed.shm_dir)
        pool = None
        if directory is not None:
            modules, metadata = endpoint.modules, self._metadata
            pool = _shm.RegionPool(
                directory,
                register=lambda name, path, size: modules.RegisterRegion(
                    bn.RegisterRegionRequest(name=name, path=path, offset=0, byte_size=size), timeout=self._deadline, metadata=metadata
                ),
                unregister=lambda name: modules.UnregisterRegion(bn.UnregisterRegionRequest(name=name), timeout=5, metadata=metadata),
            )
        self._pools[endpoint.address] = pool
        return pool

    def _stop_shared_memory(self, address: str) -> None:
        pool = self._pools.get(address)
        self._pools[address] = None
        if pool is not None:
            pool.close()

    def _stream(
        self, stub: Any, method: str, request: Message, data: bytes, out_field: str, timeout: Optional[float]
    ) -> tuple[Any, torch.Tensor]:
        part = _STREAM_REQUESTS[method]

        def parts() -> Iterator[Message]:
            yield part(head=request)
            for at in range(0, len(data), self._chunk_bytes):
                yield part(chunk=data[at : at + self._chunk_bytes])

        head: Any = None
        received = bytearray()
        for response in getattr(stub, f"{method}Stream")(parts(), timeout=timeout, metadata=self._metadata):
            if response.WhichOneof("part") == "head":
                head = response.head
            else:
                received += response.chunk
        if head is None:
            raise RuntimeError(f"normserve client: {method}Stream ended without its head")
        out = getattr(head, out_field)
        return head, _tensors.from_bytes(out.shape, received, out.dtype)

    def _routed(self, method: str, name: Optional[str], attempt: Callable[[_Endpoint, Optional[float]], T]) -> T:
        """Runs `attempt` at the replica that owns `name`, as far as the client knows. A
        BN_ERR_NOT_OWNER answer sends it on to the owner named (up to _MAX_HOPS in a row); a
        transport failure of a remembered owner forgets it; UNAVAILABLE is retried with jittered
        exponential backoff when the server refused the call unchanged (a reason) or the call is
        safe to repeat. One deadline covers it all."""
        deadline_at = None if self._deadline is None else time.monotonic() + self._deadline
        address = self._address if name is None else self.address_for(name)
        hops = 0
        tries = 1
        while True:
            timeout = None if deadline_at is None else max(deadline_at - time.monotonic(), 0.0)
            try:
                return attempt(self._endpoint(address), timeout)
            except grpc.RpcError as rpc_error:
                err = from_rpc_error(rpc_error)
            owner = err.info.get("owner") if err.reason == "BN_ERR_NOT_OWNER" else None
            if self._follow_owner and name is not None and owner and owner != address and hops < _MAX_HOPS:
                hops += 1
                if len(self._owners) >= _LEARNT_OWNERS_LIMIT:
                    self._owners.clear()
                self._owners[name] = owner
                address = owner
                continue
            if name is not None and err.code == grpc.StatusCode.UNAVAILABLE and err.reason is None and self._owners.get(name) == address:
                del self._owners[name]
                address = self._address
            delay = min(_FIRST_BACKOFF_S * 2 ** (tries - 1), _MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
            out_of_time = deadline_at is not None and time.monotonic() + delay >= deadline_at
            retryable = err.code == grpc.StatusCode.UNAVAILABLE and (err.reason is not None or method in _SAFE_TO_REPEAT)
            if not retryable or tries > self._retries or out_of_time:
                # Raised outside the except block, so that the traceback shows only this error.
                raise err
            tries += 1
            hops = 0
            time.sleep(delay)

    def _endpoint(self, address: str) -> _Endpoint:
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            # Unary tensors go up to the 32 MiB streaming threshold, past gRPC's 4 MiB default.
            options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
            if self._credentials is None:
                channel = grpc.insecure_channel(address, options)
            else:
                channel = grpc.secure_channel(address, self._credentials, options)
            endpoint = _Endpoint(
                address,
                channel,
                batch_norm_pb2_grpc.BatchNormServiceStub(channel),
                sync_batch_norm_pb2_grpc.SyncBatchNormServiceStub(channel),
            )
            self._endpoints[address] = endpoint
        return endpoint


# Calls that give the same result when repeated (src/client/client.ts SAFE_TO_REPEAT): a bare
# transport failure is retried only for these.
_SAFE_TO_REPEAT = frozenset(
    {
        "GetModule",
        "ListModules",
        "GetState",
        "ListRegions",
        "UpdateModule",
        "LoadState",
        "ResetRunningStats",
        "ResetParameters",
        "SyncForward",
        "SyncBackward",
        "GatherStats",
        "ReduceGrads",
    }
)


def _client_from_settings(settings: dict[str, Any]) -> Client:
    return Client(**settings)


def _float64(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64)


def _optional(message: Any, field: str) -> Optional[torch.Tensor]:
    return _tensors.decode(getattr(message, field)) if message.HasField(field) else None
