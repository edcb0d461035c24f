"""PostgreSQL's write steps are encoded as the transaction reaches them, each once."""

from __future__ import annotations

import pytest

from sigserve.stores.postgres_store import _StepsAsNeeded


def test_each_step_is_made_when_first_read_and_only_once() -> None:
    made: list[str] = []

    def make(batch: str) -> str:
        made.append(batch)
        return batch.upper()

    steps = _StepsAsNeeded(make, ["a", "b", "c"])  # type: ignore[arg-type]
    assert len(steps) == 3 and made == []  # nothing encoded before the transaction asks
    assert steps[0] == "A" and made == ["a"]
    assert list(steps) == ["A", "B", "C"] and made == ["a", "b", "c"]
    assert list(steps) == ["A", "B", "C"] and made == ["a", "b", "c"]  # a retry reuses them
    assert steps[-1] == "C" and steps[1:] == ["B", "C"]
    with pytest.raises(IndexError):
        steps[3]
    assert not _StepsAsNeeded(make, [])  # type: ignore[arg-type]
