"""Train the demo model: a LightGBM binary classifier of "the close is higher ``horizon`` bars on".

The split is temporal and shared by every symbol: two cut-off timestamps divide the rows into
train (earliest), validation and test (latest); nothing is shuffled. Rows whose label would reach
past their part's end are purged (a label at ts looks ``horizon`` bars ahead), so no label of the
training part is computed from validation or test prices, and none of validation from test prices.
Early stopping watches the validation part; metrics are measured on the test part only.

Usage::

    values, names = compute_features(ohlcv)
    result = train_demo_model(values, names, ohlcv["close"], ohlcv["ts"], Path("model.txt"))
    result.metrics["auc"]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ValidationError
from ..timeutil import TS_DTYPE

CLASSES = ("down", "up")


@dataclass(frozen=True)
class DemoTrainResult:
    """Where the model went, the training window and the test metrics.

    ``train_start``/``train_end`` are the first and last ts of the training rows (inclusive),
    ``valid_end`` the last ts of the validation rows, ``test_start`` the first ts of the test rows.
    """

    model_path: Path
    train_start: np.datetime64
    train_end: np.datetime64
    valid_end: np.datetime64
    test_start: np.datetime64
    test_end: np.datetime64
    metrics: dict[str, Any]
    feature_names: tuple[str, ...]
    classes: tuple[str, ...] = CLASSES
    best_iteration: int = 0
    params: dict[str, Any] = field(default_factory=dict)


def train_demo_model(
    features: np.ndarray,
    names: Sequence[str],
    close: np.ndarray,
    ts: np.ndarray,
    out_path: Path,
    horizon: int = 4,
    n_trees: int = 150,
    valid_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 7,
    *,
    groups: np.ndarray | None = None,
) -> DemoTrainResult:
    """Train, early-stop, evaluate and save (LightGBM text format, with the feature names).

    ``features`` ``(n, k)``, ``close`` and ``ts`` ``(n,)`` may hold several symbols one after the
    other, each in ts order. Labels never cross from one symbol into the next: a symbol's rows end
    where ``ts`` stops increasing, or where ``groups`` (one symbol id per row) changes. Rows with a
    non-finite feature (warm-up) or no label (the last ``horizon`` bars) are dropped.
    """
    from ..features.compute import forward_log_return

    x = np.ascontiguousarray(features, dtype=np.float64)
    c = np.asarray(close, dtype=np.float64)
    t = np.asarray(ts).astype(TS_DTYPE)
    names = tuple(str(name) for name in names)
    n = x.shape[0] if x.ndim == 2 else -1
    if x.ndim != 2 or x.shape[1] != len(names) or c.shape != (n,) or t.shape != (n,):
        raise ValidationError(
            "features must be (n, len(names)) with close and ts of length n",
            details={"features": list(x.shape), "names": len(names), "close": list(c.shape),
                     "ts": list(t.shape)},
        )
    if not 0.0 < valid_fraction < 1.0 or not 0.0 < test_fraction < 1.0 \
            or valid_fraction + test_fraction >= 1.0:
        raise ValidationError("valid_fraction and test_fraction must be in (0, 1), sum < 1",
                              details={"valid_fraction": valid_fraction,
                                       "test_fraction": test_fraction})
    if n_trees < 1:
        raise ValidationError("n_trees must be >= 1", details={"n_trees": n_trees})

    # Labels per segment (one symbol): the forward return, and the ts the label reaches.
    starts = _segment_starts(t, groups)
    label = np.full(n, np.nan)
    label_end = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    t_int = t.astype(np.int64)
    bounds = [*starts.tolist(), n]
    for a, b in itertools.pairwise(bounds):
        label[a:b] = forward_log_return(c[a:b], horizon)
        if b - a > horizon:
            label_end[a:b - horizon] = t_int[a + horizon:b]

    keep = np.isfinite(x).all(axis=1) & np.isfinite(label)
    if int(keep.sum()) < 10:
        raise ValidationError(f"too few usable rows to train ({int(keep.sum())})",
                              details={"rows": int(keep.sum())})

    # Two cut-offs on ts, common to every symbol: quantiles of the usable rows' ts.
    sorted_ts = np.sort(t_int[keep])
    m = sorted_ts.shape[0]
    cut_valid = sorted_ts[min(int(m * (1.0 - valid_fraction - test_fraction)), m - 1)]
    cut_test = sorted_ts[min(int(m * (1.0 - test_fraction)), m - 1)]
    part_train = keep & (t_int < cut_valid) & (label_end < cut_valid)
    part_valid = keep & (t_int >= cut_valid) & (t_int < cut_test) & (label_end < cut_test)
    part_test = keep & (t_int >= cut_test)
    y = (label > 0.0).astype(np.float64)
    for part_name, part in (("train", part_train), ("validation", part_valid),
                            ("test", part_test)):
        classes_seen = np.unique(y[part])
        if classes_seen.shape[0] < 2:
            raise ValidationError(
                f"the {part_name} part has {int(part.sum())} rows and not both classes: "
                "give more bars or change the fractions",
                details={"part": part_name, "rows": int(part.sum())},
            )

    booster, params = _fit(x[part_train], y[part_train], x[part_valid], y[part_valid], names,
                           n_trees, seed)
    best = int(booster.best_iteration or booster.current_iteration())

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(out_path), num_iteration=best)

    p_test = np.asarray(booster.predict(x[part_test], num_iteration=best), dtype=np.float64)
    y_test = y[part_test]
    metrics: dict[str, Any] = {
        "auc": roc_auc(y_test, p_test),
        "accuracy": float(np.mean((p_test > 0.5) == (y_test > 0.5))),
        "up_rate_test": float(np.mean(y_test)),
        "n_train": int(part_train.sum()),
        "n_valid": int(part_valid.sum()),
        "n_test": int(part_test.sum()),
        "n_purged": int(keep.sum() - part_train.sum() - part_valid.sum() - part_test.sum()),
        "horizon": int(horizon),
        "best_iteration": best,
    }

    def ts_of(values: np.ndarray) -> np.datetime64:
        return np.datetime64(int(values), "us")

    return DemoTrainResult(
        model_path=out_path,
        train_start=ts_of(t_int[part_train].min()),
        train_end=ts_of(t_int[part_train].max()),
        valid_end=ts_of(t_int[part_valid].max()),
        test_start=ts_of(t_int[part_test].min()),
        test_end=ts_of(t_int[part_test].max()),
        metrics=metrics,
        feature_names=names,
        best_iteration=best,
        params=params,
    )


def _fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    names: tuple[str, ...],
    n_trees: int,
    seed: int,
) -> tuple[Any, dict[str, Any]]:
    try:
        from ..runtimes import import_lightgbm

        lgb = import_lightgbm()
    except ImportError as exc:  # pragma: no cover - lightgbm is a core dependency
        from ..errors import missing_extra

        raise missing_extra("lightgbm", "lightgbm") from exc

    params: dict[str, Any] = {
        "objective": "binary",
        "metric": "auc",
        "learning_rate": 0.05,
        "num_leaves": 15,
        "min_data_in_leaf": 200,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "num_threads": 2,
        "deterministic": True,
        "force_row_wise": True,
        "seed": seed,
        "verbose": -1,
    }
    train_set = lgb.Dataset(x_train, label=y_train, feature_name=list(names),
                            free_raw_data=True, params={"verbose": -1})
    valid_set = lgb.Dataset(x_valid, label=y_valid, reference=train_set, free_raw_data=True)
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=n_trees,
        valid_sets=[valid_set],
        valid_names=["valid"],
        callbacks=[lgb.early_stopping(stopping_rounds=25, verbose=False)],
    )
    return booster, params


def _segment_starts(ts_int: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Row indices where a new symbol begins: ts not increasing, or the group changing."""
    n = ts_int.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    t = ts_int.astype(np.int64)
    new = np.zeros(n, dtype=bool)
    new[0] = True
    new[1:] = t[1:] <= t[:-1]
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValidationError("groups must have one value per row",
                                  details={"groups": list(g.shape), "rows": n})
        new[1:] |= g[1:] != g[:-1]
    return np.flatnonzero(new)


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC with tied scores averaged (Mann-Whitney U); NaN when one class is absent."""
    y = np.asarray(y_true) > 0.5
    s = np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Average rank (1-based) of each run of equal scores.
    first = np.r_[True, sorted_s[1:] != sorted_s[:-1]]
    run_id = np.cumsum(first) - 1
    run_start = np.flatnonzero(first)
    run_len = np.diff(np.r_[run_start, s.shape[0]])
    avg_rank = run_start + (run_len + 1) / 2.0
    ranks = np.empty(s.shape[0])
    ranks[order] = avg_rank[run_id]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
