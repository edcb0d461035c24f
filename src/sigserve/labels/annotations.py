"""Labelled spans of candles: human annotations from a JSON file, their encodings, merging with
programmatic labels, and dataset statistics.

An annotations file is a JSON list (or ``{"annotations": [...]}``) of spans::

    {"symbol": "BTCUSDT", "interval": "1h", "start": "2024-03-01T10:00Z",
     "end": "2024-03-01T14:00Z", "label": "bull_flag", "confidence": 0.9, "source": "alice"}

``start`` and ``end`` are bar open times, both inclusive. Spans under ``min_confidence`` are
dropped (and counted).

Encodings:

- **BIO** (:func:`bio_encode`): ``B-<label>`` on a span's first candle, ``I-<label>`` on the
  others, ``O`` elsewhere. Overlapping spans never overwrite each other: a span that collides with
  one already placed goes to an extra tag column (``tag_2``, ``tag_3``, ...). :func:`bio_sequences`
  gives each span's sequence with ``context`` candles of padding before and after.
- **Windowed classification** (:func:`windowed_examples`): a fixed-size window of feature rows
  centred on each span, flattened into one row; windows that reach past either end of the history
  repeat the edge row (edge padding).

Merging (:func:`merge_spans`): ``human_priority`` keeps every human span and the programmatic ones
that overlap none; ``programmatic_priority`` the reverse; ``both`` keeps all (overlaps then land in
extra BIO columns).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ValidationError
from ..timeutil import TS_DTYPE, format_ts, parse_ts

log = logging.getLogger("sigserve.labels")

OUTSIDE = "O"
MERGE_STRATEGIES = ("human_priority", "programmatic_priority", "both")


@dataclass(frozen=True)
class Span:
    symbol: str
    interval: str
    start: np.datetime64
    end: np.datetime64
    label: str
    confidence: float = 1.0
    source: str = "human"

    def overlaps(self, other: Span) -> bool:
        return bool(self.symbol == other.symbol and self.interval == other.interval
                    and self.start <= other.end and other.start <= self.end)

    def to_dict(self) -> dict[str, Any]:
        return {"symbol": self.symbol, "interval": self.interval, "start": format_ts(self.start),
                "end": format_ts(self.end), "label": self.label, "confidence": self.confidence,
                "source": self.source}


def parse_spans(items: Any, *, where: str = "annotations") -> list[Span]:
    if isinstance(items, dict):
        items = items.get("annotations", items.get("spans"))
    if not isinstance(items, list):
        raise ValidationError(f"{where}: expected a list of spans (or {{\"annotations\": [...]}})")
    spans = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValidationError(f"{where}[{i}]: a span is an object", details={"index": i})
        missing = [k for k in ("symbol", "interval", "start", "end", "label") if item.get(k) in (None, "")]
        if missing:
            raise ValidationError(f"{where}[{i}]: missing {missing}", details={"index": i, "missing": missing})
        start = parse_ts(item["start"], field=f"{where}[{i}].start")
        end = parse_ts(item["end"], field=f"{where}[{i}].end")
        if end < start:
            raise ValidationError(f"{where}[{i}]: end is before start", details={"index": i})
        confidence = item.get("confidence", 1.0)
        if not isinstance(confidence, int | float) or isinstance(confidence, bool) \
                or not 0.0 <= float(confidence) <= 1.0:
            raise ValidationError(f"{where}[{i}]: confidence must be a number in [0, 1]",
                                  details={"index": i, "confidence": repr(confidence)})
        label = str(item["label"])
        if label == OUTSIDE or label.startswith(("B-", "I-")):
            raise ValidationError(f"{where}[{i}]: the label {label!r} is reserved by the BIO encoding",
                                  details={"index": i})
        spans.append(Span(str(item["symbol"]), str(item["interval"]), start, end, label,
                          float(confidence), str(item.get("source") or "human")))
    return spans


def load_annotations(path: Path, *, min_confidence: float = 0.0, symbol: str | None = None,
                     interval: str | None = None) -> tuple[list[Span], int]:
    """The spans at or above ``min_confidence`` (of ``symbol``/``interval`` when given), and how
    many were dropped for low confidence."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"no such annotations file: {path}", details={"path": str(path)})
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{path.name} is not valid JSON: {exc}", details={"path": str(path)}) from exc
    spans = parse_spans(data, where=path.name)
    if symbol is not None:
        spans = [s for s in spans if s.symbol == symbol]
    if interval is not None:
        spans = [s for s in spans if s.interval == interval]
    kept = [s for s in spans if s.confidence >= min_confidence]
    dropped = len(spans) - len(kept)
    if dropped:
        log.info("annotations: %d of %d spans under min_confidence %.2f dropped", dropped, len(spans),
                 min_confidence)
    return kept, dropped


