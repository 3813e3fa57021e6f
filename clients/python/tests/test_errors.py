"""Errors raised as PyTorch raises them: the same class (also a normserve.RemoteError), the same
message, and the same state afterwards."""
from __future__ import annotations

import pickle
from typing import Callable

import grpc
import pytest
import torch
from torch import nn

import normserve

from conftest import assert_close

REMOTE = {1: normserve.RemoteBatchNorm1d, 2: normserve.RemoteBatchNorm2d, 3: normserve.RemoteBatchNorm3d}
LOCAL = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def raised(call: Callable[[], object]) -> Exception:
    try:
        call()
    except Exception as err:  # noqa: BLE001 - whatever PyTorch raises is the expectation
        return err
    raise AssertionError("no exception raised")


# (dims, channels, training, input shape)
CASES = {
    "one value per channel 1d": (1, 3, True, (1, 3)),
    "one value per channel 2d": (2, 3, True, (1, 3, 1, 1)),
    "wrong channel count training": (2, 4, True, (2, 3, 5, 5)),
    "wrong channel count eval": (2, 4, False, (2, 3, 5, 5)),
    "wrong rank 2d": (2, 3, True, (2, 3, 5)),
    "wrong rank 1d": (1, 3, True, (2, 3, 4, 4)),
    "wrong rank 3d": (3, 2, False, (2, 2, 3, 3)),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_errors_mirror_pytorch(client: normserve.Client, prefix: str, case: str) -> None:
    dims, channels, training, shape = CASES[case]
    local = LOCAL[dims](channels).train(training)
    remote = REMOTE[dims](channels, client=client, name=prefix + "bn").train(training)
    x = torch.randn(shape)
    expected = raised(lambda: local(x))
    with pytest.raises(type(expected)) as info:
        remote(x)
    err = info.value
    assert isinstance(err, normserve.RemoteError)
    assert str(err) == str(expected)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.python_type == type(expected).__name__
    assert err.reason is not None and err.reason.startswith("BN_ERR_")
    # A training forward counts the batch before it checks the values, in PyTorch and here.
    for key, value in local.state_dict().items():
        assert_close(remote.state_dict()[key], value, key)


def test_errors_without_a_pytorch_class_are_remote_errors(client: normserve.Client, prefix: str) -> None:
    err = raised(lambda: client.get_module(prefix + "missing"))
    assert type(err) is normserve.RemoteError
    assert not isinstance(err, (ValueError, RuntimeError, AttributeError))
    assert (err.code, err.reason, err.python_type) == (grpc.StatusCode.NOT_FOUND, "BN_ERR_MODULE_NOT_FOUND", None)
    assert str(err) == f"module '{prefix}missing' not found"
    normserve.RemoteBatchNorm2d(2, client=client, name=prefix + "taken")
    err = raised(lambda: normserve.RemoteBatchNorm2d(2, client=client, name=prefix + "taken"))
    assert isinstance(err, normserve.RemoteError) and err.reason == "BN_ERR_MODULE_EXISTS"
    joined = normserve.RemoteBatchNorm2d(2, client=client, name=prefix + "taken", exist_ok=True)
    assert joined.training
    err = raised(lambda: normserve.RemoteBatchNorm2d(3, client=client, name=prefix + "taken", exist_ok=True))
    assert type(err) is ValueError and "num_features=2 (asked 3)" in str(err)


def test_errors_survive_pickling(client: normserve.Client, prefix: str) -> None:
    """torch.multiprocessing hands a rank's exception to its parent by pickling it."""
    remote = normserve.RemoteBatchNorm1d(3, client=client, name=prefix + "bn")
    err = raised(lambda: remote(torch.randn(1, 3)))
    assert isinstance(err, normserve.RemoteError)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err) is normserve.RemoteValueError
    fields = ("code", "reason", "python_type", "message", "info")
    assert [getattr(copy, f) for f in fields] == [getattr(err, f) for f in fields]
