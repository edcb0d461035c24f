"""One feature definition for training, backfill and live bars: the ``features:`` section of a
pipeline YAML.

.. code-block:: yaml

    features:
      indicators:                       # TA-Lib functions by name and parameters
        - {name: RSI, timeperiod: 14}   # column rsi_14
        - {name: ATR, timeperiod: 14}   # column atr_14
        - {name: BBANDS, timeperiod: 20}            # bbands_20_upperband, _middleband, _lowerband
        - {name: SMA, timeperiod: 20, input: volume, column: volume_sma_20}
      candles: [body_size, body_direction, upper_wick, lower_wick, wick_ratio, body_to_range, gap, range]
      custom:                           # a function of the candle frame returning one column
        - {function: "mypkg.features:dollar_volume", name: dollar_volume, lookback: 0}

Columns are named ``{indicator}_{params}``: every ``*period`` parameter in TA-Lib's order, and any
other parameter that differs from its default (``bbands_20_2.5``); a function with several outputs
adds the output's name. ``column:`` overrides the base name.

**One code path.** :meth:`FeatureSpec.compute` runs each step over a whole history;
:meth:`FeatureSpec.compute_last` runs the *same* step functions over the last ``window`` candles
of each step and keeps the newest value. A step's window is its lookback plus one bar plus a
convergence tail: TA-Lib's recursive indicators (EMA, Wilder's RSI/ATR/ADX, ...) depend on where
the history starts with a memory of ``(1 - alpha)**k``. The tail is measured once, when the spec
is built (the smallest multiple of p, the largest period, from 0 to 64p, after which a window
agrees with the whole history to 1e-13 on a random-walk market), so the newest bar computed from
the last N candles equals the batch value to 1e-9 (``tests/unit/test_spec.py`` proves it on every
bar of a spec of 29 TA-Lib indicators, the candle features and a custom feature). A cumulative
indicator (OBV, AD, ...) never converges and is refused.

**Point in time.** Row ``i`` uses candles ``0..i`` only (a lookahead test perturbs future bars);
:func:`closed_bars` drops candles that have not closed yet.

**Warm-up.** ``warmup`` is the largest lookback: rows before it hold NaN and
:meth:`FeatureFrame.complete` drops them (and any other row with a NaN), counting them.

**Identity.** ``spec_hash`` is the sha256 of the canonical spec (every parameter filled in);
``feature_key`` = ``spec-<hash[:16]>`` names the rows it writes, and model cards record both.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ValidationError, missing_extra
from ..timeutil import TS_DTYPE, interval_us
from .candles import CANDLE_FEATURES, CANDLE_FUNCTIONS, CANDLE_LOOKBACK, candle_features

log = logging.getLogger("sigserve.features")

SPEC_FORMAT = 1
PRICE_COLUMNS = ("open", "high", "low", "close", "volume")
_TAILS = (0, 1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64)  # tails tried, x the largest period
_CALIBRATION_RTOL = 1e-13

Arrays = dict[str, np.ndarray]


def import_talib() -> Any:
    """TA-Lib, or a ``validation_error`` naming what to install."""
    try:
        import talib
        from talib import abstract  # noqa: F401
    except ImportError as exc:
        raise missing_extra("talib", "ta") from exc
    return talib


# --- steps ---------------------------------------------------------------------------------------
class _Step:
    """One entry of the spec: ``compute`` gives its columns over a history, ``last`` the newest
    value of each from the same function run on the last ``window`` candles."""

    names: tuple[str, ...]
    needs: tuple[str, ...] = ("ts", *PRICE_COLUMNS)  # the candle columns compute() reads
    lookback: int  # leading rows that are NaN
    window: int  # candles the newest value needs (lookback + 1 + convergence tail)
    canonical: dict[str, Any]

    def compute(self, a: Arrays) -> list[np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def last(self, a: Arrays, lo: int) -> list[float]:
        """The newest value of each column, computed over the candles ``lo..`` of ``a``."""
        part = a if lo == 0 else {c: a[c][lo:] for c in self.needs}
        return [float(column[-1]) for column in self.compute(part)]


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class _TalibStep(_Step):
    def __init__(self, entry: Mapping[str, Any]) -> None:
        talib = import_talib()
        abstract: Any = importlib.import_module("talib.abstract")

        entry = dict(entry)
        raw_name = entry.pop("name", None)
        if not isinstance(raw_name, str) or not raw_name:
            raise ValidationError("an indicator needs a TA-Lib function name, e.g. {name: RSI}",
                                  details={"entry": entry})
        name = raw_name.upper()
        if name not in talib.get_functions() or not hasattr(talib, name):
            raise ValidationError(f"unknown TA-Lib function {raw_name!r}",
                                  details={"name": raw_name, "known_examples": ["RSI", "ATR", "EMA",
                                                                               "MACD", "BBANDS"]})
        info = abstract.Function(name).info
        column = entry.pop("column", None)
        price_input = entry.pop("input", None)
        window_override = entry.pop("window", None)
        defaults: dict[str, Any] = dict(info["parameters"])
        unknown = sorted(set(entry) - set(defaults))
        if unknown:
            raise ValidationError(f"{name} has no parameters {unknown}; it takes {sorted(defaults)}",
                                  details={"name": name, "unknown": unknown,
                                           "parameters": sorted(defaults)})
        params: dict[str, Any] = {}
        for key, default in defaults.items():
            value = entry.get(key, default)
            if isinstance(default, int) and not isinstance(value, bool):
                if not isinstance(value, int | float) or float(value) != int(value):
                    raise ValidationError(f"{name}.{key} must be an integer, got {value!r}",
                                          details={"name": name, "parameter": key})
                value = int(value)
            elif isinstance(default, float):
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise ValidationError(f"{name}.{key} must be a number, got {value!r}",
                                          details={"name": name, "parameter": key})
                value = float(value)
            params[key] = value
        inputs: list[str] = []
        for slot, cols in info["input_names"].items():
            wanted = [cols] if isinstance(cols, str) else list(cols)
            if price_input is not None and slot == "price":
                wanted = [str(price_input)]
            inputs.extend(wanted)
        bad = [c for c in inputs if c not in PRICE_COLUMNS]
        if bad:
            raise ValidationError(f"{name}: unknown input columns {bad}; use {list(PRICE_COLUMNS)}",
                                  details={"name": name, "inputs": inputs})
        self.name = name
        # talib wraps each function to accept pandas/polars Series (~2 µs of isinstance checks
        # per call, a fifth of a live bar's features); sigserve passes numpy arrays only, so it
        # calls the C function under the wrapper (``functools.wraps`` keeps it as __wrapped__).
        wrapped: Callable[..., Any] = getattr(talib, name)
        self.fn: Callable[..., Any] = getattr(wrapped, "__wrapped__", wrapped)
        self.params = params
        self.args = tuple(params.values())  # TA-Lib's own parameter order: positional is cheaper
        self.inputs = tuple(inputs)
        self.needs = tuple(dict.fromkeys(inputs))
        parts = [_fmt(v) for k, v in params.items() if k.endswith("period")]
        parts += [_fmt(v) for k, v in params.items()
                  if not k.endswith("period") and v != defaults[k]]
        base = str(column) if column else "_".join([name.lower(), *parts])
        outputs = list(info["output_names"])
        self.names = (base,) if len(outputs) == 1 else tuple(f"{base}_{o}" for o in outputs)
        function = abstract.Function(name)
        function.set_parameters(params)
        self.lookback = int(function.lookback)
        period = max([int(v) for k, v in params.items() if k.endswith("period")] + [1])
        if window_override is not None:
            if not isinstance(window_override, int) or window_override < self.lookback + 1:
                raise ValidationError(f"{name}: window must be an integer >= {self.lookback + 1}",
                                      details={"name": name, "window": window_override})
            self.window = int(window_override)
        else:
            self.window = self.lookback + 1 + self._calibrate(period)
        self.canonical = {"kind": "talib", "name": name, "params": params,
                          "inputs": list(self.inputs), "columns": list(self.names)}
        if column:
            self.canonical["column"] = str(column)
        if price_input is not None:
            self.canonical["input"] = str(price_input)
        if window_override is not None:
            self.canonical["window"] = self.window

    def compute(self, a: Arrays) -> list[np.ndarray]:
        out = self.fn(*[a[c] for c in self.inputs], *self.args)
        if isinstance(out, tuple | list):
            return [np.asarray(o, dtype=np.float64) for o in out]
        return [np.asarray(out, dtype=np.float64)]

    def last(self, a: Arrays, lo: int) -> list[float]:
        """The newest value(s): the same function as :meth:`compute`, on ``a[c][lo:]``."""
        out = self.fn(*[a[c][lo:] for c in self.inputs], *self.args)
        if isinstance(out, tuple | list):
            return [float(o[-1]) for o in out]
        return [float(out[-1])]

    def _calibrate(self, period: int) -> int:
        """The shortest convergence tail (in bars) after which the newest value of a window
        equals the whole history's, measured on a deterministic random-walk market.

        "Equals" is within 1e-13 relative, or within a few times the rounding noise that the
        longest window still shows (running sums round differently from one start to another);
        a difference that the longest window does not shrink below 1e-10 means the function is
        cumulative (OBV, AD, ...) and it is refused."""
        longest = self.lookback + 1 + _TAILS[-1] * period
        n = longest + 3 * period + 64
        market = _calibration_market(n)
        full = self.compute(market)
        ends = [end for end in (n, n - period - 1, n - 2 * period - 7) if end - longest >= 0]

        def gaps(w: int) -> list[float]:
            out = []
            for end in ends:
                part = self.compute({k: v[end - w:end] for k, v in market.items()})
                for whole, piece in zip(full, part, strict=True):
                    x, y = float(whole[end - 1]), float(piece[-1])
                    if math.isnan(x) and math.isnan(y):
                        out.append(0.0)
                    elif math.isnan(x) or math.isnan(y):
                        out.append(math.inf)
                    else:
                        out.append(abs(x - y) / max(1.0, abs(x)))
            return out

        floor = gaps(longest)
        if max(floor, default=0.0) > 1e-10:
            raise ValidationError(
                f"{self.name} depends on the whole history (it is cumulative or converges too"
                " slowly): it cannot be computed for a live bar from the last N candles. Use"
                " another indicator, or give it an explicit `window:` and check parity yourself",
                details={"name": self.name})
        for multiple in _TAILS:
            got = gaps(self.lookback + 1 + multiple * period)
            if all(g <= max(_CALIBRATION_RTOL, 4.0 * f) for g, f in zip(got, floor, strict=True)):
                return multiple * period
        return _TAILS[-1] * period


_MARKET_CACHE: dict[int, Arrays] = {}


def _calibration_market(n: int) -> Arrays:
    cached = _MARKET_CACHE.get(n)
    if cached is not None:
        return cached
    rng = np.random.default_rng(20240607)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, n)))
    open_ = np.r_[close[0], close[:-1]] * np.exp(rng.normal(0.0, 0.001, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0.0, 0.004, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0.0, 0.004, n)))
    volume = rng.lognormal(10.0, 0.5, n)
    market = {"open": open_, "high": high, "low": low, "close": close, "volume": volume,
              "ts": np.arange(n, dtype=np.int64).astype("datetime64[h]").astype(TS_DTYPE)}
    if len(_MARKET_CACHE) > 32:
        _MARKET_CACHE.clear()
    _MARKET_CACHE[n] = market
    return market


class _CandleStep(_Step):
    """The candle features of the spec, in its order, computed in one pass."""

    needs = ("open", "high", "low", "close")

    def __init__(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in CANDLE_FUNCTIONS]
        if unknown:
            raise ValidationError(f"unknown candle feature {unknown[0]!r}; use {list(CANDLE_FEATURES)}",
                                  details={"name": unknown[0], "known": list(CANDLE_FEATURES)})
        self.names = tuple(names)
        self.lookback = max(CANDLE_LOOKBACK[n] for n in names)
        self.window = self.lookback + 1
        self.canonical = {"kind": "candles", "names": list(self.names)}

    def compute(self, a: Arrays) -> list[np.ndarray]:
        return candle_features(a, self.names)


class _CustomStep(_Step):
    def __init__(self, entry: Mapping[str, Any]) -> None:
        entry = dict(entry)
        target = entry.get("function")
        if not isinstance(target, str) or ":" not in target:
            raise ValidationError("a custom feature needs function: 'package.module:function'",
                                  details={"entry": entry})
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValidationError(f"cannot import {module_name!r} for custom feature {target!r}: {exc}",
                                  details={"function": target}) from exc
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ValidationError(f"{target!r}: {module_name} has no function {attr!r}",
                                  details={"function": target})
        name = entry.get("name") or attr
        lookback = entry.get("lookback", 0)
        window = entry.get("window")
        params = entry.get("params", {}) or {}
        if not isinstance(lookback, int) or lookback < 0:
            raise ValidationError(f"custom feature {name}: lookback must be an integer >= 0",
                                  details={"name": name})
        if window is not None and (not isinstance(window, int) or window < lookback + 1):
            raise ValidationError(f"custom feature {name}: window must be an integer >= lookback + 1",
                                  details={"name": name})
        if not isinstance(params, dict):
            raise ValidationError(f"custom feature {name}: params must be a mapping",
                                  details={"name": name})
        self.fn = fn
        self.params = params
        self.names = (str(name),)
        self.lookback = int(lookback)
        self.window = int(window) if window is not None else self.lookback + 1
        self.canonical = {"kind": "custom", "function": target, "name": str(name),
                          "lookback": self.lookback, "window": self.window, "params": params}

    def compute(self, a: Arrays) -> list[np.ndarray]:
        out = np.asarray(self.fn(a, **self.params), dtype=np.float64)
        n = a["close"].shape[0]
        if out.shape != (n,):
            raise ValidationError(f"custom feature {self.names[0]} returned shape {out.shape},"
                                  f" expected ({n},)", details={"name": self.names[0]})
        return [out]


# --- the spec ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureFrame:
    """Feature rows of one symbol in ts order: ``values`` is ``(n, len(names))`` float64."""

    ts: np.ndarray
    values: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def complete(self) -> tuple[FeatureFrame, int]:
        """The rows with every value finite, and how many were dropped (the warm-up, mostly)."""
        keep = np.isfinite(self.values).all(axis=1)
        dropped = int(keep.shape[0] - keep.sum())
        if dropped == 0:
            return self, 0
        return FeatureFrame(self.ts[keep], self.values[keep], self.names), dropped

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.names.index(name)]


class FeatureSpec:
    """A parsed ``features:`` section. Build it once (it measures each indicator's window)."""

    def __init__(self, steps: Sequence[_Step]) -> None:
        if not steps:
            raise ValidationError("the feature spec is empty: list indicators, candles or custom")
        self.steps = tuple(steps)
        names: list[str] = []
        for step in self.steps:
            names.extend(step.names)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValidationError(f"the feature spec names columns twice: {duplicates}"
                                  " (give one of them a `column:`)", details={"duplicates": duplicates})
        self.names: tuple[str, ...] = tuple(names)
        self.warmup = max(step.lookback for step in self.steps)
        self.window = max(step.window for step in self.steps)
        self.canonical: dict[str, Any] = {"format": SPEC_FORMAT,
                                          "steps": [s.canonical for s in self.steps]}
        text = json.dumps(self.canonical, sort_keys=True, separators=(",", ":"))
        self.spec_hash = hashlib.sha256(text.encode()).hexdigest()
        self.feature_key = f"spec-{self.spec_hash[:16]}"
        self._source: dict[str, Any] = {}
        # the incremental path: per step, its window, the input columns it reads, and where its
        # outputs go in the row
        # outputs go in the row. TA-Lib steps are unrolled (function, inputs, parameters): the
        # same call as their compute(), without a method hop per bar.
        plan: list[tuple[Any, ...]] = []
        slot = 0
        for step in self.steps:
            width = len(step.names)
            if isinstance(step, _TalibStep):
                plan.append((None, step.window, slot, width, step.fn, step.inputs, step.args))
            else:
                plan.append((step, step.window, slot, width, None, (), ()))
            slot += width
        self._plan = tuple(plan)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> FeatureSpec:
        if not isinstance(section, Mapping):
            raise ValidationError("features: must be a mapping with indicators, candles, custom")
        unknown = sorted(set(section) - {"indicators", "candles", "custom"})
        if unknown:
            raise ValidationError(f"features: unknown keys {unknown}; use indicators, candles, custom",
                                  details={"unknown": unknown})
        steps: list[_Step] = []
        for entry in section.get("indicators") or []:
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, Mapping):
                raise ValidationError(f"features.indicators: each entry is a mapping, got {entry!r}")
            steps.append(_TalibStep(entry))
        candles = section.get("candles") or []
        if candles == "all":
            candles = list(CANDLE_FEATURES)
        if not isinstance(candles, list):
            raise ValidationError("features.candles: a list of names, or `all`")
        if candles:
            steps.append(_CandleStep([str(name) for name in candles]))
        for entry in section.get("custom") or []:
            if not isinstance(entry, Mapping):
                raise ValidationError(f"features.custom: each entry is a mapping, got {entry!r}")
            steps.append(_CustomStep(entry))
        spec = cls(steps)
        spec._source = dict(section)
        return spec

    @classmethod
    def from_yaml(cls, path: Path) -> FeatureSpec:
        """The ``features:`` section of a pipeline YAML (or a file that is only that section)."""
        data = load_yaml(path)
        section = data.get("features", data) if isinstance(data, dict) else data
        return cls.from_dict(section)

    def to_dict(self) -> dict[str, Any]:
        """What a model card records: the canonical steps (rebuildable with :meth:`from_card`)."""
        return {"format": SPEC_FORMAT, "hash": self.spec_hash, "feature_key": self.feature_key,
                "section": self.section(), "names": list(self.names), "warmup": self.warmup,
                "window": self.window}

    def section(self) -> dict[str, Any]:
        """The spec as a ``features:`` section (every parameter filled in)."""
        indicators, candles, custom = [], [], []
        for step in self.steps:
            c = step.canonical
            if c["kind"] == "talib":
                entry: dict[str, Any] = {"name": c["name"], **c["params"]}
                for key in ("column", "input", "window"):
                    if key in c:
                        entry[key] = c[key]
                indicators.append(entry)
            elif c["kind"] == "candles":
                candles.extend(c["names"])
            else:
                custom.append({k: v for k, v in c.items() if k != "kind"})
        return {"indicators": indicators, "candles": candles, "custom": custom}

    @classmethod
    def from_card(cls, data: Mapping[str, Any]) -> FeatureSpec:
        """Rebuild the spec a model card recorded, and check that its hash still matches."""
        spec = cls.from_dict(data["section"])
        if data.get("hash") and spec.spec_hash != data["hash"]:
            raise ValidationError(
                f"the model's feature spec rebuilds to another hash ({spec.spec_hash[:16]} instead"
                f" of {str(data['hash'])[:16]}): the code behind one of its features changed",
                details={"expected": data["hash"], "got": spec.spec_hash})
        return spec

    # --- computation ----------------------------------------------------------------------------
    def compute(self, candles: Any, *, validate: bool = True) -> FeatureFrame:
        """Every feature for every bar of one symbol's history (ts ascending)."""
        a = candle_arrays(candles, validate=validate)
        n = a["close"].shape[0]
        out = np.empty((len(self.names), n), dtype=np.float64)
        row = 0
        for step in self.steps:
            for column in step.compute(a):
                out[row] = column
                row += 1
        return FeatureFrame(a["ts"], out.T, self.names)

    def compute_last(self, candles: Any, *, validate: bool = True) -> np.ndarray:
        """The features of the newest bar from the last ``window`` candles: each step runs the
        same function as :meth:`compute` on its own last ``step.window`` candles.

        ``validate`` checks the newest candle (and that its ts follows the previous one): a live
        caller validated every earlier candle when it was the newest. :meth:`compute` checks all.
        """
        a = candle_arrays(candles, validate=False)
        n = a["close"].shape[0]
        if n == 0:
            return np.full(len(self.names), np.nan)
        if validate:
            _check_newest(a)
        row: list[float] = [math.nan] * len(self.names)
        for step, window, slot, width, fn, inputs, args in self._plan:
            lo = n - window if n > window else 0
            if fn is None:
                row[slot:slot + width] = step.last(a, lo)
            elif width == 1:
                row[slot] = fn(*[a[c][lo:] for c in inputs], *args)[-1]
            else:
                out = fn(*[a[c][lo:] for c in inputs], *args)
                row[slot:slot + width] = [o[-1] for o in out]
        return np.array(row, dtype=np.float64)


