"""End-to-end tests of the ``sigserve`` CLI, run as real subprocesses.

The scenario is a researcher's whole job: candles and a wide feature file on disk, a LightGBM
model trained on those features, then import, register, promote, define a signal, backfill (three
modes, reruns), predict one bar, retire. Every refusal must be exactly one stderr line
``error_code: message`` with a non-zero exit (2 for ``validation_error``, 1 otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from sigserve.demo.market import generate_ohlcv
from sigserve.features.compute import FEATURE_NAMES, compute_features
from sigserve.timeutil import TS_DTYPE, format_ts
from tests.fixtures.models import train_forward_return_lightgbm

pytestmark = pytest.mark.e2e

SYMBOLS = ("AAAUSDT", "BBBUSDT")
A, B = SYMBOLS
BARS = 800
INTERVAL = "1h"
MAIN_B_BARS = 700  # the main feature file holds BBB bars 0..699
EXTRA_B = (700, 750)  # the explicit-key file holds BBB bars 700..749; 750..799 have no features
MODEL = "trend"
SIGNAL = "trend-1h"
PINNED = "trend-v1-pinned"
ERROR_LINE = re.compile(r"^([a-z_]+): (.+)$")


# --- running the CLI ------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    rc: int
    out: str
    err: str

    def describe(self) -> str:
        return f"sigserve {' '.join(self.args)} -> rc {self.rc}\nstdout:\n{self.out}\nstderr:\n{self.err}"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGSERVE_")}
    env["COLUMNS"] = "200"  # a wide terminal: rich tables are not wrapped or elided
    env.pop("FORCE_COLOR", None)
    return env


def cli(home: Path | None, *args: str, timeout: float = 120) -> Result:
    root = ["--home", str(home)] if home is not None else []
    proc = subprocess.run([sys.executable, "-m", "sigserve", *root, *args], capture_output=True,
                          text=True, env=_env(), timeout=timeout, check=False)
    return Result(tuple(args), proc.returncode, proc.stdout, proc.stderr)


def ok(home: Path | None, *args: str) -> str:
    result = cli(home, *args)
    assert result.rc == 0, result.describe()
    assert result.err == "", result.describe()  # no warnings, no stray logging
    return result.out


def ok_json(home: Path, *args: str) -> Any:
    out = ok(home, *args, "--json")
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:  # pragma: no cover - a failure message
        raise AssertionError(f"stdout is not JSON: {out!r}") from exc


def refused(home: Path, code: str, *args: str) -> str:
    """Run a command that must be refused with ``code``; returns the message."""
    result = cli(home, *args)
    assert result.rc == (2 if code == "validation_error" else 1), result.describe()
    lines = result.err.splitlines()
    assert len(lines) == 1, result.describe()
    match = ERROR_LINE.match(lines[0])
    assert match is not None, result.describe()
    assert match.group(1) == code, result.describe()
    assert "Traceback" not in result.err
    assert result.out == "", result.describe()
    return match.group(2)


# --- data on disk ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Workspace:
    home: Path
    ts: np.ndarray  # the bar open times, shared by both symbols
    candles: dict[str, Path]
    features_main: Path
    features_extra: Path
    features_dup: Path
    model: Path

    def t(self, i: int) -> str:
        return format_ts(self.ts[i])


def _feature_table(symbol: str, ts: np.ndarray, values: np.ndarray,
                   extra: dict[str, np.ndarray] | None = None) -> pa.Table:
    columns: dict[str, Any] = {
        "symbol": pa.array([symbol] * len(ts), pa.string()),
        "ts": pa.array(np.char.add(np.datetime_as_string(ts, unit="s"), "Z"), pa.string()),
    }
    columns.update({name: pa.array(values[:, i]) for i, name in enumerate(FEATURE_NAMES)})
    columns.update(extra or {})
    return pa.table(columns)


def _write_csv(table: pa.Table, path: Path) -> Path:
    pacsv.write_csv(table, path)
    return path


def _train(matrices: list[np.ndarray], closes: list[np.ndarray], path: Path) -> Path:
    return train_forward_return_lightgbm(matrices, closes, path, feature_names=FEATURE_NAMES, n_trees=10,
                                         learning_rate=0.2, min_data_in_leaf=20)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    data.mkdir()
    markets = {s: generate_ohlcv(s, INTERVAL, "2024-01-01", BARS) for s in SYMBOLS}
    ts = np.asarray(markets[A]["ts"], dtype=TS_DTYPE)
    assert np.array_equal(ts, markets[B]["ts"])
    candles: dict[str, Path] = {}
    matrices: dict[str, np.ndarray] = {}
    for symbol, market in markets.items():
        table = pa.table({
            "ts": pa.array(np.char.add(np.datetime_as_string(ts, unit="s"), "Z"), pa.string()),
            **{c: pa.array(market[c]) for c in ("open", "high", "low", "close", "volume")},
        })
        candles[symbol] = _write_csv(table, data / f"{symbol}_{INTERVAL}.csv")
        matrices[symbol], names = compute_features(market)
        assert names == FEATURE_NAMES

    main = pa.concat_tables([
        _feature_table(A, ts, matrices[A]),
        _feature_table(B, ts[:MAIN_B_BARS], matrices[B][:MAIN_B_BARS]),
    ])
    lo, hi = EXTRA_B
    extra = _feature_table(B, ts[lo:hi], matrices[B][lo:hi])
    # A file that must be refused whole: BBB bars 760..779 plus a new column, one row doubled.
    dup_rows = np.r_[np.arange(760, 780), 770]
    dup = _feature_table(B, ts[dup_rows], matrices[B][dup_rows],
                         {"dup_only": pa.array(np.ones(dup_rows.size))})
    model = _train([matrices[s] for s in SYMBOLS], [markets[s]["close"] for s in SYMBOLS],
                   data / "trend.txt")
    return Workspace(
        home=root / "home", ts=ts, candles=candles,
        features_main=_write_csv(main, data / "features_main.csv"),
        features_extra=_write_csv(extra, data / "features_extra.csv"),
        features_dup=_write_csv(dup, data / "features_dup.csv"),
        model=model,
    )


def _by_symbol(reports: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    assert len(reports) == len({r["symbol"] for r in reports})
    return {r["symbol"]: r for r in reports}


def _history(home: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = ok_json(home, "signals", "history", SIGNAL, "--limit", "100000")
    return rows


def _assert_unique(rows: list[dict[str, Any]]) -> None:
    keys = [(r["signal_id"], r["model_version"], r["symbol"], r["interval"], r["ts"]) for r in rows]
    assert len(keys) == len(set(keys)), "signal_history holds duplicate rows"


# --- tests ----------------------------------------------------------------------------------
def test_help_lists_the_commands() -> None:
    out = ok(None, "--help")
    for command in ("models", "features", "candles", "signals", "backfill", "predict", "demo"):
        assert command in out


def test_researcher_workflow(ws: Workspace) -> None:
    home, t = ws.home, ws.t

    # candles
    for symbol, path in ws.candles.items():
        out = ok(home, "candles", "import", str(path), "--symbol", symbol, "--interval", INTERVAL)
        assert f"imported {BARS} candles for {symbol} {INTERVAL}" in out

    # features: the default key names the file by its digest, and registers every column
    imported = ok_json(home, "features", "import", str(ws.features_main), "--interval", INTERVAL)
    assert imported["rows"] == BARS + MAIN_B_BARS
    assert imported["feature_key"].startswith("file-")
    assert imported["features"] == list(FEATURE_NAMES)
    assert sorted(imported["newly_registered"]) == sorted(FEATURE_NAMES)
    assert imported["symbols"] == [A, B]
    check = ok_json(home, "features", "check", "--interval", INTERVAL)
    assert check["bars_missing_features"] == BARS - MAIN_B_BARS
    assert check["first"][0] == {"symbol": B, "ts": t(MAIN_B_BARS)}

    # features: an explicit key; nothing new to register
    extra = ok_json(home, "features", "import", str(ws.features_extra), "--interval", INTERVAL,
                    "--feature-key", "extra-v1")
    assert extra["feature_key"] == "extra-v1"
    assert extra["rows"] == EXTRA_B[1] - EXTRA_B[0]
    assert extra["newly_registered"] == []
    check = ok_json(home, "features", "check", "--interval", INTERVAL, "--limit", "3")
    assert check["bars_missing_features"] == BARS - EXTRA_B[1]
    assert check["first"] == [{"symbol": B, "ts": t(i)} for i in range(EXTRA_B[1], EXTRA_B[1] + 3)]

    # a file with a doubled (symbol, ts) row is refused whole: its new column is not registered
    # (and, below, a backfill finds no features at its bars)
    message = refused(home, "validation_error", "features", "import", str(ws.features_dup),
                      "--interval", INTERVAL)
    assert "duplicate" in message and B in message
    listed = ok_json(home, "features", "list")
    assert sorted(f["name"] for f in listed) == sorted(FEATURE_NAMES)
    assert {f["status"] for f in listed} == {"registered"}

    # models: register (the card), list, lifecycle
    sha = hashlib.sha256(ws.model.read_bytes()).hexdigest()
    card = ok_json(home, "models", "register", str(ws.model), "--name", MODEL)
    assert (card["name"], card["version"], card["stage"]) == (MODEL, 1, "registered")
    assert card["sha256"] == sha
    assert card["flavor"] == "lightgbm"
    assert card["task"] == "binary"
    assert card["feature_names"] == list(FEATURE_NAMES)
    assert list((home / "artifacts" / sha[:2]).glob(f"{sha}*")), "artifact not content-addressed"
    models = ok_json(home, "models", "list")
    assert [(m["name"], m["version"], m["stage"]) for m in models] == [(MODEL, 1, "registered")]
    assert "production" in ok(home, "models", "promote", f"{MODEL}:1", "--to", "production")
    shown = ok_json(home, "models", "show", f"{MODEL}@production")
    assert (shown["version"], shown["stage"], shown["sha256"]) == (1, "production", sha)
    assert shown["events"], "the promotion is recorded as a lifecycle event"

    # signals
    ok(home, "signals", "create", "--id", SIGNAL, "--model", f"{MODEL}@production", "--interval",
       INTERVAL, "--symbols", f"{A},{B}", "--threshold", "0.52", "--atr-feature", "atr_14")
    ok(home, "signals", "create", "--id", PINNED, "--model", f"{MODEL}:1", "--interval", INTERVAL)
    defs = {d["signal_id"]: d for d in ok_json(home, "signals", "list")}
    assert set(defs) == {SIGNAL, PINNED}
    assert (defs[SIGNAL]["model_name"], defs[SIGNAL]["model_ref"]) == (MODEL, "@production")
    assert defs[SIGNAL]["symbols"] == [A, B]
    assert defs[SIGNAL]["status"] == "active"
    assert defs[SIGNAL]["policy"]["threshold"] == 0.52
    assert (defs[PINNED]["model_ref"], defs[PINNED]["symbols"]) == ("1", [])

    # backfill, window mode (both of the signal's symbols); start given with an offset
    start = np.datetime_as_string(ws.ts[100] + np.timedelta64(2, "h"), unit="s") + "+02:00"
    window = ["backfill", "--signal", SIGNAL, "--interval", INTERVAL, "--mode", "window",
              "--start", start, "--end", t(779)]
    first = _by_symbol(ok_json(home, *window))
    assert first[A]["rows_written"] == 680 and first[A]["rows_skipped_missing_features"] == 0
    assert first[B]["rows_written"] == 650 and first[B]["rows_skipped_missing_features"] == 30
    assert (first[A]["start"], first[A]["end"]) == (t(100), t(779))
    assert sum(first[A]["actions"].values()) == 680
    assert len(first[A]["actions"]) > 1, f"a degenerate model: {first[A]['actions']}"

    # the same window again: upserts
    again = _by_symbol(ok_json(home, *window))
    for symbol in SYMBOLS:
        for key in ("rows_written", "rows_skipped_missing_features", "actions"):
            assert again[symbol][key] == first[symbol][key], (symbol, key)

    # last mode: continues after the newest signal; a second run has nothing to do
    last = ["backfill", "--signal", SIGNAL, "--interval", INTERVAL, "--mode", "last"]
    cont = _by_symbol(ok_json(home, *last))
    assert cont[A]["rows_written"] == BARS - 780
    assert cont[B]["rows_written"] == 0
    assert [r["rows_written"] for r in ok_json(home, *last)] == [0, 0]

    # ts-list mode: one bar with features, one without (the refused file added none)
    listed_ts = ok_json(home, "backfill", "--signal", SIGNAL, "--interval", INTERVAL,
                        "--symbol", B, "--mode", "ts-list", "--ts", t(50), "--ts", t(765))
    assert len(listed_ts) == 1
    assert listed_ts[0]["rows_written"] == 1
    assert listed_ts[0]["rows_skipped_missing_features"] == 1

    # the history: every bar once, nothing twice
    rows = _history(home)
    _assert_unique(rows)
    by_symbol = {s: {r["ts"]: r for r in rows if r["symbol"] == s} for s in SYMBOLS}
    assert set(by_symbol[A]) == {t(i) for i in range(100, BARS)}
    assert set(by_symbol[B]) == {t(i) for i in (50, *range(100, EXTRA_B[1]))}
    assert len(rows) == (BARS - 100) + (EXTRA_B[1] - 100) + 1
    assert by_symbol[B][t(720)]["feature_key"] == "extra-v1"
    assert by_symbol[B][t(600)]["feature_key"] == imported["feature_key"]
    assert {r["model_sha256"] for r in rows} == {sha}

    # predict one bar: the same signal as the backfill wrote for that bar (a non-hold one)
    i = next(j for j in range(150, BARS) if by_symbol[A][t(j)]["action"] != "hold")
    row = by_symbol[A][t(i)]
    predict = ["predict", "--signal", SIGNAL, "--symbol", A, "--interval", INTERVAL, "--ts", t(i)]
    predicted = ok_json(home, *predict)
    assert predicted["ts"] == row["ts"] == t(i)  # one timestamp format on every command
    assert predicted["action"] == row["action"]
    assert predicted["confidence"] == row["confidence"]
    assert predicted["raw_output"] == row["raw_output"]
    assert (predicted["model_version"], predicted["model_sha256"]) == (1, sha)
    for level in ("entry_price", "stop_loss", "take_profit", "recommended_size"):
        assert predicted[level] is not None and predicted[level] == row[level], level

    # lifecycle refusals (a signal pinned to the retired version); the predict above upserted
    # its row, it did not add one
    ok(home, "models", "retire", f"{MODEL}:1")
    message = refused(home, "model_lifecycle_refused", "predict", "--signal", PINNED, "--symbol",
                      A, "--interval", INTERVAL, "--ts", t(i))
    assert "retired" in message
    ok(home, "signals", "retire", SIGNAL)
    refused(home, "signal_retired", *predict)
    assert len(_history(home)) == len(rows)


def _write_no_ts(tmp: Path) -> Path:
    return _write_csv(pa.table({"symbol": ["X", "X"], "f": [1.0, 2.0]}), tmp / "no_ts.csv")


def _write_junk(tmp: Path) -> Path:
    path = tmp / "model.bin"
    path.write_bytes(b"\x01" + np.random.default_rng(3).bytes(2048))
    return path


BAD_INPUT: dict[str, tuple[str, Callable[[Path], list[str]]]] = {
    "unknown signal": ("signal_not_found", lambda tmp: [
        "predict", "--signal", "nope", "--symbol", A, "--interval", "1h",
        "--ts", "2024-01-01T00:00:00Z"]),
    "unknown model": ("model_not_found", lambda tmp: ["models", "show", "nope:1"]),
    "malformed timestamp": ("validation_error", lambda tmp: [
        "predict", "--signal", "nope", "--symbol", A, "--interval", "1h",
        "--ts", "2024-02-30T10:00:00Z"]),
    "wrong interval": ("validation_error", lambda tmp: [
        "backfill", "--signal", "nope", "--interval", "7x", "--start", "2024-01-01",
        "--end", "2024-01-02"]),
    "end before start": ("validation_error", lambda tmp: [  # refused before the signal lookup
        "backfill", "--signal", "nope", "--interval", "1h", "--start", "2024-01-02",
        "--end", "2024-01-01T23:00:00Z"]),
    "unknown model format": ("validation_error", lambda tmp: [
        "models", "register", str(_write_junk(tmp)), "--name", "junk"]),
    "feature file without ts": ("validation_error", lambda tmp: [
        "features", "import", str(_write_no_ts(tmp)), "--interval", "1h"]),
    "missing required option": ("validation_error", lambda tmp: [
        "signals", "create", "--id", "x", "--interval", "1h"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line(case: str, tmp_path: Path) -> None:
    code, make_args = BAD_INPUT[case]
    message = refused(tmp_path / "home", code, *make_args(tmp_path))
    assert message.strip()


def test_demo_runs_twice_in_the_same_home(tmp_path: Path) -> None:
    """The demo trains through the pipeline (TA-Lib spec, MLflow): the spec's warm-up bars have no
    feature row, so each symbol gets a signal for every bar after it."""
    pytest.importorskip("talib")
    from sigserve.demo.run import DEMO_FEATURES
    from sigserve.features.spec import FeatureSpec

    warmup = FeatureSpec.from_dict(DEMO_FEATURES).warmup
    home = tmp_path / "home"
    for _ in range(2):
        out = ok(home, "demo", "--no-serve", "--bars", "1500")
        assert "hit rate" in out
        for symbol in ("BTCUSDT", "ETHUSDT", "SOLUSDT"):
            assert symbol in out
        assert f"backfilled {3 * (1500 - warmup)} signals" in out
    models = ok_json(home, "models", "list")
    assert [(m["name"], m["version"], m["stage"]) for m in models] == \
        [("demo-trend", 1, "production")]
    rows = ok_json(home, "signals", "history", "demo-trend-1h", "--limit", "100000")
    assert len(rows) == 3 * (1500 - warmup)
    keys = [(r["symbol"], r["ts"]) for r in rows]
    assert len(set(keys)) == len(keys)


def test_db_upgrade_creates_the_schema_and_is_idempotent(tmp_path: Path) -> None:
    home = tmp_path / "fresh-home"
    first = ok(home, "db", "upgrade")
    assert "schema version" in first
    version = int(first.strip().split()[-1])
    assert version >= 2  # DuckDB: the base schema plus feature coverage
    assert (home / "sigserve.duckdb").is_file()
    assert ok(home, "db", "upgrade") == first  # nothing pending the second time


def test_the_cli_imports_rich_only_to_print() -> None:
    """rich costs ~40-100 ms of every start; ``sigserve serve`` (cold start < 1 s) prints nothing
    through it, so the CLI module must not import it until a command prints."""
    code = ("import sys, sigserve.cli, sigserve.api.server; "
            "print('rich' in sys.modules); sigserve.cli.console.get(); print('rich' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
