"""Signal policy (sigserve.signals.policy): decisions per task, levels, sizing, class maps and the
position-aware resolution of raw buys and sells into closes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from sigserve.domain import (
    BUY,
    CLOSE_LONG,
    CLOSE_SHORT,
    FLAT,
    HOLD,
    LONG,
    SELL,
    SHORT,
    ModelCard,
    Policy,
    Task,
)
from sigserve.errors import ValidationError
from sigserve.signals.policy import PolicyPlan, default_class_actions, resolve_one, resolve_positions

NAMES = ("ret_1", "atr_14", "rsi_14")


def card(task: Task, classes: tuple[str, ...] = (), names: tuple[str, ...] = NAMES) -> ModelCard:
    if task is Task.BINARY and not classes:
        classes = ("0", "1")
    return ModelCard(name="m", version=1, flavor="lightgbm", sha256="0" * 64,
                     artifact_path="artifacts/00/x.txt", task=task, feature_names=names,
                     classes=classes)


def plan(task: Task = Task.BINARY, classes: tuple[str, ...] = (), names: tuple[str, ...] = NAMES,
         **policy: Any) -> PolicyPlan:
    return PolicyPlan.build(Policy(**policy), card(task, classes, names), names)


def binary_output(p_up: list[float]) -> np.ndarray:
    p = np.asarray(p_up, dtype=np.float64)
    return np.column_stack([1.0 - p, p])


# --- decide: binary ------------------------------------------------------------------------------


def test_binary_threshold_both_sides_and_hold_band() -> None:
    p = plan(threshold=0.6)
    #                       sell  sell  hold  hold  hold  hold  buy   buy
    action, confidence = p.decide(binary_output([0.05, 0.39, 0.40, 0.5, 0.55, 0.60, 0.61, 0.99]))
    assert action.dtype == np.int8
    assert action.tolist() == [SELL, SELL, HOLD, HOLD, HOLD, HOLD, BUY, BUY]
    expected = [0.95, 0.61, 0.60, 0.5, 0.55, 0.60, 0.61, 0.99]
    np.testing.assert_allclose(confidence, expected, rtol=0, atol=1e-15)


def test_binary_confidence_is_the_larger_probability_and_nan_holds() -> None:
    p = plan(threshold=0.5)
    action, confidence = p.decide(binary_output([0.2, 0.8, np.nan]))
    assert action.tolist() == [SELL, BUY, HOLD]
    assert confidence[0] == confidence[1] == pytest.approx(0.8)
    assert confidence[2] == 0.0  # a NaN output is never confident
    assert np.all((confidence >= 0) & (confidence <= 1))


@pytest.mark.parametrize("threshold", [0.49, 1.0, 0.0])
def test_binary_threshold_out_of_range_refused(threshold: float) -> None:
    with pytest.raises(ValidationError) as err:
        plan(threshold=threshold)
    assert err.value.code == "validation_error"


def test_decide_empty_batch() -> None:
    action, confidence = plan().decide(np.empty((0, 2)))
    assert action.shape == (0,) and confidence.shape == (0,)


# --- decide: multiclass --------------------------------------------------------------------------


def test_multiclass_argmax_threshold_and_class_map() -> None:
    p = plan(Task.MULTICLASS, ("down", "flat", "up"), threshold=0.5)
    output = np.array([
        [0.1, 0.2, 0.7],    # up, confident -> buy
        [0.6, 0.3, 0.1],    # down -> sell
        [0.2, 0.7, 0.1],    # flat -> hold
        [0.45, 0.1, 0.45],  # down (first argmax) but under the threshold -> hold
        [0.3, 0.2, 0.5],    # exactly at the threshold: kept
    ])
    action, confidence = p.decide(output)
    assert action.tolist() == [BUY, SELL, HOLD, HOLD, BUY]
    assert confidence.tolist() == [0.7, 0.6, 0.7, 0.45, 0.5]


def test_multiclass_explicit_class_actions_override_names() -> None:
    # Labels that say nothing, mapped explicitly; the map may invert what the names would say.
    p = plan(Task.MULTICLASS, ("a", "b", "c"), threshold=0.0,
             class_actions={"a": "buy", "b": "hold", "c": "sell"})
    assert p.class_codes.tolist() == [BUY, HOLD, SELL]
    action, _ = p.decide(np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]]))
    assert action.tolist() == [BUY, SELL, HOLD]


def test_multiclass_refusals() -> None:
    with pytest.raises(ValidationError, match="cannot tell"):
        plan(Task.MULTICLASS, ("0", "1", "2"))
    with pytest.raises(ValidationError, match="lacks classes"):
        plan(Task.MULTICLASS, ("a", "b", "c"), class_actions={"a": "buy", "b": "sell"})
    with pytest.raises(ValidationError, match="buy, sell or hold only"):
        plan(Task.MULTICLASS, ("a", "b", "c"),
             class_actions={"a": "buy", "b": "sell", "c": "close_long"})
    with pytest.raises(ValidationError, match="probability"):
        plan(Task.MULTICLASS, ("down", "flat", "up"), threshold=1.5)
    with pytest.raises(ValidationError, match="unknown actions"):
        Policy(class_actions={"a": "moon"})


@pytest.mark.parametrize(("classes", "expected"), [
    (("down", "flat", "up"), ["sell", "hold", "buy"]),
    (("-1", "0", "1"), ["sell", "hold", "buy"]),
    (("1", "-1", "0"), ["buy", "sell", "hold"]),
    ((" UP ", "Bearish", "neutral"), ["buy", "sell", "hold"]),
    (("long", "short", "sideways", "none"), ["buy", "sell", "hold", "hold"]),
])
def test_default_class_actions_by_name(classes: tuple[str, ...], expected: list[str]) -> None:
    mapping = default_class_actions(classes)
    assert list(mapping) == list(classes)  # keyed by the labels as given
    assert [mapping[c] for c in classes] == expected


@pytest.mark.parametrize("classes", [("0", "1", "2"), ("a", "b", "c"), ("up", "down", "maybe"),
                                     ("0", "1")])
def test_default_class_actions_refuses_unknown_labels(classes: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as err:
        default_class_actions(classes)
    assert err.value.code == "validation_error"
    assert err.value.details["classes"] == list(classes)


# --- decide: regression --------------------------------------------------------------------------


def test_regression_threshold_both_sides() -> None:
    p = plan(Task.REGRESSION, threshold=0.01)
    action, confidence = p.decide(np.array([[0.02], [0.011], [0.01], [0.0], [-0.01], [-0.015],
                                            [-0.5], [np.nan]]))
    assert action.tolist() == [BUY, BUY, HOLD, HOLD, HOLD, SELL, SELL, HOLD]
    np.testing.assert_allclose(confidence, [1.0, 0.55, 0.5, 0.0, 0.5, 0.75, 1.0, 0.0],
                               rtol=1e-12)


def test_regression_zero_threshold() -> None:
    action, confidence = plan(Task.REGRESSION, threshold=0.0).decide(
        np.array([[0.3], [-2.0], [0.0]]))
    assert action.tolist() == [BUY, SELL, HOLD]
    assert confidence.tolist() == [0.3, 1.0, 0.0]


# --- levels and sizing ---------------------------------------------------------------------------


def test_levels_long_and_short() -> None:
    p = plan(atr_multiplier_sl=1.5, atr_multiplier_tp=3.0, risk_fraction=0.01, equity=100_000.0,
             max_leverage=1.0)
    actions = np.array([BUY, SELL, HOLD, CLOSE_LONG, CLOSE_SHORT], dtype=np.int8)
    close = np.array([100.0, 100.0, 100.0, 100.0, 100.0])
    atr = np.full(5, 2.0)
    entry, stop, take, size, invalid = p.levels(actions, close, atr)
    assert entry[0] == 100.0 and stop[0] == 97.0 and take[0] == 106.0
    assert stop[0] < entry[0] < take[0]
    assert entry[1] == 100.0 and stop[1] == 103.0 and take[1] == 94.0
    assert take[1] < entry[1] < stop[1]
    # risk 1% of 100k over a 3.0 stop distance: 333.33 units, under the 1x leverage cap of 1000
    assert size[0] == pytest.approx(1000.0 / 3.0) and size[1] == pytest.approx(1000.0 / 3.0)
    # no levels for holds and closes, and they are not "invalid"
    for column in (entry, stop, take, size):
        assert np.isnan(column[2:]).all()
    assert invalid.tolist() == [False] * 5


def test_size_is_capped_by_leverage() -> None:
    p = plan(risk_fraction=0.02, equity=50_000.0, max_leverage=2.0, atr_multiplier_sl=1.0)
    actions = np.array([BUY, BUY], dtype=np.int8)
    close = np.array([200.0, 200.0])
    atr = np.array([0.01, 20.0])  # a tight stop wants a huge position; a wide one does not
    _, _, _, size, invalid = p.levels(actions, close, atr)
    assert not invalid.any()
    assert size[0] == pytest.approx(50_000.0 * 2.0 / 200.0)  # the cap: 500 units
    assert size[1] == pytest.approx(50_000.0 * 0.02 / 20.0)  # the risk: 50 units
    assert size[0] * close[0] <= 50_000.0 * 2.0 * (1 + 1e-12)


def test_invalid_levels_are_nan_and_flagged() -> None:
    p = plan(atr_multiplier_sl=1.5, atr_multiplier_tp=3.0)
    actions = np.array([SELL, BUY, BUY, BUY, SELL, BUY, HOLD], dtype=np.int8)
    close = np.array([10.0, 10.0, 10.0, 10.0, 10.0, np.nan, 10.0])
    # short take-profit 10 - 3*5 < 0; long stop 10 - 1.5*7 < 0; ATR 0; ATR < 0; ATR NaN; no close
    atr = np.array([5.0, 7.0, 0.0, -1.0, np.nan, 1.0, 1.0])
    entry, stop, take, size, invalid = p.levels(actions, close, atr)
    assert invalid.tolist() == [True, True, True, True, True, True, False]
    for column in (entry, stop, take, size):
        assert np.isnan(column).all()


def test_levels_without_atr_are_nan() -> None:
    p = plan(names=("ret_1", "rsi_14"))
    assert p.atr_column is None
    entry, stop, take, size, invalid = p.levels(np.array([BUY, SELL], dtype=np.int8),
                                                np.array([1.0, 2.0]), None)
    for column in (entry, stop, take, size):
        assert np.isnan(column).all()
    assert not invalid.any()


def test_atr_column_resolution() -> None:
    assert plan().atr_column == 1  # the first read name starting with atr
    assert plan(names=("x", "ATR_7", "atr_14")).atr_column == 1  # case-insensitive
    assert plan(atr_feature="atr_14").atr_column == 1
    assert plan(atr_feature="rsi_14").atr_column == 2  # a named column, whatever it is called
    assert plan(atr_feature="atr_99").atr_column is None  # not read: no levels


# --- resolve_positions ---------------------------------------------------------------------------


def codes(*actions: int) -> np.ndarray:
    return np.array(actions, dtype=np.int8)


@pytest.mark.parametrize(("raw", "side", "expected", "end"), [
    # a buy while short closes the short and leaves the position flat
    ((BUY,), SHORT, (CLOSE_SHORT,), FLAT),
    # a run of buys while short: the first closes, the second opens a long
    ((BUY, BUY, BUY), SHORT, (CLOSE_SHORT, BUY, BUY), LONG),
    ((SELL,), LONG, (CLOSE_LONG,), FLAT),
    ((SELL, SELL), LONG, (CLOSE_LONG, SELL), SHORT),
    # holds neither close nor open, and do not break a run
    ((BUY, HOLD, HOLD, SELL, HOLD), FLAT, (BUY, HOLD, HOLD, CLOSE_LONG, HOLD), FLAT),
    ((SELL, HOLD, SELL, HOLD, BUY, BUY), LONG, (CLOSE_LONG, HOLD, SELL, HOLD, CLOSE_SHORT, BUY),
     LONG),
    # same-side entries keep the side
    ((BUY, BUY), LONG, (BUY, BUY), LONG),
    ((SELL,), SHORT, (SELL,), SHORT),
    ((SELL, BUY, SELL, BUY), FLAT, (SELL, CLOSE_SHORT, SELL, CLOSE_SHORT), FLAT),
    # nothing to resolve: the side passes through
    ((HOLD, HOLD), SHORT, (HOLD, HOLD), SHORT),
    ((), LONG, (), LONG),
])
def test_resolve_positions_cases(raw: tuple[int, ...], side: int, expected: tuple[int, ...],
                                 end: int) -> None:
    given = codes(*raw)
    before = given.copy()
    actions, end_side = resolve_positions(given, side)
    assert actions.tolist() == list(expected)
    assert actions.dtype == np.int8
    assert end_side == end
    np.testing.assert_array_equal(given, before)  # the input is not modified


def naive_resolve(raw: np.ndarray, side: int) -> tuple[list[int], int]:
    """The obvious per-bar loop the vectorised version must agree with."""
    out = []
    for action in raw.tolist():
        if action == BUY:
            if side == SHORT:
                out.append(CLOSE_SHORT)
                side = FLAT
            else:
                out.append(BUY)
                side = LONG
        elif action == SELL:
            if side == LONG:
                out.append(CLOSE_LONG)
                side = FLAT
            else:
                out.append(SELL)
                side = SHORT
        else:
            out.append(action)
    return out, side


@pytest.mark.parametrize("seed", range(8))
def test_resolve_positions_matches_a_per_bar_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(50):
        n = int(rng.integers(0, 120))
        weights = rng.dirichlet(np.ones(3))  # some sequences are mostly holds, some long runs
        raw = rng.choice(np.array([HOLD, BUY, SELL], dtype=np.int8), size=n, p=weights)
        start = int(rng.choice([FLAT, LONG, SHORT]))
        actions, end = resolve_positions(raw, start)
        expected, expected_end = naive_resolve(raw, start)
        assert actions.tolist() == expected, (raw.tolist(), start)
        assert end == expected_end


@pytest.mark.parametrize("seed", range(3))
def test_resolve_positions_split_anywhere_is_the_same(seed: int) -> None:
    """Carrying the end side into the next chunk gives the unsplit answer (what backfill relies on)."""
    rng = np.random.default_rng(100 + seed)
    raw = rng.choice(np.array([HOLD, BUY, SELL], dtype=np.int8), size=300, p=[0.3, 0.35, 0.35])
    whole, whole_end = resolve_positions(raw, FLAT)
    for cut in rng.integers(0, 301, size=20).tolist():
        head, side = resolve_positions(raw[:cut], FLAT)
        tail, end = resolve_positions(raw[cut:], side)
        assert np.concatenate([head, tail]).tolist() == whole.tolist()
        assert end == whole_end


# --- one bar: the scalar path agrees with the vectorised one bit for bit -------------------------


def _same(a: float, b: float) -> bool:
    """Bit-identical floats (NaN equal to NaN)."""
    return np.float64(a).tobytes() == np.float64(b).tobytes()


def _outputs(task: Task, rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    if task is Task.REGRESSION:
        out = rng.normal(0.0, 0.01, size=(n, 1))
    elif task is Task.BINARY:
        out = binary_output(rng.uniform(0.0, 1.0, size=n).tolist())
    else:
        out = rng.dirichlet(np.ones(width), size=n)
        out[::17] = 1.0 / width  # exact ties: argmax takes the first
    out[::13, -1] = np.nan
    out[::29] = np.nan
    return out


@pytest.mark.parametrize("task", [Task.BINARY, Task.MULTICLASS, Task.REGRESSION])
@pytest.mark.parametrize("seed", range(3))
def test_one_bar_policy_is_the_vectorised_policy_bit_for_bit(task: Task, seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes = ("down", "flat", "up") if task is Task.MULTICLASS else ()
    threshold = {Task.BINARY: 0.55, Task.MULTICLASS: 0.4, Task.REGRESSION: 0.002}[task]
    p = plan(task, classes, threshold=threshold, atr_feature="atr_14", atr_multiplier_sl=1.5,
             atr_multiplier_tp=3.0, equity=10_000.0, risk_fraction=0.01, max_leverage=2.0)
    n = 600
    output = _outputs(task, rng, n, 3)
    close = rng.uniform(50.0, 150.0, size=n)
    close[::31] = np.nan
    close[::37] = -1.0
    atr = rng.uniform(0.0, 5.0, size=n)
    atr[::11] = 0.0
    atr[::19] = np.nan
    atr[::23] = 200.0  # a short's target below zero
    raw, confidence = p.decide(output)
    sides = rng.choice([LONG, SHORT, FLAT], size=n)
    for i in range(n):
        one_action, one_confidence = p.decide_one(output[i])
        assert one_action == int(raw[i]), (i, output[i])
        assert _same(one_confidence, confidence[i]), (i, output[i])
        actions, side_after = resolve_positions(raw[i:i + 1], int(sides[i]))
        assert resolve_one(one_action, int(sides[i])) == (int(actions[0]), side_after)
        vector = p.levels(actions, close[i:i + 1], atr[i:i + 1])
        scalar = p.levels_one(int(actions[0]), float(close[i]), float(atr[i]))
        for got, want in zip(scalar[:4], vector[:4], strict=True):
            assert _same(got, want[0]), (i, scalar, vector)
        assert scalar[4] == bool(vector[4][0])
    no_atr = p.levels_one(BUY, 100.0, None)
    assert all(np.isnan(no_atr[:4])) and no_atr[4] is False
    # the sample reached every kind of answer, so the agreement above is not vacuous
    assert {HOLD, BUY, SELL} <= set(raw.tolist())
    assert any(p.levels_one(int(a), float(c), float(t))[4] for a, c, t in zip(raw, close, atr, strict=True))
