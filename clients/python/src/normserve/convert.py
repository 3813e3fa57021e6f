"""convert_remote_batchnorm: nn.SyncBatchNorm.convert_sync_batchnorm, to remote modules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, TypeVar, overload

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normserve.client import Client
from normserve.errors import RemoteError
from normserve.modules import RemoteBatchNorm1d, RemoteBatchNorm2d, RemoteBatchNorm3d, RemoteNorm, _RemoteBatchNorm
from normserve.sync import RemoteSyncBatchNorm

_PLAIN: tuple[tuple[type[_BatchNorm], type[_RemoteBatchNorm]], ...] = (
    (nn.BatchNorm1d, RemoteBatchNorm1d),
    (nn.BatchNorm2d, RemoteBatchNorm2d),
    (nn.BatchNorm3d, RemoteBatchNorm3d),
)


M = TypeVar("M", bound=nn.Module)


@overload
def convert_remote_batchnorm(
    module: _BatchNorm, client: Client, prefix: str, *, rank: Optional[int] = None, world_size: Optional[int] = None,
    stats_only: bool = False, resume: bool = False, first_step: Optional[int] = None
) -> RemoteNorm: ...


@overload
def convert_remote_batchnorm(
    module: M, client: Client, prefix: str, *, rank: Optional[int] = None, world_size: Optional[int] = None,
    stats_only: bool = False, resume: bool = False, first_step: Optional[int] = None
) -> M: ...


def convert_remote_batchnorm(
    module: nn.Module,
    client: Client,
    prefix: str,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    stats_only: bool = False,
    resume: bool = False,
    first_step: Optional[int] = None,
) -> nn.Module:
    """Replaces every BatchNorm1d/2d/3d and SyncBatchNorm in `module` with its remote twin, named
    `prefix + <qualified module name>` on the server ("resnet/" + "layer1.0.bn1"), and returns
    `module` (or the twin, when `module` itself is a BatchNorm).

    Each twin starts with the local module's state: weight and bias (the same Parameter objects,
    so an optimiser built before the conversion keeps working), running statistics, counter,
    training flag, momentum, eps and tracking flag. SyncBatchNorms become RemoteSyncBatchNorms of
    their process group; `rank` and `world_size` are for them when torch.distributed is not
    initialised, and `stats_only` makes them normalise on this process, sending the server only
    their statistics (RemoteSyncBatchNorm). To sync plain BatchNorms, convert them with
    convert_sync_batchnorm first.

    A name that exists on the server is an earlier run's, and is refused (BN_ERR_MODULE_EXISTS,
    or for a SyncBatchNorm, which every rank joins, a ValueError listing how its state differs),
    unless `resume`: then the server's modules keep their state (running statistics, counter,
    weight and bias, which the local Parameters take) and the job goes on with them, its
    SyncBatchNorms at `first_step` (the `step` they had reached, which the job must have kept:
    starting again at 0 would meet steps the server has completed). delete_modules(client,
    prefix) clears a run's modules for a fresh start.
    """
    sync = any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
    if resume and sync and first_step is None:
        raise ValueError("resume=True with SyncBatchNorms needs first_step: the step their modules had reached (module.step), kept with the job's checkpoint")
    return _convert(module, client, prefix, "", rank, world_size, _Options(stats_only, resume, first_step or 0))


def convert_local_batchnorm(module: nn.Module) -> nn.Module:
    """The way back: replaces every remote module in `module` with PyTorch's own BatchNorm1d/2d/3d
    (or SyncBatchNorm for a RemoteSyncBatchNorm), holding the server's state (running statistics,
    counter, buffers that are None), the same weight and bias Parameter objects, and the module's
    eps, momentum, tracking flag and mode; returns `module` (or the local module, when `module`
    itself is remote). For torch.save of a model without a server, torch.onnx.export and
    torch.jit. The server's modules stay; delete_modules removes them."""
    if isinstance(module, RemoteNorm):
        return _local_twin(module)
    for child_name, child in module.named_children():
        module.add_module(child_name, convert_local_batchnorm(child))
    return module


