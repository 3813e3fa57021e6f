"""convert_remote_batchnorm: nn.SyncBatchNorm.convert_sync_batchnorm, to remote modules."""
from __future__ import annotations

from typing import Optional, TypeVar, overload

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normserve.client import Client
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
    module: _BatchNorm, client: Client, prefix: str, *, rank: Optional[int] = None, world_size: Optional[int] = None, stats_only: bool = False
) -> RemoteNorm: ...


@overload
def convert_remote_batchnorm(
    module: M, client: Client, prefix: str, *, rank: Optional[int] = None, world_size: Optional[int] = None, stats_only: bool = False
) -> M: ...


def convert_remote_batchnorm(
    module: nn.Module,
    client: Client,
    prefix: str,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    stats_only: bool = False,
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
    """
    return _convert(module, client, prefix, "", rank, world_size, stats_only)


def _convert(
    module: nn.Module, client: Client, prefix: str, path: str, rank: Optional[int], world_size: Optional[int], stats_only: bool
) -> nn.Module:
    if isinstance(module, _BatchNorm):
        return _twin(module, client, prefix + path, rank, world_size, stats_only)
    for child_name, child in module.named_children():
        twin = _convert(child, client, prefix, f"{path}.{child_name}" if path else child_name, rank, world_size, stats_only)
        module.add_module(child_name, twin)
    return module


def _twin(local: _BatchNorm, client: Client, name: str, rank: Optional[int], world_size: Optional[int], stats_only: bool) -> RemoteNorm:
    # PyTorch's constructor registers all three buffers, or none without track_running_stats.
    built_with_stats = any(b is not None for b in (local.running_mean, local.running_var, local.num_batches_tracked))
    args = (local.num_features, local.eps, local.momentum, local.affine, built_with_stats)
    remote: RemoteNorm
    if isinstance(local, nn.SyncBatchNorm):
        remote = RemoteSyncBatchNorm(
            *args, local.process_group, client=client, name=name, rank=rank, world_size=world_size, stats_only=stats_only
        )
    else:
        remote_type = next((remote for local_type, remote in _PLAIN if isinstance(local, local_type)), None)
        if remote_type is None:
            raise TypeError(f"{type(local).__name__} has no remote twin (a lazy BatchNorm needs one forward first)")
        remote = remote_type(*args, client=client, name=name)
    remote.take_state_of(local)
    return remote
