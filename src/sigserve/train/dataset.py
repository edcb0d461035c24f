"""The labelled dataset: the spec's features per bar joined with the configured labels.

Features are computed with the same :class:`~sigserve.features.spec.FeatureSpec` code that writes
the store's rows and that serves live bars. A row is kept when every feature is finite (warm-up
rows are dropped and counted) and it has a label. Each row carries the ts its label reaches
(``label_end``), so the split can purge rows whose label crosses into a later part.

``version`` is the sha256 of the labelled data (names, classes, values, labels, ts, symbols): the
``dataset_version`` of the training run.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..domain import Task
from ..errors import ValidationError
from ..features.spec import FeatureSpec, closed_bars
from ..labels.annotations import (
    OUTSIDE,
    Span,
    agreement_rate,
    bio_encode,
    bio_sequences,
    dataset_stats,
    load_annotations,
    merge_spans,
    sequence_mask,
    span_index,
    windowed_examples,
)
from ..labels.targets import classify, forward_logret, target_name
from ..stores.base import Store
from ..timeutil import TS_DTYPE, interval_us, parse_ts
from .config import PipelineConfig

log = logging.getLogger("sigserve.train")


@dataclass
class Dataset:
    x: np.ndarray  # float64 (n, k)
    y: np.ndarray  # float64 (n,): class codes, or the regression target
    ts: np.ndarray  # datetime64[us] (n,)
    label_end: np.ndarray  # int64 us (n,): the newest ts the label depends on
    group: np.ndarray  # int (n,): index into symbols
    names: tuple[str, ...]
    classes: tuple[str, ...]  # () for regression
    task: Task
    symbols: tuple[str, ...]
    target: str
    servable: bool  # per-bar rows of the spec's own columns (not windowed examples)
    warmup_dropped: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def version(self) -> str:
        digest = hashlib.sha256()
        for part in ("|".join(self.names), "|".join(self.classes), str(self.task), self.target,
                     "|".join(self.symbols)):
            digest.update(part.encode())
            digest.update(b"\0")
        for array in (self.x, self.y, self.ts.astype(np.int64), self.group.astype(np.int64)):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def row_labels(self) -> np.ndarray:
        if self.task is Task.REGRESSION:
            return np.where(self.y > 0, "y>0", "y<=0").astype(object)
        return np.asarray(self.classes, dtype=object)[self.y.astype(np.int64)]


def _bounds(config: PipelineConfig) -> tuple[np.datetime64 | None, np.datetime64 | None]:
    start = parse_ts(config.data.start, field="data.start") if config.data.start else None
    end = parse_ts(config.data.end, field="data.end") if config.data.end else None
    return start, end


async def symbol_arrays(store: Store, config: PipelineConfig, spec: FeatureSpec, symbol: str,
                        now: np.datetime64 | None = None) -> dict[str, np.ndarray]:
    """The symbol's closed candles in the config's window, plus the spec's window of history
    before ``start`` so that the first bars are seeded as in a longer history."""
    interval = config.data.interval
    start, end = _bounds(config)
    read_from = None if start is None else start - np.timedelta64(interval_us(interval) * (spec.window + 1), "us")
    candles = await store.read_candles(symbol, interval, read_from, end)
    arrays = closed_bars(candles, interval, now)
    if arrays["ts"].shape[0] == 0:
        raise ValidationError(f"no closed candles for {symbol} {interval} in the config's window:"
                              " import candles (sigserve candles import, or data.candles in the config)",
                              details={"symbol": symbol, "interval": interval})
    return arrays


def _spans_for(config: PipelineConfig, arrays: dict[str, np.ndarray], symbol: str
               ) -> tuple[list[Span], list[Span], list[Span], int]:
    """(merged spans, human, programmatic, human spans dropped for low confidence)."""
    labels = config.labels
    interval = config.data.interval
    human: list[Span] = []
    programmatic: list[Span] = []
    dropped = 0
    if labels.kind in ("annotations", "merged"):
        assert labels.annotations is not None
        human, dropped = load_annotations(config.path(labels.annotations),
                                          min_confidence=labels.min_confidence, symbol=symbol,
                                          interval=interval)
    if labels.kind in ("patterns", "merged"):
        from ..labels.patterns import pattern_spans

        programmatic = pattern_spans(arrays, symbol, interval, labels.patterns)
    if labels.kind == "annotations":
        spans = human
    elif labels.kind == "patterns":
        spans = programmatic
    else:
        spans = merge_spans(human, programmatic, labels.merge)
    return spans, human, programmatic, dropped


async def build_dataset(store: Store, config: PipelineConfig, spec: FeatureSpec, *,
                        now: np.datetime64 | None = None) -> Dataset:
    labels = config.labels
    start, end = _bounds(config)
    symbols = tuple(config.data.symbols)
    parts: list[dict[str, Any]] = []
    warmup_dropped = 0
    span_lengths: list[int] = []
    span_counts: dict[str, int] = {}
    agree = both = 0
    n_human = n_prog = low_confidence = 0
    windowed = labels.kind != "forward_return" and labels.encoding == "windowed"
    names = spec.names
    for g, symbol in enumerate(symbols):
        arrays = await symbol_arrays(store, config, spec, symbol, now)
        frame = spec.compute(arrays)
        ts = frame.ts
        n = ts.shape[0]
        finite = np.isfinite(frame.values).all(axis=1)
        in_window = np.ones(n, dtype=bool)
        if start is not None:
            in_window &= ts >= start
        if end is not None:
            in_window &= ts <= end
        warmup_dropped += int((in_window & ~finite).sum())
        ts_us = ts.astype(np.int64)
        if labels.kind == "forward_return":
            y = forward_logret(arrays["close"], labels.horizon)
            label_end = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
            if n > labels.horizon:
                label_end[:-labels.horizon] = ts_us[labels.horizon:]
            keep = finite & in_window & np.isfinite(y)
            parts.append({"x": frame.values[keep], "y": y[keep], "ts": ts[keep],
                          "label_end": label_end[keep], "group": np.full(int(keep.sum()), g)})
            continue
        spans, human, programmatic, dropped = _spans_for(config, arrays, symbol)
        low_confidence += dropped
        n_human += len(human)
        n_prog += len(programmatic)
        for s in spans:
            where = span_index(ts, s)
            if where is not None:
                span_lengths.append(where[1] - where[0] + 1)
                span_counts[s.label] = span_counts.get(s.label, 0) + 1
        if human and programmatic:
            rate, candles = agreement_rate(ts, human, programmatic)
            if rate is not None:
                agree += round(rate * candles)
                both += candles
        if windowed:
            complete = finite & in_window
            inside = [s for s in spans if (w := span_index(ts, s)) is not None
                      and complete[(w[0] + w[1]) // 2]]
            x, tags, names = windowed_examples(frame.values, spec.names, ts, inside, labels.window)
            centres = np.array([(w[0] + w[1]) // 2 for s in inside if (w := span_index(ts, s))],
                               dtype=np.int64)
            reach = np.minimum(centres + labels.window - labels.window // 2 - 1, n - 1)
            good = np.isfinite(x).all(axis=1) if x.size else np.zeros(0, dtype=bool)
            parts.append({"x": x[good], "tags": tags[good], "ts": ts[centres][good],
                          "label_end": ts_us[reach][good], "group": np.full(int(good.sum()), g)})
            continue
        tags = bio_encode(ts, spans).primary
        rows = finite & in_window
        if labels.context is not None:
            rows &= sequence_mask(n, bio_sequences(ts, spans, labels.context))
        parts.append({"x": frame.values[rows], "tags": tags[rows], "ts": ts[rows],
                      "label_end": ts_us[rows], "group": np.full(int(rows.sum()), g)})

    classes: tuple[str, ...]
    if labels.kind == "forward_return":
        y_all = np.concatenate([p["y"] for p in parts])
        if labels.task == "regression":
            y_codes, classes, task = y_all, (), Task.REGRESSION
        else:
            y_codes, classes = classify(y_all, labels.classification, labels.threshold)
            task = Task.BINARY if len(classes) == 2 else Task.MULTICLASS
        target = target_name(labels.horizon)
    else:
        all_tags = np.concatenate([p["tags"] for p in parts]) if parts else np.zeros(0, dtype=object)
        found = sorted({str(t) for t in all_tags.tolist()})
        classes = tuple(([OUTSIDE] if OUTSIDE in found else []) + [t for t in found if t != OUTSIDE])
        if len(classes) < 2:
            raise ValidationError(f"the labels give {len(classes)} class(es) {list(classes)}: a classifier"
                                  " needs at least two (more spans, more context, or other patterns)",
                                  details={"classes": list(classes)})
        index = {c: i for i, c in enumerate(classes)}
        y_codes = np.array([index[str(t)] for t in all_tags.tolist()], dtype=np.float64)
        task = Task.BINARY if len(classes) == 2 else Task.MULTICLASS
        target = f"{labels.kind}_{labels.encoding}"

    k = len(names)
    dataset = Dataset(
        x=np.ascontiguousarray(np.vstack([p["x"] for p in parts]) if parts else np.empty((0, k))),
        y=np.asarray(y_codes, dtype=np.float64),
        ts=np.concatenate([p["ts"] for p in parts]).astype(TS_DTYPE),
        label_end=np.concatenate([p["label_end"] for p in parts]).astype(np.int64),
        group=np.concatenate([p["group"] for p in parts]).astype(np.int64),
        names=tuple(names), classes=tuple(classes), task=task, symbols=symbols, target=target,
        servable=not windowed, warmup_dropped=warmup_dropped)
    if len(dataset) < 30:
        raise ValidationError(f"too few labelled rows to train ({len(dataset)}): widen the window,"
                              " or check the labels", details={"rows": len(dataset)})
    stats = dataset_stats(dataset.row_labels())
    stats["warmup_rows_dropped"] = warmup_dropped
    stats["target"] = target
    if labels.kind != "forward_return":
        stats["spans"] = dict(sorted(span_counts.items()))
        stats["mean_span_length"] = float(np.mean(span_lengths)) if span_lengths else None
        stats["human_spans"] = n_human
        stats["programmatic_spans"] = n_prog
        stats["human_spans_below_min_confidence"] = low_confidence
        stats["agreement_rate"] = agree / both if both else None
        stats["agreement_candles"] = both
    dataset.stats = stats
    log.info("dataset %s: %d rows, %d warm-up rows dropped, counts %s", target, len(dataset),
             warmup_dropped, stats["counts"])
    return dataset