def _local_twin(remote: RemoteNorm) -> _BatchNorm:
    info = remote.client.get_module(remote.name)
    state = remote.client.get_state(remote.name)
    built_with_stats = info.config.track_running_stats
    args = (remote.num_features, remote.eps, remote.momentum, remote.affine, built_with_stats)
    local: _BatchNorm
    if isinstance(remote, RemoteSyncBatchNorm):
        local = nn.SyncBatchNorm(*args, process_group=remote.process_group)
    else:
        local_type = next(local_type for local_type, remote_type in _PLAIN if isinstance(remote, remote_type))
        local = local_type(*args)
    local.track_running_stats = remote.track_running_stats
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        if built_with_stats and key not in state:
            setattr(local, key, None)
        elif key in state:
            getattr(local, key).copy_(state[key])
    if remote.affine:
        with torch.no_grad():
            remote.weight.copy_(state["weight"])  # type: ignore[union-attr]
            remote.bias.copy_(state["bias"])  # type: ignore[union-attr]
        local.weight = remote.weight
        local.bias = remote.bias
    local.train(remote.training)
    return local


@dataclass(frozen=True)
class _Options:
    stats_only: bool
    resume: bool
    first_step: int


def delete_modules(client: Client, prefix: str) -> list[str]:
    """Deletes every module on the server whose name starts with `prefix` (a run's modules, as
    convert_remote_batchnorm named them), and returns their names. An empty prefix is refused."""
    if not prefix:
        raise ValueError("delete_modules needs a non-empty prefix; it would delete every module")
    names = [m.name for m in client.list_modules() if m.name.startswith(prefix)]
    for name in names:
        client.delete_module(name)
    return names


def _convert(
    module: nn.Module, client: Client, prefix: str, path: str, rank: Optional[int], world_size: Optional[int], options: _Options
) -> nn.Module:
    if isinstance(module, _BatchNorm):
        return _twin(module, client, prefix, prefix + path, rank, world_size, options)
    for child_name, child in module.named_children():
        twin = _convert(child, client, prefix, f"{path}.{child_name}" if path else child_name, rank, world_size, options)
        module.add_module(child_name, twin)
    return module


def _twin(
    local: _BatchNorm, client: Client, prefix: str, name: str, rank: Optional[int], world_size: Optional[int], options: _Options
) -> RemoteNorm:
    # PyTorch's constructor registers all three buffers, or none without track_running_stats.
    built_with_stats = any(b is not None for b in (local.running_mean, local.running_var, local.num_batches_tracked))
    args = (local.num_features, local.eps, local.momentum, local.affine, built_with_stats)
    remote: RemoteNorm
    if isinstance(local, nn.SyncBatchNorm):
        remote = RemoteSyncBatchNorm(
            *args, local.process_group, client=client, name=name, rank=rank, world_size=world_size,
            stats_only=options.stats_only, first_step=options.first_step,
        )
        if not remote.created and not options.resume:
            # Every rank joins the module; one another rank of this job made is still as created
            # or holds the same state, while an earlier run's has moved on.
            differences = remote.state_differences(local)
            if differences:
                raise ValueError(
                    f"module '{name}' exists on the server with another state than this model's ({'; '.join(differences)}): "
                    f"an earlier run's? Pass resume=True (and first_step) to go on with it, or delete the run's modules "
                    f"first with normserve.delete_modules(client, {prefix!r})"
                )
    else:
        remote_type = next((remote for local_type, remote in _PLAIN if isinstance(local, local_type)), None)
        if remote_type is None:
            raise TypeError(f"{type(local).__name__} has no remote twin (a lazy BatchNorm needs one forward first)")
        try:
            remote = remote_type(*args, client=client, name=name, exist_ok=options.resume)
        except RemoteError as err:
            if err.reason != "BN_ERR_MODULE_EXISTS":
                raise
            way_out = (
                f"module '{name}' already exists: an earlier run's? Pass resume=True to convert_remote_batchnorm to go on with its state, "
                f"or delete the run's modules first with normserve.delete_modules(client, {prefix!r})"
            )
            raise type(err)(err.code, err.reason, err.python_type, way_out, err.info) from None
    if options.resume and not remote.created:
        remote.adopt_state_of_server(local)
    else:
        remote.take_state_of(local)
    return remote
