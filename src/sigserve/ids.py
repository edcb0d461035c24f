"""Random identifiers for answers and requests (decision ids, request ids).

They must be unique, not secret: a generator seeded from the OS once (again in a forked child)
costs no ``getrandom`` system call per answer, as ``os.urandom`` or ``uuid.uuid4`` does.

Usage::

    from sigserve.ids import random_hex, random_uuid4

    random_hex()     # '9f1c...': 32 hex digits (128 bits)
    random_uuid4()   # '4a2f6c3e-...-4...-[89ab]...': a version 4 UUID as text
"""

from __future__ import annotations

import os
import random

_random = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))
_UUID4_KEEP = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)  # version and variant bits cleared
_UUID4_SET = (0x4 << 76) | (0x2 << 62)  # version 4, RFC 4122 variant


def random_hex() -> str:
    """128 random bits as 32 lowercase hex digits."""
    return f"{_random.getrandbits(128):032x}"


def random_uuid4() -> str:
    """A random (version 4) UUID as text."""
    h = f"{(_random.getrandbits(128) & _UUID4_KEEP) | _UUID4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