def span_index(ts: np.ndarray, span: Span) -> tuple[int, int] | None:
    """The candles ``[first, last]`` (inclusive indices into ``ts``) a span covers, or None."""
    t = np.asarray(ts, dtype=TS_DTYPE)
    first = int(np.searchsorted(t, span.start, side="left"))
    last = int(np.searchsorted(t, span.end, side="right")) - 1
    return (first, last) if last >= first else None


# --- BIO -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BioTags:
    """Tag columns over the candles: ``columns[0]`` is the primary one (``tag``); each further
    column holds spans that overlap ones already placed (``tag_2``, ...)."""

    columns: tuple[np.ndarray, ...]
    placed: int
    skipped: int  # spans that cover no candle of the series

    @property
    def names(self) -> tuple[str, ...]:
        return tuple("tag" if i == 0 else f"tag_{i + 1}" for i in range(len(self.columns)))

    @property
    def primary(self) -> np.ndarray:
        return self.columns[0]


def bio_encode(ts: np.ndarray, spans: list[Span]) -> BioTags:
    n = int(np.asarray(ts).shape[0])
    columns: list[np.ndarray] = [np.full(n, OUTSIDE, dtype=object)]
    placed = skipped = 0
    ranges = []
    for span in spans:
        where = span_index(ts, span)
        if where is None:
            skipped += 1
            continue
        ranges.append((where[0], -(where[1] - where[0]), where[1], span.label))
    for first, _, last, label in sorted(ranges):
        for column in columns:
            if (column[first:last + 1] == OUTSIDE).all():
                break
        else:
            column = np.full(n, OUTSIDE, dtype=object)
            columns.append(column)
        column[first] = f"B-{label}"
        column[first + 1:last + 1] = f"I-{label}"
        placed += 1
    return BioTags(tuple(columns), placed, skipped)


def bio_sequences(ts: np.ndarray, spans: list[Span], context: int = 0) -> list[tuple[int, int]]:
    """Each span's sequence as ``[lo, hi)`` candle indices: the span plus ``context`` candles
    before and after (clipped to the series)."""
    if context < 0:
        raise ValidationError("context must be >= 0", details={"context": context})
    n = int(np.asarray(ts).shape[0])
    out = []
    for span in spans:
        where = span_index(ts, span)
        if where is not None:
            out.append((max(0, where[0] - context), min(n, where[1] + 1 + context)))
    return out