def _check_newest(a: Arrays) -> None:
    i = a["close"].shape[0] - 1
    o, h, lo, c, v = (float(a[k][i]) for k in PRICE_COLUMNS)
    if not (math.isfinite(o) and math.isfinite(h) and math.isfinite(lo) and math.isfinite(c)
            and math.isfinite(v) and 0.0 < lo <= min(o, c) and h >= max(o, c) and v >= 0.0):
        raise ValidationError("inconsistent newest candle (need finite values, 0 < low <= open,"
                              " close <= high, volume >= 0)", details={"index": i})
    if i > 0 and not a["ts"][i] > a["ts"][i - 1]:
        raise ValidationError("the newest candle's ts does not follow the previous one",
                              details={"index": i})


def load_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - PyYAML is a core dependency
        raise missing_extra("yaml", "train") from exc
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"no such file: {path}", details={"path": str(path)})
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValidationError(f"{path.name} is not valid YAML: {exc}", details={"path": str(path)}) from exc


def candle_arrays(candles: Any, *, validate: bool = True) -> Arrays:
    """A ``Candles`` or a mapping of ts/open/high/low/close/volume as contiguous float64 arrays."""
    if isinstance(candles, Mapping):
        get = candles.__getitem__
        missing = [k for k in ("ts", *PRICE_COLUMNS) if k not in candles]
        if missing:
            raise ValidationError(f"the candles lack the columns {missing}", details={"missing": missing})
    else:
        def get(key: str) -> Any:
            return getattr(candles, key)
    a: Arrays = {k: np.ascontiguousarray(get(k), dtype=np.float64) for k in PRICE_COLUMNS}
    a["ts"] = np.asarray(get("ts")).astype(TS_DTYPE, copy=False)
    if validate:
        n = a["ts"].shape[0]
        if any(a[k].shape != (n,) for k in PRICE_COLUMNS):
            raise ValidationError("candle columns must be 1-D arrays of one length")
        if n:
            o, h, lo, c, v = (a[k] for k in PRICE_COLUMNS)
            with np.errstate(invalid="ignore"):
                bad = ~(np.isfinite(o) & np.isfinite(h) & np.isfinite(lo) & np.isfinite(c)
                        & np.isfinite(v) & (lo > 0) & (lo <= np.minimum(o, c)) & (h >= np.maximum(o, c))
                        & (v >= 0))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValidationError(
                    f"inconsistent candle #{i} (need finite values, 0 < low <= open, close <= high,"
                    " volume >= 0)", details={"index": i, "bad_rows": int(bad.sum())})
            if n > 1 and not bool(np.all(a["ts"][1:] > a["ts"][:-1])):
                raise ValidationError("candle ts must be strictly increasing (one symbol, in order)")
    return a


def closed_bars(candles: Any, interval: str, now: np.datetime64 | None = None) -> Arrays:
    """Only the bars that have closed by ``now`` (open time + interval <= now): a feature never
    sees a bar still forming."""
    a = candle_arrays(candles, validate=False)
    if now is None:
        import time

        now = np.datetime64(time.time_ns() // 1000, "us")
    cutoff = np.asarray(now, dtype=TS_DTYPE) - np.timedelta64(interval_us(interval), "us")
    keep = int(np.searchsorted(a["ts"], cutoff, side="right"))
    if keep == a["ts"].shape[0]:
        return a
    return {k: v[:keep] for k, v in a.items()}
