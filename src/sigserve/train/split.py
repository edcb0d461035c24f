"""Train / validation / test split.

**Temporal** (the default): two cut-off timestamps, common to every symbol, at the ratios'
quantiles of the rows' ts. Train is before the first cut, validation between, test after; nothing
is shuffled. A row whose label reaches past its part's end (a forward return that looks into the
next part) is purged, so no training label is computed from validation or test prices.

**Random**: rows shuffled into the parts. It leaks the future into training (neighbouring bars are
nearly the same row), so it warns loudly (a ``UserWarning``, and the CLI prints it in red).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import ValidationError

RANDOM_SPLIT_WARNING = (
    "split.method is random: rows are shuffled across time, so the model trains on bars that sit"
    " between test bars and its test metrics overstate live performance. Use method: temporal"
    " for anything you will trade."
)


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # bool masks over the rows
    valid: np.ndarray
    test: np.ndarray
    method: str
    cut_valid: np.datetime64 | None = None
    cut_test: np.datetime64 | None = None

    @property
    def purged(self) -> int:
        return int(self.train.shape[0] - self.train.sum() - self.valid.sum() - self.test.sum())


def temporal_split(ts: np.ndarray, label_end: np.ndarray, train: float, valid: float,
                   test: float) -> Split:
    t = np.asarray(ts, dtype="datetime64[us]").astype(np.int64)
    ends = np.asarray(label_end, dtype=np.int64)
    m = t.shape[0]
    if m < 3:
        raise ValidationError(f"too few rows to split ({m})", details={"rows": m})
    ordered = np.sort(t)
    cut_valid = ordered[min(int(m * train), m - 1)]
    cut_test = ordered[min(int(m * (train + valid)), m - 1)]
    part_train = (t < cut_valid) & (ends < cut_valid)
    part_valid = (t >= cut_valid) & (t < cut_test) & (ends < cut_test)
    if valid <= 0:
        part_valid[:] = False
    part_test = t >= cut_test
    for name, part in (("train", part_train), ("test", part_test)):
        if not part.any():
            raise ValidationError(f"the {name} part of the temporal split is empty: more rows, or other"
                                  " ratios", details={"part": name})
    return Split(part_train, part_valid, part_test, "temporal",
                 np.datetime64(int(cut_valid), "us"), np.datetime64(int(cut_test), "us"))


def random_split(n: int, train: float, valid: float, test: float, seed: int = 7) -> Split:
    warnings.warn(RANDOM_SPLIT_WARNING, UserWarning, stacklevel=2)
    order = np.random.default_rng(seed).permutation(n)
    a, b = int(n * train), int(n * (train + valid))
    masks = [np.zeros(n, dtype=bool) for _ in range(3)]
    masks[0][order[:a]] = True
    masks[1][order[a:b]] = True
    masks[2][order[b:]] = True
    return Split(masks[0], masks[1], masks[2], "random")
