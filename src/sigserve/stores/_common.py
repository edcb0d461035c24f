"""Pure helpers shared by the Store implementations (no database imports)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..domain import ACTIONS, SignalBatch
from ..errors import ValidationError
from ..timeutil import TS_DTYPE

SOURCES = ("stream", "catchup_scan", "historical_replay")


def _bad_rows(confidence: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Rows whose confidence is outside 0..1 (NaN included) or whose action code is unknown."""
    return ~((confidence >= 0.0) & (confidence <= 1.0)) | (actions < 0) | (actions >= len(ACTIONS))


def _sorted_unique(ts: np.ndarray) -> bool:
    """Strictly increasing ts: the usual batch, checked without sorting."""
    return ts.size <= 1 or bool(np.all(ts[1:] > ts[:-1]))


def check_signals(batch: SignalBatch) -> None:
    """Refuse a batch that would store a bad signal; the whole batch, before any write."""
    confidence = np.asarray(batch.confidence, dtype=np.float64)
    actions = np.asarray(batch.action)
    bad = _bad_rows(confidence, actions)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValidationError(
            f"refusing {int(bad.sum())} invalid signal rows (first at ts {batch.ts[i]}Z: action code"
            f" {int(actions[i])}, confidence {confidence[i]!r}); nothing was written",
            details={"bad_rows": int(bad.sum())})
    ts = np.asarray(batch.ts, dtype=TS_DTYPE)
    if not _sorted_unique(ts):
        uniq, counts = np.unique(ts, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1][0]
            raise ValidationError(f"duplicate signals for ts {dup}Z in one batch; nothing was written",
                                  details={"ts": f"{dup}Z"})
    if batch.source not in SOURCES:
        raise ValidationError(f"unknown source {batch.source!r}", details={"source": batch.source})


def check_signal_batches(batches: Sequence[SignalBatch], confidence: np.ndarray, actions: np.ndarray) -> None:
    """:func:`check_signals` for the batches of one write, given their confidence and action
    columns end to end: one vectorised pass instead of one per batch (a write cycle of 50
    symbols' batches spent 2.5 ms in 50 checks); a batch that fails gets its own refusal."""
    good = not _bad_rows(confidence, actions).any()
    for batch in batches:
        if not good or batch.source not in SOURCES or not _sorted_unique(np.asarray(batch.ts)):
            check_signals(batch)  # raises for a bad batch; an unsorted one with unique ts passes
