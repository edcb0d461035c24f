"""Reading feature and candle files: UTC timestamps in every accepted form, and typed refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sigserve.errors import ValidationError
from sigserve.features.io import read_candle_file, read_feature_file

T0 = np.datetime64("2024-01-01T00:00:00", "us")
HOUR = np.timedelta64(1, "h")
EPOCH_T0 = 1_704_067_200  # 2024-01-01T00:00:00Z


def write_csv(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def write_parquet(tmp_path: Path, columns: dict[str, Any], name: str = "data.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def refused(fn: Any, *args: Any, **kwargs: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        fn(*args, **kwargs)
    assert info.value.code == "validation_error"
    return info.value


# --- timestamps ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("cells", "expected_hours"),
    [
        (["2024-01-01T00:00:00Z", "2024-01-01T01:00:00Z"], [0, 1]),
        (["2024-01-01T01:00:00+01:00", "2024-01-01T03:30:00+01:00"], [0, 2.5]),  # converted to UTC
        (["2024-01-01T00:00:00-05:00", "2024-01-01T01:00:00-05:00"], [5, 6]),
        (["2024-01-01 00:00:00", "2024-01-01 02:00:00"], [0, 2]),  # naive: read as UTC
        (["2024-01-01T00:00:00", "2024-01-01T02:00:00"], [0, 2]),
        (["2024-01-01T00:00:00Z", "2024-01-01T02:00:00+01:00"], [0, 1]),  # mixed offsets
        ([str(EPOCH_T0), str(EPOCH_T0 + 7200)], [0, 2]),  # epoch seconds
        ([str(EPOCH_T0 * 1000), str((EPOCH_T0 + 3600) * 1000)], [0, 1]),  # epoch milliseconds
        ([f"{EPOCH_T0}.5", f"{EPOCH_T0 + 3600}"], [0.5 / 3600, 1]),
    ],
    ids=["iso-z", "plus-one", "minus-five", "naive-space", "naive-t", "mixed", "epoch-s", "epoch-ms",
         "epoch-float"],
)
def test_csv_timestamps_are_utc(tmp_path: Path, cells: list[str], expected_hours: list[float]) -> None:
    text = "symbol,ts,a\n" + "".join(f"BTC,{c},{i}\n" for i, c in enumerate(cells))
    table = read_feature_file(write_csv(tmp_path, text))
    expected = [T0 + np.timedelta64(round(h * 3_600_000_000), "us") for h in expected_hours]
    assert table.ts.dtype == np.dtype("datetime64[us]")
    assert table.ts.tolist() == expected
    assert table.values[:, 0].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("tz", [None, "UTC", "Europe/Paris", "+01:00", "America/New_York"])
def test_parquet_timestamp_columns_keep_the_instant(tmp_path: Path, tz: str | None) -> None:
    instants = np.array([T0, T0 + HOUR], dtype="datetime64[us]")
    ts = pa.array(instants).cast(pa.timestamp("us", tz=tz))  # same UTC instants, any display zone
    path = write_parquet(tmp_path, {"symbol": ["BTC", "BTC"], "ts": ts, "a": [1.0, 2.0]})
    assert read_feature_file(path).ts.tolist() == instants.tolist()


def test_parquet_string_and_epoch_timestamps(tmp_path: Path) -> None:
    strings = write_parquet(tmp_path, {
        "symbol": ["BTC", "BTC", "BTC"],
        "ts": ["2024-01-01T01:00:00+01:00", "2024-01-01T01:00:00Z", "2024-01-01 02:00:00"],
        "a": [1.0, 2.0, 3.0]}, name="strings.parquet")
    assert read_feature_file(strings).ts.tolist() == [T0, T0 + HOUR, T0 + 2 * HOUR]
    millis = write_parquet(tmp_path, {"symbol": ["BTC"], "ts": pa.array([EPOCH_T0 * 1000], pa.int64()),
                                      "a": [1]}, name="millis.parquet")
    assert read_feature_file(millis).ts.tolist() == [T0]
    days = write_parquet(tmp_path, {"symbol": ["BTC"], "ts": pa.array(np.array(["2024-01-01"], dtype="datetime64[D]")),
                                    "a": [1]}, name="days.parquet")
    assert read_feature_file(days).ts.tolist() == [T0]


def test_nanosecond_timestamps_are_truncated_to_microseconds(tmp_path: Path) -> None:
    ns = pa.array([1_704_067_200_000_000_001, 1_704_070_800_123_456_789], pa.timestamp("ns", tz="UTC"))
    path = tmp_path / "ns.parquet"
    pq.write_table(pa.table({"symbol": ["BTC", "BTC"], "ts": ns, "a": [1.0, 2.0]}), path, version="2.6")
    assert read_feature_file(path).ts.tolist() == [T0, T0 + HOUR + np.timedelta64(123_456, "us")]
    csv = write_csv(tmp_path, "symbol,ts,a\nBTC,2024-01-01T00:00:00.123456789Z,1\n")
    assert read_feature_file(csv).ts.tolist() == [T0 + np.timedelta64(123_456, "us")]


@pytest.mark.parametrize("cell", ["yesterday", "2024-13-01T00:00:00Z", ""], ids=["word", "month-13", "empty"])
def test_malformed_csv_timestamp_refused(tmp_path: Path, cell: str) -> None:
    path = write_csv(tmp_path, f"symbol,ts,a\nBTC,2024-01-01T00:00:00Z,1\nBTC,{cell},2\n")
    error = refused(read_feature_file, path)
    assert error.details.get("column", error.details.get("field")) == "ts"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e22], ids=["nan", "inf", "overflow"])
def test_non_finite_epoch_refused_not_nat(tmp_path: Path, bad: float) -> None:
    path = write_parquet(tmp_path, {"symbol": ["BTC", "BTC"], "ts": pa.array([float(EPOCH_T0), bad]),
                                    "a": [1.0, 2.0]})
    refused(read_feature_file, path)
    candles = write_parquet(tmp_path, {"ts": pa.array([bad]), "open": [1.0], "high": [1.0], "low": [1.0],
                                       "close": [1.0], "volume": [1.0]}, name="candles.parquet")
    refused(read_candle_file, candles, "BTC")


# --- feature files ------------------------------------------------------------------------------

def test_feature_file_columns_and_values(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "symbol,ts,rsi_14,atr_14,interval\n"
                               "BTC,2024-01-01T00:00:00Z,55.5,1.25,1h\n"
                               "ETH,2024-01-01T00:00:00Z,,2,1h\n")
    table = read_feature_file(path)
    assert table.names == ("rsi_14", "atr_14")  # reserved columns are not features
    assert table.symbols.tolist() == ["BTC", "ETH"]
    assert table.ts.tolist() == [T0, T0]  # the same ts for two symbols is fine
    assert table.values.dtype == np.float64 and table.values.shape == (2, 2)
    assert table.values[0].tolist() == [55.5, 1.25]
    assert np.isnan(table.values[1, 0]) and table.values[1, 1] == 2.0  # an empty cell is NaN


def test_symbol_option_fills_a_missing_symbol_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "ts,a\n2024-01-01T00:00:00Z,1\n2024-01-01T01:00:00Z,2\n")
    table = read_feature_file(path, symbol="SOL")
    assert table.symbols.tolist() == ["SOL", "SOL"]
    assert table.values[:, 0].tolist() == [1.0, 2.0]
    error = refused(read_feature_file, path)
    assert error.details == {"missing": ["symbol"]}


def test_symbol_option_selects_rows_of_a_symbol_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "symbol,ts,a\nBTC,2024-01-01T00:00:00Z,1\nETH,2024-01-01T00:00:00Z,2\n"
                               "ETH,2024-01-01T01:00:00Z,3\n")
    table = read_feature_file(path, symbol="ETH")
    assert table.symbols.tolist() == ["ETH", "ETH"]
    assert table.values[:, 0].tolist() == [2.0, 3.0]
    assert table.ts.tolist() == [T0, T0 + HOUR]
    refused(read_feature_file, path, symbol="SOL")  # nothing left: no rows


def test_feature_file_parquet_round_trip(tmp_path: Path) -> None:
    ts = pa.array(np.array([T0, T0 + HOUR], dtype="datetime64[us]")).cast(pa.timestamp("us", tz="UTC"))
    path = write_parquet(tmp_path, {"symbol": ["BTC", "BTC"], "ts": ts, "b": pa.array([1, 2], pa.int32()),
                                    "a": [0.5, None]})
    table = read_feature_file(path)
    assert table.names == ("b", "a")
    assert table.values[:, 0].tolist() == [1.0, 2.0]
    assert table.values[0, 1] == 0.5 and np.isnan(table.values[1, 1])


@pytest.mark.parametrize(
    ("text", "missing"),
    [("symbol,a\nBTC,1\n", ["ts"]), ("ts,a\n2024-01-01T00:00:00Z,1\n", ["symbol"])],
    ids=["no-ts", "no-symbol"],
)
def test_feature_file_missing_columns(tmp_path: Path, text: str, missing: list[str]) -> None:
    assert refused(read_feature_file, write_csv(tmp_path, text)).details["missing"] == missing


def test_feature_file_without_feature_columns(tmp_path: Path) -> None:
    refused(read_feature_file, write_csv(tmp_path, "symbol,ts,interval\nBTC,2024-01-01T00:00:00Z,1h\n"))


def test_duplicate_symbol_ts_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "symbol,ts,a\nBTC,2024-01-01T00:00:00Z,1\nETH,2024-01-01T00:00:00Z,1\n"
                               "BTC,2024-01-01T01:00:00+01:00,2\n")  # the same instant as row 1
    error = refused(read_feature_file, path)
    assert error.details == {"symbol": "BTC", "ts": "2024-01-01T00:00:00.000000Z"}


@pytest.mark.parametrize(("cell", "kind"), [("abc", "string"), ("true", "bool")], ids=["text", "bool"])
def test_non_numeric_feature_column_refused(tmp_path: Path, cell: str, kind: str) -> None:
    path = write_csv(tmp_path, f"symbol,ts,a,note\nBTC,2024-01-01T00:00:00Z,1,{cell}\n")
    error = refused(read_feature_file, path)
    assert error.details == {"column": "note", "type": kind}


def test_empty_symbol_refused(tmp_path: Path) -> None:
    refused(read_feature_file, write_csv(tmp_path, "symbol,ts,a\n,2024-01-01T00:00:00Z,1\n"))


@pytest.mark.parametrize("text", ["", "symbol,ts,a\n"], ids=["zero-bytes", "header-only"])
def test_empty_feature_file_refused(tmp_path: Path, text: str) -> None:
    refused(read_feature_file, write_csv(tmp_path, text))


def test_empty_parquet_refused(tmp_path: Path) -> None:
    path = write_parquet(tmp_path, {"symbol": pa.array([], pa.string()), "ts": pa.array([], pa.timestamp("us")),
                                    "a": pa.array([], pa.float64())})
    refused(read_feature_file, path)


def test_unreadable_files_refused(tmp_path: Path) -> None:
    refused(read_feature_file, tmp_path / "absent.csv")
    (tmp_path / "data.json").write_text("{}")
    refused(read_feature_file, tmp_path / "data.json")
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    refused(read_feature_file, tmp_path / "broken.parquet")
    refused(read_candle_file, tmp_path / "broken.parquet", "BTC")


# --- candle files -------------------------------------------------------------------------------

CANDLE_HEADER = "ts,open,high,low,close,volume\n"


def test_candle_file_sorted_and_typed(tmp_path: Path) -> None:
    path = write_csv(tmp_path, CANDLE_HEADER
                     + "2024-01-01T02:00:00+01:00,10,12,9,11,5\n"  # 01:00 UTC
                     + "2024-01-01T00:00:00Z,20,22,19,21,0\n"
                     + f"{EPOCH_T0 + 7200},30,32,29,31,7.5\n")
    c = read_candle_file(path, "BTC")
    assert c.ts.tolist() == [T0, T0 + HOUR, T0 + 2 * HOUR]
    assert c.open.tolist() == [20.0, 10.0, 30.0]
    assert c.high.tolist() == [22.0, 12.0, 32.0]
    assert c.low.tolist() == [19.0, 9.0, 29.0]
    assert c.close.tolist() == [21.0, 11.0, 31.0]
    assert c.volume.tolist() == [0.0, 5.0, 7.5]


def test_candle_parquet_with_matching_symbol_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path, {"symbol": ["BTC"], "ts": pa.array([EPOCH_T0], pa.int64()), "open": [1.0],
                                    "high": [2.0], "low": [0.5], "close": [1.5], "volume": [3]})
    c = read_candle_file(path, "BTC")
    assert c.ts.tolist() == [T0] and c.close.tolist() == [1.5] and c.volume.tolist() == [3.0]
    assert refused(read_candle_file, path, "ETH").details == {"symbols": ["BTC"]}


def test_candle_file_missing_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "ts,open,high,close\n2024-01-01T00:00:00Z,1,2,1.5\n")
    assert refused(read_candle_file, path, "BTC").details == {"missing": ["low", "volume"]}


@pytest.mark.parametrize(
    "row",
    [
        "10,10.5,9,11,5",  # high < close
        "10,12,10.5,11,5",  # low > open
        "10,9,8,9.5,5",  # high < open
        "10,12,9,11,-1",  # negative volume
        "0,1,0,0.5,1",  # a price <= 0
        "10,12,9,11,",  # missing volume
        "10,12,,11,5",  # missing low
    ],
    ids=["high-below-close", "low-above-open", "high-below-open", "negative-volume", "zero-price",
         "missing-volume", "missing-low"],
)
def test_inconsistent_candles_refused(tmp_path: Path, row: str) -> None:
    path = write_csv(tmp_path, CANDLE_HEADER + "2024-01-01T00:00:00Z,10,12,9,11,5\n"
                     + f"2024-01-01T01:00:00Z,{row}\n")
    error = refused(read_candle_file, path, "BTC")
    assert error.details == {"ts": "2024-01-01T01:00:00.000000Z", "bad_rows": 1}


def test_candle_non_numeric_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path, CANDLE_HEADER + "2024-01-01T00:00:00Z,10,12,9,eleven,5\n")
    assert refused(read_candle_file, path, "BTC").details["column"] == "close"


def test_duplicate_candles_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path, CANDLE_HEADER + f"{EPOCH_T0},10,12,9,11,5\n2024-01-01T01:00:00Z,10,12,9,11,5\n"
                     "2024-01-01T00:00:00Z,10,12,9,11,5\n")
    assert refused(read_candle_file, path, "BTC").details == {"ts": "2024-01-01T00:00:00.000000Z"}


@pytest.mark.parametrize("text", ["", CANDLE_HEADER], ids=["zero-bytes", "header-only"])
def test_empty_candle_file_refused(tmp_path: Path, text: str) -> None:
    refused(read_candle_file, write_csv(tmp_path, text), "BTC")
