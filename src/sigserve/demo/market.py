"""A synthetic but realistic market, for ``sigserve demo`` and for tests.

The price process has three hidden layers:

- a **regime** Markov chain (bull, bear, sideways) with persistence: regimes last days to weeks,
  and each has its own drift and volatility level;
- **GARCH(1,1)** volatility clustering on fat-tailed (Student-t) shocks;
- **intraday and weekly seasonality** of volatility and volume (for intervals shorter than a day).

Bars are consistent: ``low <= min(open, close) <= max(open, close) <= high``, every price > 0, and
each bar opens at the previous close except for rare small gaps. Highs and lows are drawn from the
exact distribution of a Brownian bridge's extremes between the bar's open and close, so ranges are
in scale with volatility. Volume rises with volatility, with the size of the move, and with the
time of day.

Everything is deterministic given ``(symbol, seed)``: with no seed, the seed is the CRC-32 of the
symbol. An explicit seed is mixed with the symbol, so one ``--seed`` gives different paths for
different symbols.

Usage::

    data = generate_ohlcv("BTCUSDT", "1h", start="2023-01-01", bars=17520)
    write_csv("data/BTCUSDT_1h.csv", data)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ValidationError
from ..timeutil import TS_DTYPE, interval_us, parse_ts

OHLCV_COLUMNS = ("ts", "open", "high", "low", "close", "volume")

BULL, BEAR, SIDEWAYS = 0, 1, 2
REGIMES = ("bull", "bear", "sideways")

_HOUR_US = 3_600_000_000
_DAY_US = 24 * _HOUR_US
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)

# Per regime: mean duration in hours, drift in units of the bar's own volatility, volatility level.
_REGIME_HOURS = np.array([24.0 * 21, 24.0 * 14, 24.0 * 10])
_REGIME_DRIFT = np.array([0.05, -0.06, 0.0])
_REGIME_VOL = np.array([0.9, 1.35, 0.75])
# Where a regime goes when it ends (rows: from; columns: to; the diagonal is never used).
_REGIME_NEXT = np.array([[0.0, 0.35, 0.65], [0.45, 0.0, 0.55], [0.5, 0.5, 0.0]])

_GARCH_ALPHA = 0.07
_GARCH_BETA = 0.91
_T_DOF = 5.0
_GAP_PROB = 0.01
_MA_THETA = -0.06  # MA(1) shocks: a little short-term mean reversion (bid-ask bounce, overshoot)
_FLOW_KAPPA = 0.014  # trend-following flow: drift from the sum of the last _FLOW_BARS shocks
_FLOW_BARS = 24


@dataclass(frozen=True)
class MarketPath:
    """The generated bars plus the hidden state that produced them (for tests and notebooks)."""

    ohlcv: dict[str, np.ndarray]
    regime: np.ndarray  # int8 per bar: BULL, BEAR or SIDEWAYS
    sigma: np.ndarray  # float64 per bar: the conditional volatility of the bar's log return


def default_seed(symbol: str) -> int:
    """The stable seed of a symbol (CRC-32 of its UTF-8 name), the same on every platform."""
    return zlib.crc32(symbol.encode("utf-8"))


def generate_ohlcv(
    symbol: str,
    interval: str = "1h",
    start: str = "2023-01-01",
    bars: int = 17520,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Synthetic OHLCV bars for one symbol.

    Returns ``{"ts", "open", "high", "low", "close", "volume"}``: ``ts`` is ``datetime64[us]``
    (UTC, bar open times aligned to the interval; a ``start`` inside a bar is floored to that bar's
    open), the others float64. Raises :class:`~sigserve.errors.ValidationError` for a bad interval,
    start or bar count.
    """
    return simulate_market(symbol, interval, start, bars, seed).ohlcv


