"""Errors from the service, raised as the exception classes PyTorch raises for the same call.

The server puts a google.rpc.ErrorInfo in grpc-status-details-bin: `reason` is normserve's
stable code (docs/errors.md) and `metadata["python_type"]` the PyTorch exception class, where
PyTorch raises for the same call. The plain trailers normserve-error-reason and
normserve-python-type repeat the two for clients that cannot decode status details.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import grpc

from normserve import status_details_pb2


class RemoteError(Exception):
    """A failed call: the gRPC status code, normserve's reason code, PyTorch's exception class,
    the message (PyTorch's own text where PyTorch raises) and ErrorInfo's metadata."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: Optional[str],
        python_type: Optional[str],
        message: str,
        info: Mapping[str, str],
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.python_type = python_type
        self.message = message
        self.info = dict(info)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from all five fields, so that the error crosses process boundaries
        # (torch.multiprocessing reports a rank's exception to its parent by pickling it).
        return (type(self), (self.code, self.reason, self.python_type, self.message, self.info))

    def __str__(self) -> str:
        return self.message


class RemoteValueError(RemoteError, ValueError):
    """PyTorch raises ValueError here (e.g. one value per channel when training)."""


class RemoteRuntimeError(RemoteError, RuntimeError):
    """PyTorch raises RuntimeError here (e.g. a channel count that does not match)."""


class RemoteAttributeError(RemoteError, AttributeError):
    """PyTorch raises AttributeError here (a buffer that is None)."""


_BY_PYTHON_TYPE: dict[str, type[RemoteError]] = {
    "ValueError": RemoteValueError,
    "RuntimeError": RemoteRuntimeError,
    "AttributeError": RemoteAttributeError,
}


def from_rpc_error(err: grpc.RpcError) -> RemoteError:
    """Decodes a failed call (grpc.RpcError is also a grpc.Call on every failed call) into the
    RemoteError subclass that is also an instance of PyTorch's class, where there is one."""
    call: grpc.Call = err  # type: ignore[assignment]
    trailers = dict(call.trailing_metadata() or ())
    reason = _text(trailers.get("normserve-error-reason"))
    python_type = _text(trailers.get("normserve-python-type"))
    info: dict[str, str] = {}
    details = trailers.get("grpc-status-details-bin")
    if isinstance(details, bytes):
        status = status_details_pb2.Status.FromString(details)
        for detail in status.details:
            if detail.type_url.endswith("/google.rpc.ErrorInfo"):
                error_info = status_details_pb2.ErrorInfo.FromString(detail.value)
                reason = error_info.reason
                info = dict(error_info.metadata)
                python_type = info.get("python_type", python_type)
    cls = _BY_PYTHON_TYPE.get(python_type or "", RemoteError)
    return cls(call.code(), reason, python_type, call.details() or "", info)


def _text(value: object) -> Optional[str]:
    return value if isinstance(value, str) and value else None
