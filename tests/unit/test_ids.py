"""Decision and request ids: well formed, unique, and not repeated by a forked child."""

from __future__ import annotations

import os
import uuid

import pytest

from sigserve.ids import random_hex, random_uuid4


def test_uuid4_text_is_a_version_4_rfc_4122_uuid_and_ids_do_not_repeat() -> None:
    ids = [random_uuid4() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:500]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text
    hexes = {random_hex() for _ in range(20_000)}
    assert len(hexes) == 20_000 and all(len(h) == 32 and int(h, 16) >= 0 for h in list(hexes)[:100])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(random_hex() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    parent = [random_hex() for _ in range(4)]
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    assert len(child) == 4 and not set(child) & set(parent)