def simulate_market(
    symbol: str,
    interval: str = "1h",
    start: str = "2023-01-01",
    bars: int = 17520,
    seed: int | None = None,
) -> MarketPath:
    """:func:`generate_ohlcv` plus the hidden regime and volatility path."""
    step_us = interval_us(interval)
    if isinstance(bars, bool) or not isinstance(bars, int | np.integer) or bars < 1:
        raise ValidationError(f"bars must be a positive integer, got {bars!r}",
                              details={"bars": repr(bars)})
    n = int(bars)
    start_us = int(parse_ts(start, field="start").astype(np.int64))
    start_us -= start_us % step_us
    ts_us = start_us + np.arange(n, dtype=np.int64) * step_us
    ts = ts_us.astype(TS_DTYPE)

    entropy = [default_seed(symbol)] if seed is None else [default_seed(symbol), int(seed)]
    rng = np.random.default_rng(np.random.SeedSequence(entropy))

    hours_per_bar = step_us / _HOUR_US
    # Per-symbol character: price level, volatility and liquidity.
    price0 = float(np.exp(rng.uniform(np.log(5.0), np.log(50_000.0))))
    hourly_vol = float(rng.uniform(0.004, 0.009))
    base_vol = hourly_vol * np.sqrt(hours_per_bar)
    notional = float(np.exp(rng.uniform(np.log(2e6), np.log(5e7)))) * hours_per_bar

    regime = _regimes(rng, n, hours_per_bar)
    vol_season, volume_season = _seasonality(ts_us, step_us)

    # GARCH(1,1) on unit-variance Student-t shocks: h_t = w + (a z_{t-1}^2 + b) h_{t-1}.
    z = rng.standard_t(_T_DOF, size=n) / np.sqrt(_T_DOF / (_T_DOF - 2.0))
    h = _garch_variance(z)

    sigma = base_vol * _REGIME_VOL[regime] * vol_season * np.sqrt(h)
    drift = _REGIME_DRIFT[regime] * base_vol * _REGIME_VOL[regime]
    shock = sigma * z
    shock[1:] += _MA_THETA * shock[:-1]
    # Trend followers: a small drift in the direction of the recent move (past shocks only).
    past = np.concatenate(([0.0], np.cumsum(shock)))
    lagged = np.concatenate((np.zeros(_FLOW_BARS), past[:-_FLOW_BARS]))[: n + 1]
    drift = drift + _FLOW_KAPPA * (past[:-1] - lagged[:-1])
    ret = drift + shock - 0.5 * sigma**2  # log return, close to close

    # Rare small opening gaps: part of the close-to-close return happens between bars.
    gap = np.where(rng.random(n) < _GAP_PROB, rng.normal(0.0, 0.25, n) * sigma, 0.0)
    intrabar = ret - gap

    log_close = np.log(price0) + np.cumsum(ret)
    log_open = np.empty(n)
    log_open[0] = np.log(price0) + gap[0]
    log_open[1:] = log_close[:-1] + gap[1:]

    # Extremes of a Brownian bridge from 0 to b with variance s^2 (exact inverse-CDF draws):
    # P(max > m) = exp(-2 m (m - b) / s^2) for m >= max(0, b); the minimum by symmetry.
    var = sigma**2
    u_hi = 1.0 - rng.random(n)  # in (0, 1]
    u_lo = 1.0 - rng.random(n)
    up = 0.5 * (intrabar + np.sqrt(intrabar**2 - 2.0 * var * np.log(u_hi)))
    down = 0.5 * (intrabar - np.sqrt(intrabar**2 - 2.0 * var * np.log(u_lo)))

    open_ = np.exp(log_open)
    close = np.exp(log_close)
    high = np.maximum(np.exp(log_open + up), np.maximum(open_, close))
    low = np.minimum(np.exp(log_open + down), np.minimum(open_, close))

    # Volume: liquidity x seasonality x volatility level x size of the move x noise.
    move = np.abs(intrabar) / np.maximum(sigma, 1e-12)
    volume = (
        notional / price0
        * volume_season
        * np.array([1.0, 1.25, 0.8])[regime]
        * (0.35 + 0.65 * np.sqrt(h))
        * (0.6 + 0.4 * move)
        * rng.lognormal(-0.045, 0.3, n)
    )

    ohlcv = {"ts": ts, "open": open_, "high": high, "low": low, "close": close, "volume": volume}
    return MarketPath(ohlcv=ohlcv, regime=regime.astype(np.int8), sigma=sigma)


