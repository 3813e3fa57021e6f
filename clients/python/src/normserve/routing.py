"""Which replica owns a module (docs/scale-out.md): rendezvous hashing of the module's name."""
from __future__ import annotations

import hashlib


def owner_index(name: str, replicas: int) -> int:
    """The ordinal, in 0..replicas-1, of the replica that owns `name`.

    For each ordinal i, SHA-256 over the name's UTF-8 bytes, a zero byte and i in ASCII decimal;
    the greatest digest (compared as unsigned bytes) wins, and on equal digests the lower ordinal.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be a positive integer, not {replicas}")
    return max(range(replicas), key=lambda i: (hashlib.sha256(name.encode() + b"\0" + str(i).encode()).digest(), -i))
