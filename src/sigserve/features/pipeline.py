"""Compute a feature spec over stored candles and write the rows (``sigserve features compute``).

Candles come from the store (closed bars only); the spec computes every feature over the whole
history read (so recursive indicators are seeded exactly as in training), warm-up rows are dropped
and counted, and the rows are upserted under the spec's ``feature_key`` in chunks, each chunk in
one transaction (whole or not at all). Reruns are idempotent. The feature names are registered,
and the spec is saved under ``SIGSERVE_HOME/feature_specs/<feature_key>.json``.

Usage::

    spec = FeatureSpec.from_yaml(Path("pipeline.yaml"))
    report = await compute_and_store(store, spec, "BTCUSDT", "1h", home=settings.home)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ValidationError
from ..stores.base import Store
from ..timeutil import TS_DTYPE, format_ts, interval_us, validate_interval
from .spec import FeatureFrame, FeatureSpec, closed_bars

log = logging.getLogger("sigserve.features")

DEFAULT_CHUNK_ROWS = 250_000


def save_spec(spec: FeatureSpec, home: Path) -> Path:
    target = Path(home) / "feature_specs" / f"{spec.feature_key}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(spec.to_dict(), indent=2, sort_keys=True)
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)
    return target


async def compute_frame(store: Store, spec: FeatureSpec, symbol: str, interval: str,
                        start: np.datetime64 | None = None, end: np.datetime64 | None = None,
                        *, now: np.datetime64 | None = None) -> tuple[FeatureFrame, int, int]:
    """(complete rows in [start, end], warm-up/NaN rows dropped, candles read).

    Candles before ``start`` are read back to the spec's ``window`` so that the first row of the
    window is seeded as the history would seed it (to 1e-9)."""
    validate_interval(interval)
    read_from: np.datetime64 | None = None
    if start is not None:
        read_from = start - np.timedelta64(
            interval_us(interval) * (spec.window + 1), "us")
    candles = await store.read_candles(symbol, interval, read_from, end)
    arrays = closed_bars(candles, interval, now)
    n_read = int(arrays["ts"].shape[0])
    frame = spec.compute(arrays)
    if start is not None:
        first = int(np.searchsorted(frame.ts, np.asarray(start, dtype=TS_DTYPE)))
        frame = FeatureFrame(frame.ts[first:], frame.values[first:], frame.names)
    complete, dropped = frame.complete()
    return complete, dropped, n_read


async def compute_and_store(store: Store, spec: FeatureSpec, symbol: str, interval: str, *,
                            start: np.datetime64 | None = None, end: np.datetime64 | None = None,
                            chunk_rows: int = DEFAULT_CHUNK_ROWS, home: Path | None = None,
                            now: np.datetime64 | None = None) -> dict[str, Any]:
    if chunk_rows < 1:
        raise ValidationError("chunk_rows must be >= 1", details={"chunk_rows": chunk_rows})
    frame, dropped, n_read = await compute_frame(store, spec, symbol, interval, start, end, now=now)
    if n_read == 0:
        raise ValidationError(f"no closed candles for {symbol} {interval}: import candles first"
                              " (sigserve candles import)", details={"symbol": symbol, "interval": interval})
    log.info("features %s %s: %d candles, %d warm-up/NaN rows dropped, %d rows to write (%s)",
             symbol, interval, n_read, dropped, len(frame), spec.feature_key)
    await store.register_features(list(spec.names))
    written = 0
    chunks = 0
    values = np.ascontiguousarray(frame.values)
    for lo in range(0, len(frame), chunk_rows):
        hi = min(lo + chunk_rows, len(frame))
        written += await store.write_features(
            interval, spec.feature_key, spec.names, np.full(hi - lo, symbol, dtype=object),
            frame.ts[lo:hi], values[lo:hi])
        chunks += 1
    saved = save_spec(spec, home) if home is not None else None
    return {
        "symbol": symbol, "interval": interval, "feature_key": spec.feature_key,
        "spec_hash": spec.spec_hash, "features": list(spec.names), "candles_read": n_read,
        "warmup_rows_dropped": dropped, "rows_written": written, "chunks": chunks,
        "warmup": spec.warmup, "window": spec.window,
        "first_ts": format_ts(frame.ts[0]) if len(frame) else None,
        "last_ts": format_ts(frame.ts[-1]) if len(frame) else None,
        "spec_file": str(saved) if saved else None,
    }
