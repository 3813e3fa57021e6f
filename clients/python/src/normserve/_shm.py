"""Shared memory with a server on the same host: tensors through `mmap`ed files instead of messages.

A server started with --shm-dir names that directory in ListRegions. A client whose address is a
loopback one and that sees the directory creates files there, maps them, and registers each once
as a region; a call then writes its input into a region it has leased, names the region in the
request (the input's bytes and the answer's place), and reads the answer from the same mapping.
The input is written straight from the tensor into the mapping, and the answer copied once into a
tensor of its own (the region is reused by the next call). A server that refuses regions, or a
directory this client cannot see (another container's /dev/shm), leaves the client on the wire.
"""
from __future__ import annotations

import itertools
import mmap
import os
import re
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

_LOOPBACK = re.compile(r"^(localhost|127(\.\d{1,3}){3}|\[::1\]|unix:.*)(:\d+)?$")
#: Regions are made in sizes of powers of two from this one, so that few serve every shape.
_SMALLEST = 1 << 16


def is_loopback(address: str) -> bool:
    return _LOOPBACK.match(address) is not None


@dataclass(eq=False)
class Region:
    """One file under the server's directory, mapped here and registered there as `name`."""

    name: str
    path: str
    size: int
    map: mmap.mmap

    def write(self, offset: int, elements: np.ndarray) -> None:
        """Flat elements in their wire order (_tensors.wire_array) at `offset`: the one copy."""
        np.frombuffer(self.map, dtype=elements.dtype, count=elements.size, offset=offset)[:] = elements

    def read_float32(self, offset: int, count: int) -> np.ndarray:
        """`count` little-endian float32 values at `offset`, copied out of the mapping."""
        return np.frombuffer(self.map, dtype="<f4", count=count, offset=offset).astype(np.float32)


def _remove(paths: set[str]) -> None:
    for path in list(paths):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        paths.discard(path)


@dataclass
class RegionPool:
    """The regions registered with one server, free ones kept for reuse."""

    directory: str
    register: Callable[[str, str, int], None]
    unregister: Callable[[str], None]
    _free: list[Region] = field(default_factory=list)
    _all: list[Region] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _names: itertools.count = field(default_factory=itertools.count)
    _prefix: str = field(default_factory=lambda: f"py-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    _paths: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        # The files go with the process even when close() is never called.
        weakref.finalize(self, _remove, self._paths)

    def lease(self, size: int) -> Region:
        """A region of at least `size` bytes, registered with the server; give it back after use."""
        with self._lock:
            fitting = [r for r in self._free if r.size >= size]
            if fitting:
                region = min(fitting, key=lambda r: r.size)
                self._free.remove(region)
                return region
        region = self._make(max(_SMALLEST, 1 << (size - 1).bit_length()))
        with self._lock:
            self._all.append(region)
        return region

    def give_back(self, region: Region) -> None:
        with self._lock:
            self._free.append(region)

    def _make(self, size: int) -> Region:
        name = f"{self._prefix}-{next(self._names)}"
        path = os.path.join(self.directory, f"normserve-{name}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._paths.add(path)
        try:
            os.ftruncate(fd, size)
            mapped = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        region = Region(name, path, size, mapped)
        try:
            self.register(name, path, size)
        except BaseException:
            self._discard(region)
            raise
        return region

    def _discard(self, region: Region) -> None:
        region.map.close()
        _remove({region.path})
        self._paths.discard(region.path)

    def close(self) -> None:
        """Unregisters every region (as far as the server answers) and removes its file."""
        with self._lock:
            regions, self._all, self._free = self._all, [], []
        for region in regions:
            try:
                self.unregister(region.name)
            except Exception:  # noqa: BLE001 - the server may be gone; the file goes anyway
                pass
            self._discard(region)


def usable_directory(directory: str) -> Optional[str]:
    """The server's directory when this client can create files in it, else None."""
    if directory and os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK):
        return directory
    return None
