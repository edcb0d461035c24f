"""Reading wide feature files and OHLCV candle files (CSV or Parquet) into checked arrays.

A feature file has ``symbol``, ``ts`` and one numeric column per feature. A candle file has ``ts``,
``open``, ``high``, ``low``, ``close``, ``volume`` (and optionally ``symbol``). Timestamps are UTC:
ISO 8601 with an offset is converted, a naive timestamp is read as UTC, and a bare number is epoch
seconds (milliseconds when above 1e11). Anything malformed is refused with ``validation_error``
naming the file, the column and the first bad value, and nothing is written.

Usage::

    table = read_feature_file(Path("features.parquet"), symbol=None)
    table.names, table.symbols, table.ts, table.values
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ValidationError
from ..stores.base import Candles
from ..timeutil import TS_DTYPE, parse_ts

_RESERVED = {"symbol", "ts", "interval", "feature_key", "created_at"}
_CANDLE_COLUMNS = ("open", "high", "low", "close", "volume")


@dataclass(frozen=True)
class FeatureTable:
    names: tuple[str, ...]
    symbols: np.ndarray  # object array of str
    ts: np.ndarray  # datetime64[us]
    values: np.ndarray  # float64 (n, k)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise ValidationError(f"no such file: {path}", details={"path": str(path)})
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix in (".csv", ".txt", ".gz"):
            import pyarrow.csv as pacsv

            return pacsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValidationError(f"cannot read {path.name}: {exc}", details={"path": str(path)}) from exc
    raise ValidationError(f"{path.name}: use a .csv or .parquet file", details={"path": str(path)})


def _timestamps(column: pa.ChunkedArray, path: Path) -> np.ndarray:
    array = column.combine_chunks()
    if array.null_count:
        raise ValidationError(f"{path.name}: column ts has empty values", details={"column": "ts"})
    if pa.types.is_timestamp(array.type):
        # A zoned timestamp stores UTC instants already; a naive one is read as UTC.
        # Nanosecond inputs (pandas' default) are truncated to microseconds, not refused.
        as_us = array.cast(pa.timestamp("us", tz=array.type.tz), safe=array.type.unit != "ns")
        return np.asarray(as_us.cast(pa.timestamp("us")).to_numpy(zero_copy_only=False), dtype=TS_DTYPE)
    if pa.types.is_date(array.type):
        return np.asarray(array.cast(pa.timestamp("us")).to_numpy(zero_copy_only=False), TS_DTYPE)
    if pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
        numbers = np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.float64)
        scale = np.where(np.abs(numbers) > 1e11, 1_000.0, 1_000_000.0)
        micros = (numbers * scale).round()
        bad = ~(np.abs(micros) < 9e18)  # NaN, inf, or beyond datetime64[us]: never a silent NaT
        if bad.any():
            value = float(numbers[np.flatnonzero(bad)[0]])
            raise ValidationError(f"{path.name}: column ts holds an invalid epoch value {value!r}",
                                  details={"column": "ts", "value": str(value)})
        return micros.astype(np.int64).astype(TS_DTYPE)
    texts = array.cast(pa.string())
    try:
        parsed = pc.strptime(pc.replace_substring(texts, "Z", "+0000"), format="%Y-%m-%dT%H:%M:%S%z",
                             unit="us", error_is_null=True)
        if parsed.null_count == 0:
            return np.asarray(parsed.cast(pa.timestamp("us")).to_numpy(zero_copy_only=False),
                              dtype=TS_DTYPE)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Slow path for mixed or unusual ISO forms: each value through the one parser.
    values = texts.to_pylist()
    return np.array([parse_ts(v) for v in values], dtype=TS_DTYPE)


def _numeric(table: pa.Table, name: str, path: Path) -> np.ndarray:
    column = table.column(name)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            or pa.types.is_null(column.type)):
        raise ValidationError(f"{path.name}: column {name!r} is not numeric ({column.type})",
                              details={"column": name, "type": str(column.type)})
    return np.asarray(column.combine_chunks().cast(pa.float64()).to_numpy(zero_copy_only=False),
                      dtype=np.float64)


def _first_duplicate(symbols: np.ndarray, ts: np.ndarray) -> tuple[str, np.datetime64] | None:
    order = np.lexsort((ts, symbols.astype(str)))
    s, t = symbols[order], ts[order]
    same = (s[1:] == s[:-1]) & (t[1:] == t[:-1])
    if same.any():
        i = int(np.flatnonzero(same)[0])
        return str(s[i]), t[i]
    return None


def read_feature_file(path: Path, symbol: str | None = None) -> FeatureTable:
    table = _read_table(path)
    columns = table.column_names
    if "ts" not in columns:
        raise ValidationError(f"{path.name}: missing column 'ts'", details={"missing": ["ts"]})
    if "symbol" in columns:
        symbols = np.asarray(table.column("symbol").cast(pa.string()).to_pylist(), dtype=object)
        if symbol is not None:
            keep = symbols == symbol
            table = table.filter(pa.array(keep))
            symbols = symbols[keep]
    elif symbol is not None:
        symbols = np.full(table.num_rows, symbol, dtype=object)
    else:
        raise ValidationError(f"{path.name}: missing column 'symbol' (or pass --symbol)",
                              details={"missing": ["symbol"]})
    if any(s is None or s == "" for s in symbols):
        raise ValidationError(f"{path.name}: empty symbol values", details={"column": "symbol"})
    names = tuple(c for c in table.column_names if c not in _RESERVED)
    if not names:
        raise ValidationError(f"{path.name}: no feature columns besides symbol and ts")
    if table.num_rows == 0:
        raise ValidationError(f"{path.name}: no rows", details={"path": str(path)})
    ts = _timestamps(table.column("ts"), path)
    duplicate = _first_duplicate(symbols, ts)
    if duplicate:
        raise ValidationError(
            f"{path.name}: duplicate rows for (symbol, ts) = ({duplicate[0]}, {duplicate[1]}Z)",
            details={"symbol": duplicate[0], "ts": f"{duplicate[1]}Z"})
    values = np.column_stack([_numeric(table, n, path) for n in names])
    return FeatureTable(names, symbols, ts, np.ascontiguousarray(values))


def read_candle_file(path: Path, symbol: str) -> Candles:
    table = _read_table(path)
    missing = [c for c in ("ts", *_CANDLE_COLUMNS) if c not in table.column_names]
    if missing:
        raise ValidationError(f"{path.name}: missing columns {missing}", details={"missing": missing})
    if "symbol" in table.column_names:
        symbols = np.asarray(table.column("symbol").cast(pa.string()).to_pylist(), dtype=object)
        other = sorted(set(symbols.tolist()) - {symbol})
        if other:
            raise ValidationError(f"{path.name}: holds symbols {other[:5]} besides {symbol!r}",
                                  details={"symbols": other[:20]})
    if table.num_rows == 0:
        raise ValidationError(f"{path.name}: no rows", details={"path": str(path)})
    ts = _timestamps(table.column("ts"), path)
    o, h, low, c, v = (_numeric(table, name, path) for name in _CANDLE_COLUMNS)
    order = np.argsort(ts, kind="stable")
    ts, o, h, low, c, v = ts[order], o[order], h[order], low[order], c[order], v[order]
    dup = np.flatnonzero(ts[1:] == ts[:-1])
    if dup.size:
        raise ValidationError(f"{path.name}: duplicate candles at {ts[dup[0]]}Z",
                              details={"ts": f"{ts[dup[0]]}Z"})
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(o) & np.isfinite(h) & np.isfinite(low) & np.isfinite(c)
                & (low > 0) & (low <= np.minimum(o, c)) & (h >= np.maximum(o, c))
                & (np.nan_to_num(v, nan=-1.0) >= 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValidationError(
            f"{path.name}: inconsistent candle at {ts[i]}Z (need low <= open, close <= high,"
            " prices > 0, volume >= 0)", details={"ts": f"{ts[i]}Z", "bad_rows": int(bad.sum())})
    return Candles(ts, o, h, low, c, v)
