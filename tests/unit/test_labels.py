"""Labels on real-shaped bars: forward-return targets, annotation loading, BIO with overlapping
spans and context padding, windowed examples with edge padding, candlestick-pattern labels, the
three merge strategies and the dataset statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sigserve.demo.market import generate_ohlcv
from sigserve.errors import ValidationError
from sigserve.labels import (
    OUTSIDE,
    Span,
    bio_encode,
    bio_sequences,
    classify,
    dataset_stats,
    forward_logret,
    load_annotations,
    merge_spans,
    target_name,
    windowed_examples,
)
from sigserve.labels.annotations import agreement_rate, sequence_mask

BARS = 500
SYM, ITV = "BTCUSDT", "1h"


@pytest.fixture(scope="module")
def market() -> dict[str, np.ndarray]:
    return generate_ohlcv(SYM, ITV, "2024-01-01", BARS)


def span(market: dict[str, np.ndarray], first: int, last: int, label: str, confidence: float = 1.0,
         source: str = "human") -> Span:
    return Span(SYM, ITV, market["ts"][first], market["ts"][last], label, confidence, source)


# --- targets -------------------------------------------------------------------------------------
def test_forward_return_targets(market: dict[str, np.ndarray]) -> None:
    close = market["close"]
    y = forward_logret(close, 4)
    assert target_name(4) == "y_logret_4"
    np.testing.assert_allclose(y[:-4], np.log(close[4:] / close[:-4]))
    assert np.isnan(y[-4:]).all()
    codes, names = classify(y, "sign")
    assert names == ("down", "up")
    assert set(np.unique(codes[:-4])) == {0.0, 1.0} and np.isnan(codes[-4:]).all()
    np.testing.assert_array_equal(codes[:-4], (y[:-4] > 0).astype(float))
    band, names3 = classify(y, "threshold", 0.005)
    assert names3 == ("down", "flat", "up")
    finite = y[:-4]
    np.testing.assert_array_equal(band[:-4], np.where(finite < -0.005, 0, np.where(finite > 0.005, 2, 1)))
    with pytest.raises(ValidationError):
        classify(y, "threshold", 0.0)
    with pytest.raises(ValidationError):
        classify(y, "quantile")


# --- annotations ---------------------------------------------------------------------------------
def test_annotations_load_filter_and_refuse(tmp_path: Path, market: dict[str, np.ndarray]) -> None:
    items = [span(market, 10, 14, "bull_flag", 0.9).to_dict(), span(market, 40, 42, "top", 0.3).to_dict(),
             {**span(market, 60, 61, "dip", 0.7).to_dict(), "symbol": "ETHUSDT"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"annotations": items}))
    spans, dropped = load_annotations(path, min_confidence=0.5, symbol=SYM)
    assert [s.label for s in spans] == ["bull_flag"] and dropped == 1
    assert spans[0].start == market["ts"][10] and spans[0].source == "human"
    everything, none = load_annotations(path)
    assert len(everything) == 3 and none == 0
    for bad in ([{**items[0], "end": "2023-01-01T00:00Z"}], [{**items[0], "confidence": 2}],
                [{**items[0], "label": "B-x"}], [{k: v for k, v in items[0].items() if k != "label"}],
                {"nothing": 1}):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValidationError):
            load_annotations(path)
    path.write_text("{not json")
    with pytest.raises(ValidationError):
        load_annotations(path)


def test_bio_with_overlapping_spans_goes_to_extra_tag_columns(market: dict[str, np.ndarray]) -> None:
    spans = [span(market, 10, 14, "flag"), span(market, 12, 16, "breakout"),  # overlaps flag
             span(market, 13, 13, "doji"),  # overlaps both: a third column
             span(market, 30, 31, "dip"), span(market, 32, 33, "flag")]  # adjacent: same column
    tags = bio_encode(market["ts"], spans)
    assert tags.names == ("tag", "tag_2", "tag_3") and tags.placed == 5 and tags.skipped == 0
    primary, second, third = tags.columns
    assert list(primary[9:18]) == ["O", "B-flag", "I-flag", "I-flag", "I-flag", "I-flag", "O", "O", "O"]
    assert list(second[11:18]) == ["O", "B-breakout", "I-breakout", "I-breakout", "I-breakout",
                                   "I-breakout", "O"]
    assert third[13] == "B-doji" and (np.delete(third, 13) == OUTSIDE).all()
    assert list(primary[29:35]) == ["O", "B-dip", "I-dip", "B-flag", "I-flag", "O"]
    # every span's candles appear exactly once, as one B- then I-
    for s in spans:
        first = int(np.searchsorted(market["ts"], s.start))
        last = int(np.searchsorted(market["ts"], s.end))
        hits = [c for c in tags.columns if c[first] == f"B-{s.label}"]
        assert len(hits) == 1
        assert (hits[0][first + 1:last + 1] == f"I-{s.label}").all()
    # a span outside the series is skipped, not misplaced
    outside = Span(SYM, ITV, np.datetime64("2030-01-01T00", "us"), np.datetime64("2030-01-02T00", "us"), "x")
    assert bio_encode(market["ts"], [outside]).skipped == 1


def test_bio_sequences_pad_context_and_clip(market: dict[str, np.ndarray]) -> None:
    spans = [span(market, 2, 4, "a"), span(market, 100, 103, "b"), span(market, BARS - 2, BARS - 1, "c")]
    seqs = bio_sequences(market["ts"], spans, context=5)
    assert seqs == [(0, 10), (95, 109), (BARS - 7, BARS)]
    mask = sequence_mask(BARS, seqs)
    assert int(mask.sum()) == 10 + 14 + 7
    with pytest.raises(ValidationError):
        bio_sequences(market["ts"], spans, context=-1)


def test_windowed_examples_are_centred_and_edge_padded(market: dict[str, np.ndarray]) -> None:
    values = np.column_stack([np.arange(BARS, dtype=float), 10.0 * np.arange(BARS)])
    names = ("a", "b")
    spans = [span(market, 100, 104, "mid"), span(market, 0, 1, "start"), span(market, BARS - 1, BARS - 1, "end")]
    x, y, columns = windowed_examples(values, names, market["ts"], spans, window=5)
    assert x.shape == (3, 10) and list(y) == ["mid", "start", "end"]
    assert columns[:4] == ("a@-2", "b@-2", "a@-1", "b@-1") and columns[-1] == "b@+2"
    np.testing.assert_array_equal(x[0, ::2], [100, 101, 102, 103, 104])  # centre 102
    np.testing.assert_array_equal(x[1, ::2], [0, 0, 0, 1, 2])  # left edge repeated
    np.testing.assert_array_equal(x[2, ::2], [BARS - 3, BARS - 2, BARS - 1, BARS - 1, BARS - 1])
    np.testing.assert_array_equal(x[0, 1::2], 10.0 * x[0, ::2])


# --- programmatic labels and merging -------------------------------------------------------------
def test_candlestick_patterns_label_bullish_and_bearish(market: dict[str, np.ndarray]) -> None:
    talib = pytest.importorskip("talib")
    from sigserve.labels.patterns import pattern_names, pattern_spans

    spans = pattern_spans(market, SYM, ITV, ["CDLENGULFING", "hammer"])
    raw = talib.CDLENGULFING(market["open"], market["high"], market["low"], market["close"])
    engulfing = [s for s in spans if s.label.endswith("_engulfing")]
    assert len(engulfing) == int((raw != 0).sum()) > 0
    for s in engulfing:
        i = int(np.searchsorted(market["ts"], s.start))
        assert s.start == s.end and s.source == "programmatic"
        assert s.label == ("bullish_engulfing" if raw[i] > 0 else "bearish_engulfing")
    assert {s.label for s in engulfing} == {"bullish_engulfing", "bearish_engulfing"}
    assert len(pattern_names("all")) > 50
    with pytest.raises(ValidationError):
        pattern_names(["CDLNOPE"])


def test_merge_strategies(market: dict[str, np.ndarray]) -> None:
    human = [span(market, 10, 14, "bullish_engulfing"), span(market, 50, 52, "top")]
    prog = [span(market, 12, 12, "bullish_engulfing", source="programmatic"),
            span(market, 14, 14, "bearish_harami", source="programmatic"),
            span(market, 80, 80, "bearish_engulfing", source="programmatic")]
    hp = merge_spans(human, prog, "human_priority")
    assert [s.label for s in hp] == ["bullish_engulfing", "top", "bearish_engulfing"]
    assert [s.source for s in hp] == ["human", "human", "programmatic"]
    pp = merge_spans(human, prog, "programmatic_priority")
    assert [s.label for s in pp] == ["bullish_engulfing", "bearish_harami", "bearish_engulfing", "top"]
    assert [s.source for s in pp] == ["programmatic"] * 3 + ["human"]
    both = merge_spans(human, prog, "both")
    assert len(both) == 5
    tags = bio_encode(market["ts"], both)
    assert len(tags.columns) == 2  # the overlaps of "both" land in a second column
    with pytest.raises(ValidationError):
        merge_spans(human, prog, "union")
    # agreement: candles 12 and 14 are labelled by both; 12 agrees, 14 does not
    rate, candles = agreement_rate(market["ts"], human, prog)
    assert (rate, candles) == (0.5, 2)


def test_dataset_stats(market: dict[str, np.ndarray], tmp_path: Path) -> None:
    human = [span(market, 10, 14, "flag"), span(market, 20, 22, "flag"), span(market, 40, 40, "dip")]
    prog = [span(market, 12, 12, "flag", source="programmatic")]
    tags = bio_encode(market["ts"], human)
    stats = dataset_stats(tags.primary, human, ts=market["ts"], human=human, programmatic=prog)
    assert stats["rows"] == BARS
    assert stats["counts"] == {"B-dip": 1, "B-flag": 2, "I-flag": 6, "O": BARS - 9}
    assert stats["class_share"]["O"] == pytest.approx((BARS - 9) / BARS)
    assert stats["spans"] == {"dip": 1, "flag": 2}
    assert stats["mean_span_length"] == pytest.approx((5 + 3 + 1) / 3)
    assert stats["mean_span_length_per_label"] == {"dip": 1.0, "flag": 4.0}
    assert stats["agreement_rate"] == 1.0 and stats["agreement_candles"] == 1
    from sigserve.labels.annotations import log_stats

    log_stats(stats, tmp_path / "stats.json")
    assert json.loads((tmp_path / "stats.json").read_text())["counts"]["O"] == BARS - 9