def sequence_mask(n: int, sequences: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for lo, hi in sequences:
        mask[lo:hi] = True
    return mask


def strip_bio(tag: str) -> str:
    return tag[2:] if tag.startswith(("B-", "I-")) else tag


# --- windowed classification ---------------------------------------------------------------------
def window_names(names: tuple[str, ...], window: int) -> tuple[str, ...]:
    offsets = range(-(window // 2), window - window // 2)
    return tuple(f"{name}@{offset:+d}" for offset in offsets for name in names)


def windowed_examples(values: np.ndarray, names: tuple[str, ...], ts: np.ndarray, spans: list[Span],
                      window: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One flattened row per span: the ``window`` feature rows centred on the span's middle candle
    (offsets ``-window//2 ..``), edge rows repeated where the window leaves the history."""
    if window < 1:
        raise ValidationError("window must be >= 1", details={"window": window})
    x = np.asarray(values, dtype=np.float64)
    n, k = x.shape
    rows, labels = [], []
    offsets = np.arange(-(window // 2), window - window // 2)
    for span in spans:
        where = span_index(ts, span)
        if where is None:
            continue
        centre = (where[0] + where[1]) // 2
        index = np.clip(centre + offsets, 0, n - 1)
        rows.append(x[index].reshape(-1))
        labels.append(span.label)
    matrix = np.vstack(rows) if rows else np.empty((0, window * k))
    return matrix, np.array(labels, dtype=object), window_names(names, window)


# --- merging and statistics ----------------------------------------------------------------------
def merge_spans(human: list[Span], programmatic: list[Span], strategy: str) -> list[Span]:
    if strategy not in MERGE_STRATEGIES:
        raise ValidationError(f"unknown merge strategy {strategy!r}: use one of {list(MERGE_STRATEGIES)}",
                              details={"strategy": strategy})
    if strategy == "both":
        return [*human, *programmatic]
    first, second = (human, programmatic) if strategy == "human_priority" else (programmatic, human)
    kept = [s for s in second if not any(s.overlaps(f) for f in first)]
    return [*first, *kept]


def _labels_per_candle(ts: np.ndarray, spans: list[Span]) -> list[set[str]]:
    out: list[set[str]] = [set() for _ in range(int(np.asarray(ts).shape[0]))]
    for span in spans:
        where = span_index(ts, span)
        if where is not None:
            for i in range(where[0], where[1] + 1):
                out[i].add(span.label)
    return out


def agreement_rate(ts: np.ndarray, human: list[Span], programmatic: list[Span]) -> tuple[float | None, int]:
    """Of the candles that both sources label, the share where they share a label (None when no
    candle has both), and that candle count."""
    a, b = _labels_per_candle(ts, human), _labels_per_candle(ts, programmatic)
    both = [(x, y) for x, y in zip(a, b, strict=True) if x and y]
    if not both:
        return None, 0
    return sum(1 for x, y in both if x & y) / len(both), len(both)


def dataset_stats(row_labels: np.ndarray, spans: list[Span] | None = None, *,
                  ts: np.ndarray | None = None, human: list[Span] | None = None,
                  programmatic: list[Span] | None = None) -> dict[str, Any]:
    """Counts per label, class share, mean span length (candles) and the human/programmatic
    agreement rate, for logging and for saving next to the dataset."""
    labels = [str(v) for v in np.asarray(row_labels, dtype=object).tolist()]
    counts = Counter(labels)
    total = sum(counts.values())
    stats: dict[str, Any] = {
        "rows": total,
        "counts": dict(sorted(counts.items())),
        "class_share": {k: v / total for k, v in sorted(counts.items())} if total else {},
    }
    if spans is not None and ts is not None:
        lengths: dict[str, list[int]] = {}
        for span in spans:
            where = span_index(ts, span)
            if where is not None:
                lengths.setdefault(span.label, []).append(where[1] - where[0] + 1)
        every = [x for v in lengths.values() for x in v]
        stats["spans"] = {k: len(v) for k, v in sorted(lengths.items())}
        stats["mean_span_length"] = float(np.mean(every)) if every else None
        stats["mean_span_length_per_label"] = {k: float(np.mean(v)) for k, v in sorted(lengths.items())}
    if human is not None and programmatic is not None and ts is not None:
        rate, candles = agreement_rate(ts, human, programmatic)
        stats["agreement_rate"] = rate
        stats["agreement_candles"] = candles
        stats["human_spans"] = len(human)
        stats["programmatic_spans"] = len(programmatic)
    return stats


def log_stats(stats: dict[str, Any], path: Path | None = None) -> None:
    log.info("dataset: %d rows; counts %s; mean span length %s; agreement %s", stats.get("rows", 0),
             stats.get("counts"), stats.get("mean_span_length"), stats.get("agreement_rate"))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stats, indent=2, sort_keys=True, default=str))