def _regimes(rng: np.random.Generator, n: int, hours_per_bar: float) -> np.ndarray:
    """A persistent Markov chain of regimes, drawn as geometric run lengths (exact, vectorised)."""
    stay = np.exp(-hours_per_bar / _REGIME_HOURS)  # per-bar probability of staying
    states: list[int] = []
    lengths: list[int] = []
    state = int(rng.integers(0, 3))
    total = 0
    while total < n:
        length = int(rng.geometric(1.0 - stay[state]))
        states.append(state)
        lengths.append(length)
        total += length
        state = int(rng.choice(3, p=_REGIME_NEXT[state]))
    return np.repeat(np.array(states, dtype=np.int64), lengths)[:n]


def _garch_variance(z: np.ndarray) -> np.ndarray:
    """Unit-mean GARCH(1,1) variance path; a recursion, so one tight loop over Python floats."""
    omega = 1.0 - _GARCH_ALPHA - _GARCH_BETA
    mult = (_GARCH_ALPHA * z * z + _GARCH_BETA).tolist()
    out = [1.0] * len(mult)
    h = 1.0
    for i in range(1, len(mult)):
        h = omega + mult[i - 1] * h
        out[i] = h
    return np.array(out)


def _seasonality(ts_us: np.ndarray, step_us: int) -> tuple[np.ndarray, np.ndarray]:
    """Intraday (and weekend) factors for volatility and volume, each with mean about 1."""
    n = ts_us.shape[0]
    if step_us >= _DAY_US:
        weekday = (ts_us // _DAY_US + _EPOCH_WEEKDAY) % 7
        weekend = np.where(weekday >= 5, 0.7, 1.0) if step_us == _DAY_US else np.ones(n)
        return np.ones(n), weekend
    hour = ((ts_us % _DAY_US) + step_us / 2) / _HOUR_US  # the bar's middle, in hours of the day
    # Busy at the European open (~8h) and the US session (~14-16h UTC), quiet in the late evening.
    shape = (
        1.0
        + 0.55 * np.exp(-0.5 * ((hour - 14.5) / 2.2) ** 2)
        + 0.3 * np.exp(-0.5 * ((hour - 8.0) / 1.6) ** 2)
        - 0.25 * np.exp(-0.5 * ((hour - 22.0) / 2.5) ** 2)
    )
    shape = shape / 1.15
    weekday = (ts_us // _DAY_US + _EPOCH_WEEKDAY) % 7
    weekend = np.where(weekday >= 5, 0.7, 1.0)
    return np.sqrt(shape) * np.where(weekend < 1.0, 0.9, 1.0), shape * weekend


def write_csv(path: str | Path, data: dict[str, np.ndarray]) -> Path:
    """Write bars as CSV with the header ``ts,open,high,low,close,volume`` (ts as ISO 8601 ``Z``).

    Parent folders are created. Floats are written in their shortest exact form.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    missing = [c for c in OHLCV_COLUMNS if c not in data]
    if missing:
        raise ValidationError(f"OHLCV data lacks the columns {missing}",
                              details={"missing": missing})
    ts = np.asarray(data["ts"]).astype(TS_DTYPE)
    ts_text = np.char.add(np.datetime_as_string(ts, unit="s"), "Z")
    columns = {"ts": pa.array(ts_text, type=pa.string())}
    for name in OHLCV_COLUMNS[1:]:
        columns[name] = pa.array(np.asarray(data[name], dtype=np.float64))
    table = pa.table(columns)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as fh:
        fh.write((",".join(OHLCV_COLUMNS) + "\n").encode())
        pacsv.write_csv(table, fh, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    return out
