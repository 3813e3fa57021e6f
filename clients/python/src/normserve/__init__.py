"""normserve: PyTorch's BatchNorm modules computed by a normserve server.

    import normserve
    client = normserve.Client("localhost:50051")
    model = normserve.convert_remote_batchnorm(model, client, prefix="resnet/")
"""
from normserve.client import (
    Client,
    ForwardResult,
    Gradients,
    GroupStats,
    LoadResult,
    ReducedGrads,
    SyncForwardResult,
    SyncGradients,
)
from normserve.convert import convert_local_batchnorm, convert_remote_batchnorm, delete_modules
from normserve.errors import RemoteAttributeError, RemoteError, RemoteRuntimeError, RemoteValueError
from normserve.modules import RemoteBatchNorm1d, RemoteBatchNorm2d, RemoteBatchNorm3d, RemoteNorm
from normserve.sync import RemoteSyncBatchNorm

__all__ = [
    "Client",
    "ForwardResult",
    "Gradients",
    "GroupStats",
    "LoadResult",
    "RemoteAttributeError",
    "RemoteBatchNorm1d",
    "RemoteBatchNorm2d",
    "RemoteBatchNorm3d",
    "RemoteError",
    "RemoteNorm",
    "RemoteRuntimeError",
    "RemoteSyncBatchNorm",
    "ReducedGrads",
    "RemoteValueError",
    "SyncForwardResult",
    "SyncGradients",
    "convert_local_batchnorm",
    "convert_remote_batchnorm",
    "delete_modules",
]
