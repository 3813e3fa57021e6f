"""torch.nn BatchNorm modules whose forward and backward run on a normserve server.

The server holds the module's state (weight, bias, running statistics, counter, mode) and does
the computing. Autograd sees one node per call: Forward on the server, saving what backward
needs when autograd will ask for it, then Backward with the saved context's id.

Weight and bias are also local nn.Parameters, so that optimisers, DDP and gradient clipping see
them as with PyTorch's modules. The local values are the truth: before each forward (and before
state_dict) the module compares them bit for bit with what it last sent, and when they differ
(an optimiser step, an in-place init, a load) sends both: with the Forward itself, which loads
them in one change with the forward, so that a training step costs no call of its own for them
(RemoteSyncBatchNorm and state_dict send them with one LoadState(strict=False)). Switching
train()/eval() calls the server only when the mode changes.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from normserve.client import STATE_KEYS, Client, Gradients, Rule
from normserve.errors import RemoteError
from normserve.v1 import batch_norm_pb2 as bn


class _RemoteNormFunction(torch.autograd.Function):
    """module(input) as one autograd node. weight and bias are inputs only so that autograd
    routes their gradients; the server computes with its own copy, which forward has just
    brought up to date."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], module: RemoteNorm, save: bool
    ) -> torch.Tensor:
        dtype = input.dtype
        output, saved = module._remote_forward(as_float32(input), save)
        ctx.module, ctx.saved, ctx.dtype = module, saved, dtype  # type: ignore[attr-defined]
        return output.to(device=input.device, dtype=dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        grads: Gradients = ctx.module._remote_backward(ctx.saved, as_float32(grad_output))
        wanted = ctx.needs_input_grad
        to = grad_output.device
        return (
            _gradient(wanted[0], grads.grad_input, to, ctx.dtype),
            _gradient(wanted[1], grads.grad_weight, to),
            _gradient(wanted[2], grads.grad_bias, to),
            None,
            None,
        )


#: Input dtypes computed in float32 and answered in their own dtype, as PyTorch's BatchNorm does
#: for bfloat16 on the CPU (and under autocast) and for float16 on GPUs.
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def as_float32(t: torch.Tensor) -> torch.Tensor:
    """A bfloat16 or float16 tensor as float32, for the server; any other as it is."""
    return t.float() if t.dtype in _LOW_PRECISION else t


def _refuse_tracing() -> None:
    """torch.jit.trace and torch.onnx.export would record the server's answer as a constant."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        raise RuntimeError(
            "a remote BatchNorm cannot be traced or exported: its computing happens on the server, and the trace "
            "would keep one answer as a constant. Convert it back first: "
            "model = normserve.convert_local_batchnorm(model), then torch.onnx.export or torch.jit.trace"
        )


def _gradient(wanted: bool, grad: Optional[torch.Tensor], device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    return grad.to(device=device, dtype=dtype) if wanted and grad is not None else None


_BUFFER_KEYS = STATE_KEYS[2:]


class _ServerBuffers(dict):  # type: ignore[type-arg]
    """A remote module's `_buffers`: its running statistics and counter as the server holds them,
    so that named_buffers(), buffers() and `module.running_mean = None` behave as in PyTorch.
    Reading reads the server (one call); assigning a tensor or None sets the server's buffer.
    Membership answers without a call: the keys a BatchNorm's buffers can have."""

    def __init__(self, module: RemoteNorm) -> None:
        super().__init__()
        self._module = module

    def _state(self) -> dict[str, torch.Tensor]:
        state = self._module.client.get_state(self._module.name)
        return {key: state[key] for key in _BUFFER_KEYS if key in state}

    def __contains__(self, key: object) -> bool:
        return key in _BUFFER_KEYS

    def __getitem__(self, key: str) -> Optional[torch.Tensor]:
        if key not in _BUFFER_KEYS:
            raise KeyError(key)
        return self._state().get(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[key] if key in _BUFFER_KEYS else default

    def __setitem__(self, key: str, value: Optional[torch.Tensor]) -> None:
        module = self._module
        if value is None:
            module.client.update_module(module.name, clear_buffers=[key])
        else:
            module.client.load_state(module.name, {key: value}, strict=False)

    def items(self):  # type: ignore[no-untyped-def, override]
        return self._state().items()

    def keys(self):  # type: ignore[no-untyped-def, override]
        return self._state().keys()

    def values(self):  # type: ignore[no-untyped-def, override]
        return self._state().values()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._state())

    def __len__(self) -> int:
        return len(self._state())


def _bits(p: torch.Tensor) -> torch.Tensor:
    """A copy of a parameter's float32 bits: equal bits are equal values, NaNs and -0.0 included."""
    return p.detach().to(device="cpu", dtype=torch.float32, copy=True).view(torch.int32)


class RemoteNorm(nn.Module):
    """What the remote BatchNorms share: the server's module, local parameters kept in step with
    it, PyTorch's attributes and state_dict keys."""

    #: The state_dict metadata version of PyTorch's BatchNorm; LoadState reads it.
    _version = 2
    #: The ModuleKind's name.
    _kind: ClassVar[str]
    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: Optional[float],
        affine: bool,
        track_running_stats: bool,
        *,
        client: Client,
        name: str,
        exist_ok: bool,
        world_size: int = 0,
        sync_rule: Optional[Rule] = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.name = name
        self.num_features = num_features
        self.affine = affine
        info, created = self._create(eps, momentum, affine, track_running_stats, exist_ok, world_size, sync_rule)
        #: Whether this object created the server's module (else it joined one that existed).
        self.created = created
        self._eps: float = info.config.eps
        self._momentum: Optional[float] = None if info.config.cumulative_average else info.config.momentum
        self._track_running_stats: bool = info.track_running_stats
        self.training = info.training
        if affine:
            state = {"weight": torch.ones(num_features), "bias": torch.zeros(num_features)} if created else client.get_state(name)
            self.weight = nn.Parameter(state["weight"])
            self.bias = nn.Parameter(state["bias"])
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # The bits of weight and bias the server holds; None: unknown, send them before the next use.
        self._pushed: Optional[tuple[torch.Tensor, torch.Tensor]] = self._local_bits()
        self._buffers = _ServerBuffers(self)  # type: ignore[assignment]

    def _create(
        self, eps: float, momentum: Optional[float], affine: bool, track: bool, exist_ok: bool, world_size: int, sync_rule: Optional[Rule]
    ) -> tuple[bn.Module, bool]:
        """Creates the server's module, or with `exist_ok` joins one of the same configuration."""
        try:
            info = self.client.create_module(
                self.name, self._kind, self.num_features, eps=eps, momentum=momentum, affine=affine,
                track_running_stats=track, world_size=world_size, sync_rule=sync_rule,
            )
            return info, True
        except RemoteError as err:
            if err.reason != "BN_ERR_MODULE_EXISTS":
                raise
            if not exist_ok:
                way_out = f"{err.message}: pass exist_ok=True to join it with its state, or delete it first (client.delete_module({self.name!r}))"
                raise type(err)(err.code, err.reason, err.python_type, way_out, err.info) from None
        info = self.client.get_module(self.name)
        c = info.config
        c_momentum = None if c.cumulative_average else c.momentum
        wanted = (self._kind, self.num_features, eps, momentum, affine, track, max(world_size, 1))
        found = (bn.ModuleKind.Name(c.kind), c.num_features, c.eps, c_momentum, c.affine, c.track_running_stats, max(c.world_size, 1))
        if wanted != found:
            fields = ("kind", "num_features", "eps", "momentum", "affine", "track_running_stats", "world_size")
            diff = ", ".join(f"{f}={h!r} (asked {w!r})" for f, w, h in zip(fields, wanted, found) if w != h)
            raise ValueError(f"module '{self.name}' exists on the server with another configuration: {diff}")
        return info, False

    # PyTorch's attributes.

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.client.update_module(self.name, eps=value)
        self._eps = value

    @property
    def momentum(self) -> Optional[float]:
        return self._momentum

    @momentum.setter
    def momentum(self, value: Optional[float]) -> None:
        self.client.update_module(self.name, momentum=value)
        self._momentum = value

    @property
    def track_running_stats(self) -> bool:
        return self._track_running_stats

    @track_running_stats.setter
    def track_running_stats(self, value: bool) -> None:
        self.client.update_module(self.name, track_running_stats=value)
        self._track_running_stats = value

    @property
    def running_mean(self) -> Optional[torch.Tensor]:
        """The server's buffer (one call per read); None as in PyTorch when the module has none."""
        return self.client.get_state(self.name).get("running_mean")

    @property
    def running_var(self) -> Optional[torch.Tensor]:
        return self.client.get_state(self.name).get("running_var")

    @property
    def num_batches_tracked(self) -> Optional[torch.Tensor]:
        return self.client.get_state(self.name).get("num_batches_tracked")

    # Pickling (torch.save(model), copy.deepcopy): the module goes as its name and its client's
    # settings, and the copy uses the same module on the server.

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_buffers"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__["_buffers"] = _ServerBuffers(self)

    def reset_running_stats(self) -> None:
        """PyTorch's: running_mean 0, running_var 1, the counter 0 (on the server)."""
        self.client.reset_running_stats(self.name)

    def reset_parameters(self) -> None:
        """PyTorch's: reset_running_stats(), then weight 1 and bias 0, here and on the server."""
        self.client.reset_parameters(self.name)
        if self.weight is not None and self.bias is not None:
            with torch.no_grad():
                self.weight.fill_(1.0)
                self.bias.zero_()
        self._pushed = self._local_bits()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> RemoteNorm:
        # .to(), .half(), .cuda() and the like move the Parameters; the buffers stay on the
        # server, in float32.
        buffers, self.__dict__["_buffers"] = self.__dict__["_buffers"], {}
        try:
            return super()._apply(fn, *args, **kwargs)
        finally:
            self.__dict__["_buffers"] = buffers

    def train(self, mode: bool = True) -> RemoteNorm:
        # As with the parameters, the local flag is the truth: model.train() on a model already
        # training makes no call.
        if mode != self.training:
            self.client.train(self.name, mode)
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, name={self.name!r}"
        )

    def take_state_of(self, local: _BatchNorm) -> None:
        """Makes this module what the PyTorch BatchNorm `local` is: its weight and bias Parameters
        themselves, and on the server its mode, tracking flag, buffers set to None, buffer values
        and counter (eps and momentum were the constructor's)."""
        buffers = {key: getattr(local, key) for key in STATE_KEYS[2:]}
        cleared = [key for key, value in buffers.items() if value is None] if any(v is not None for v in buffers.values()) else []
        self.client.update_module(self.name, training=local.training, track_running_stats=local.track_running_stats, clear_buffers=cleared)
        self.client.load_state(self.name, local.state_dict())
        self.training = local.training
        self._track_running_stats = local.track_running_stats
        if self.affine:
            self.weight = local.weight
            self.bias = local.bias
        # LoadState has just sent them.
        self._pushed = self._local_bits()

    def adopt_state_of_server(self, local: _BatchNorm) -> None:
        """Resuming: the server's state wins. The PyTorch BatchNorm `local`'s weight and bias
        Parameters (kept as objects, so that an optimiser built on them goes on working) take the
        server's values; the module takes `local`'s mode."""
        state = self.client.get_state(self.name)
        if self.affine:
            with torch.no_grad():
                local.weight.copy_(state["weight"])
                local.bias.copy_(state["bias"])
            self.weight = local.weight
            self.bias = local.bias
        if local.training != self.training:
            self.client.update_module(self.name, training=local.training)
            self.training = local.training
        self._pushed = self._local_bits()

    def state_differences(self, local: _BatchNorm) -> list[str]:
        """How the server's module differs from the PyTorch BatchNorm `local`, one line each; empty
        when they hold the same values, or when the server's is untouched since it was created (so
        that a rank joining a module another rank of the same job is still converting joins it)."""
        server = self.client.get_state(self.name)
        mine = local.state_dict()
        fresh = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}
        if all(key not in server or bool((server[key] == value).all()) for key, value in fresh.items()):
            return []
        out = []
        for key in STATE_KEYS:
            there, here = server.get(key), mine.get(key)
            if there is None and here is None:
                continue
            if there is None or here is None:
                out.append(f"{key} is {'None' if there is None else 'set'} on the server and {'None' if here is None else 'set'} here")
            elif key == "num_batches_tracked":
                if int(there) != int(here):
                    out.append(f"num_batches_tracked is {int(there)} on the server and {int(here)} here")
            elif not torch.equal(there, here.detach().to(there.dtype)):
                out.append(f"{key} differs by up to {(there - here.detach()).abs().max().item():.3g}")
        return out

    # Forward and backward.

    #: Whether Forward can carry the parameters (the plain modules' Forward; not SyncForward).
    _parameters_ride_forward: ClassVar[bool] = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _refuse_tracing()
        if not self._parameters_ride_forward:
            self._push_parameters()
        params = [p for p in (self.weight, self.bias) if p is not None]
        # Grad mode is off inside Function.forward, so whether autograd will call backward is
        # decided here: only then does the server keep the input for it.
        save = torch.is_grad_enabled() and (input.requires_grad or any(p.requires_grad for p in params))
        return _RemoteNormFunction.apply(input, self.weight, self.bias, self, save)

    def _remote_forward(self, input: torch.Tensor, save: bool) -> tuple[torch.Tensor, Any]:
        """The server's forward: the output, and what _remote_backward needs to find the context."""
        local = self._local_bits()
        if local is None or self._unchanged(local):
            r = self.client.forward(self.name, input, save_for_backward=save)
            return r.output, r.context_id
        try:
            r = self.client.forward(self.name, input, save_for_backward=save, weight=local[0].view(torch.float32), bias=local[1].view(torch.float32))
        except BaseException:
            # A refused forward left the server's parameters as they were, but one whose outcome
            # is unknown (a transport failure, BN_ERR_STORE_UNKNOWN) may have loaded them: sent
            # again with the next forward either way, which costs only their bytes.
            self._pushed = None
            raise
        self._pushed = local
        return r.output, r.context_id

    def _remote_backward(self, saved: Any, grad_output: torch.Tensor) -> Gradients:
        return self.client.backward(self.name, saved, grad_output)

    def _local_bits(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if self.weight is None or self.bias is None:
            return None
        return _bits(self.weight), _bits(self.bias)

    def _unchanged(self, local: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Whether the server holds these bits of weight and bias."""
        return self._pushed is not None and all(torch.equal(a, b) for a, b in zip(local, self._pushed))

    def _push_parameters(self) -> None:
        """Sends weight and bias when they differ, bit for bit, from what the server holds."""
        local = self._local_bits()
        if local is None or self._unchanged(local):
            return
        self.client.load_state(self.name, {"weight": local[0].view(torch.float32), "bias": local[1].view(torch.float32)}, strict=False)
        self._pushed = local

    # state_dict, with the server's values under PyTorch's keys.

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self._push_parameters()
        for key, value in self.client.get_state(self.name).items():
            param = self._parameters.get(key)
            if param is not None:
                # The local tensor (equal to the server's now), shared as PyTorch shares it.
                value = param if keep_vars else param.detach()
            destination[prefix + key] = value

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # strict=False on the server: PyTorch's load_state_dict collects missing and unexpected
        # keys over the whole model and formats the error at the top.
        mine = {key: state_dict[prefix + key] for key in STATE_KEYS if prefix + key in state_dict}
        try:
            result = self.client.load_state(self.name, mine, strict=False, version=local_metadata.get("version"))
        except RemoteError as err:
            if err.reason != "BN_ERR_LOAD_STATE":
                raise
            # "Error(s) in loading state_dict for <class>:\n\t<error>\n\t<error>": the errors,
            # with the keys as the whole model names them.
            errors = err.message.split("\n\t")[1:]
            error_msgs.extend(e.replace("size mismatch for ", f"size mismatch for {prefix}", 1) for e in errors)
            return
        if strict:
            missing_keys.extend(prefix + key for key in result.missing_keys)
            unexpected_keys.extend(prefix + key for key in result.unexpected_keys)
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].split(".", 1)[0] not in STATE_KEYS)
        with torch.no_grad():
            for key in ("weight", "bias"):
                param = self._parameters.get(key)
                if param is not None and key in mine:
                    param.copy_(mine[key])
        # Sent again before the next use, so that the server holds exactly the local float32 bits.
        self._pushed = None


class _RemoteBatchNorm(RemoteNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        client: Client,
        name: str,
        exist_ok: bool = False,
    ) -> None:
        """torch.nn.BatchNorm*d's arguments, plus the client and the module's name on the server.
        With `exist_ok`, a module of that name and configuration is joined with its state."""
        super().__init__(num_features, eps, momentum, affine, track_running_stats, client=client, name=name, exist_ok=exist_ok)


class RemoteBatchNorm1d(_RemoteBatchNorm):
    """torch.nn.BatchNorm1d: input (N, C) or (N, C, L)."""

    _kind = "BATCH_NORM_1D"


class RemoteBatchNorm2d(_RemoteBatchNorm):
    """torch.nn.BatchNorm2d: input (N, C, H, W)."""

    _kind = "BATCH_NORM_2D"


class RemoteBatchNorm3d(_RemoteBatchNorm):
    """torch.nn.BatchNorm3d: input (N, C, D, H, W)."""

    _kind = "BATCH_NORM_3D"
