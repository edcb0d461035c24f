"""Stream worker pieces without services: message parsing, feature rows, the signal format and
its validation, merged writes, the hot config's layering and CLI values."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from sigserve.bus import BusMessage
from sigserve.domain import (
    ACTION_CODE,
    SIGNAL_ROW_COLUMNS,
    Policy,
    SignalBatch,
    SignalDefinition,
    SignalRows,
    merge_batches,
)
from sigserve.engine import fill_feature_row
from sigserve.errors import FeatureValueMissing, SigserveError, ValidationError
from sigserve.hotconfig import (
    LiveConfig,
    StreamConfig,
    build,
    parse_value,
    read_file,
    set_key,
    split_key,
    write_file,
)
from sigserve.stream import (
    SIGNAL_NAMESPACE,
    Names,
    StreamOptions,
    apply_config,
    parse_feature_message,
    signal_message,
    signal_messages,
    signal_uuid,
    upsert_key,
    validate_signal,
)

T = np.datetime64("2024-03-01T10:00:00", "us")


def body(**changes: Any) -> bytes:
    data: dict[str, Any] = {"symbol": "BTCUSDT", "interval": "1h", "ts": "2024-03-01T10:00:00Z",
                            "features": {"a": 1.5, "b": -2, "c": None}}
    data.update(changes)
    return orjson.dumps({k: v for k, v in data.items() if v is not _DROP})


_DROP = object()


# --- parsing ---------------------------------------------------------------------------------------
def test_parse_a_feature_message() -> None:
    msg = parse_feature_message(body(feature_key="ta-v1", close=101.5), "features.BTCUSDT.1h")
    assert (msg.symbol, msg.interval, msg.ts, msg.feature_key, msg.close) == ("BTCUSDT", "1h", T, "ta-v1", 101.5)
    assert msg.features == {"a": 1.5, "b": -2, "c": None}
    # epoch seconds and milliseconds; close inside the features
    assert parse_feature_message(body(ts=1709287200)).ts == T
    assert parse_feature_message(body(ts=1709287200000)).ts == T
    assert parse_feature_message(body(features={"close": 7})).close == 7.0
    assert parse_feature_message(body()).feature_key is None and parse_feature_message(body()).close is None


@pytest.mark.parametrize(("data", "field"), [
    (b"{nope", "bad_json"),
    (b'"text"', "not_object"),
    (body(symbol=""), "symbol"),
    (body(symbol="BTC.USDT"), "symbol"),
    (body(symbol=_DROP), "symbol"),
    (body(interval="fortnight"), "interval"),
    (body(interval=60), "interval"),
    (body(ts="last tuesday"), "ts"),
    (body(ts=None), "ts"),
    (body(ts=True), "ts"),
    (body(features=[1, 2]), "features"),
    (body(feature_key=""), "feature_key"),
    (body(close="high"), "close"),
])
def test_malformed_messages_are_validation_errors(data: bytes, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_feature_message(data)
    assert info.value.code == "validation_error"
    details = info.value.details
    assert field in (details.get("field"), details.get("reason")) or field in info.value.message.lower()


def _candles(n: int, end: np.datetime64 = T) -> list[dict[str, Any]]:
    return [{"ts": int((end - (n - 1 - i) * np.timedelta64(3600, "s")).astype("datetime64[s]").astype(np.int64)),
             "open": 100.0 + i, "high": 102.0 + i, "low": 99.0 + i, "close": 101.0 + i, "volume": 5}
            for i in range(n)]


def test_parse_a_candle_message() -> None:
    msg = parse_feature_message(body(features=_DROP, candles=_candles(3)), "features.BTCUSDT.1h")
    assert msg.ts == T and msg.features == {} and msg.candles is not None
    assert msg.candles["close"].tolist() == [101.0, 102.0, 103.0] and msg.candles["ts"][-1] == T
    assert msg.close == 103.0  # the newest candle's, unless the message gives one
    assert parse_feature_message(body(features=_DROP, candles=_candles(3), close=7.5)).close == 7.5
    no_volume = _candles(2)
    for candle in no_volume:
        del candle["volume"]
    assert parse_feature_message(body(features=_DROP, candles=no_volume)).candles["volume"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(("candles", "reason"), [
    ([], "candles"),
    ("many", "candles"),
    ([1, 2], "candles"),
    ([{"ts": None, "open": 1, "high": 1, "low": 1, "close": 1}], "candles"),
    ([{"ts": "2024-03-01T10:00Z", "open": "1", "high": 1, "low": 1, "close": 1}], "candles"),
    ([{"ts": "2024-03-01T10:00Z", "open": True, "high": 1, "low": 1, "close": 1}], "candles"),
    (_candles(3, T - np.timedelta64(3600, "s")), "candles_not_ending_at_ts"),
    (list(reversed(_candles(3))), "candles_not_ending_at_ts"),
    (_candles(3)[::2] + _candles(1), "strictly increasing"),
    ([{**c, "low": 200.0} for c in _candles(2)], "inconsistent candle"),
])
def test_malformed_candle_messages_are_validation_errors(candles: Any, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_feature_message(body(features=_DROP, candles=candles))
    details = info.value.details
    assert reason in (details.get("field"), details.get("reason")) or reason in info.value.message


def test_features_and_candles_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="not both"):
        parse_feature_message(body(candles=_candles(2)))


def test_subject_must_agree_with_the_body() -> None:
    with pytest.raises(ValidationError, match="does not match"):
        parse_feature_message(body(), "features.ETHUSDT.1h")
    parse_feature_message(body(), "features.BTCUSDT.1h")
    parse_feature_message(body(), "features")  # no symbol/interval tokens: nothing to compare


def test_feature_row_missing_and_non_numeric() -> None:
    out = np.empty(3)
    fill_feature_row(("a", "b", "c"), {"a": 1.5, "b": -2, "c": None, "extra": "ignored"}, out, "m:1")
    assert out[0] == 1.5 and out[1] == -2.0 and math.isnan(out[2])
    with pytest.raises(FeatureValueMissing) as missing:
        fill_feature_row(("a", "z"), {"a": 1.0}, np.empty(2), "m:1")
    assert missing.value.details["missing"] == ["z"]
    with pytest.raises(ValidationError) as bad:
        fill_feature_row(("a", "b"), {"a": "1", "b": [2]}, np.empty(2), "m:1")
    assert bad.value.details["not_numeric"] == {"a": "str", "b": "list"}
    with pytest.raises(ValidationError):
        fill_feature_row(("a",), {"a": True}, np.empty(1), "m:1")  # a bool is not a number here


# --- the signal format --------------------------------------------------------------------------------
def batch(actions: list[str], *, entry: float = 100.0, atr: float = 1.0, n: int | None = None) -> SignalBatch:
    n = len(actions)
    codes = np.array([ACTION_CODE[a] for a in actions], dtype=np.int8)
    entering = np.isin(codes, [ACTION_CODE["buy"], ACTION_CODE["sell"]])
    direction = np.where(codes == ACTION_CODE["buy"], 1.0, -1.0)
    nan = np.full(n, np.nan)
    return SignalBatch(
        signal_id="trend-1h", symbol="BTCUSDT", interval="1h", model_name="trend", model_version=3,
        model_sha256="ab" * 32, source="stream", ts=T + np.arange(n) * np.timedelta64(1, "h"),
        action=codes, confidence=np.full(n, 0.7), raw_output=np.tile([0.3, 0.7], (n, 1)),
        entry_price=np.where(entering, entry, nan), stop_loss=np.where(entering, entry - direction * 1.5 * atr, nan),
        take_profit=np.where(entering, entry + direction * 3 * atr, nan),
        recommended_size=np.where(entering, 10.0, nan), feature_keys=np.full(n, "fk", dtype=object),
        latency_ms=np.full(n, 0.25), flags=np.full(n, "", dtype=object))


def test_signal_message_has_exactly_the_seed_format() -> None:
    b = batch(["buy", "sell", "hold", "close_long"])
    messages = signal_messages(b, definition_id="trend-1h", model_type="lightgbm", features_used=["x", "y"])
    key, buy = messages[0]
    assert key == upsert_key("trend-1h", 3, "BTCUSDT", "1h", int(T.astype(np.int64)))
    assert set(buy) == {"signal_id", "symbol", "timeframe", "timestamp_ms", "signal_type", "confidence_score",
                        "entry_price", "stop_loss", "take_profit", "position_size_recommended", "model_version",
                        "metadata"}
    assert buy["metadata"] == {"features_used": ["x", "y"], "prediction_latency_ms": 0.25, "model_type": "lightgbm",
                               "model_sha256": "ab" * 32, "feature_key": "fk", "definition_id": "trend-1h"}
    assert buy["signal_id"] == str(uuid.uuid5(SIGNAL_NAMESPACE, key)) == signal_uuid(key)
    assert uuid.UUID(buy["signal_id"]).version == 5
    assert (buy["symbol"], buy["timeframe"], buy["timestamp_ms"]) == ("BTCUSDT", "1h", 1709287200000)
    assert (buy["signal_type"], buy["entry_price"], buy["stop_loss"], buy["take_profit"]) == ("buy", 100.0, 98.5, 103.0)
    assert buy["position_size_recommended"] == 10.0 and buy["model_version"] == "trend:3"
    assert messages[1][1]["stop_loss"] == 101.5 and messages[1][1]["take_profit"] == 97.0
    hold = messages[2][1]
    assert hold["signal_type"] == "hold" and hold["entry_price"] is None and hold["stop_loss"] is None
    assert messages[3][1]["signal_type"] == "close_long"
    orjson.dumps(buy)  # serialisable as it is
    one = signal_message(b, 1, definition_id="trend-1h", model_type="lightgbm", features_used=["x"],
                         latency_ms=1.23456)
    assert one["signal_type"] == "sell" and one["metadata"]["prediction_latency_ms"] == 1.2346


def messages_of(b: SignalBatch) -> list[dict[str, Any]]:
    return [m for _, m in signal_messages(b, definition_id="d", model_type="lightgbm", features_used=[])]


def test_valid_signals_pass() -> None:
    for m in messages_of(batch(["buy", "sell", "hold", "close_long", "close_short"])):
        assert validate_signal(m) is None
    # an entry without any level (a definition without an ATR feature) is a valid signal
    no_levels = batch(["buy"], atr=float("nan"))
    no_levels.entry_price[:] = np.nan
    no_levels.recommended_size[:] = np.nan
    assert validate_signal(messages_of(no_levels)[0]) is None


@pytest.mark.parametrize(("change", "problem"), [
    ({"signal_type": "moon"}, "unknown signal_type"),
    ({"confidence_score": 1.2}, "outside 0..1"),
    ({"confidence_score": -0.1}, "outside 0..1"),
    ({"confidence_score": float("nan")}, "outside 0..1"),
    ({"stop_loss": 101.0}, "stop_loss < entry_price"),
    ({"take_profit": 99.0}, "stop_loss < entry_price"),
    ({"stop_loss": None}, "some levels but not all"),
    ({"position_size_recommended": 0.0}, "finite and > 0"),
    ({"entry_price": float("inf")}, "finite and > 0"),
])
def test_invalid_buys_are_rejected(change: dict[str, Any], problem: str) -> None:
    message = {**messages_of(batch(["buy"]))[0], **change}
    reason = validate_signal(message)
    assert reason is not None and problem in reason


def test_invalid_sell_hold_and_flagged_levels_are_rejected() -> None:
    sell = messages_of(batch(["sell"]))[0]
    assert validate_signal({**sell, "take_profit": 101.0}) is not None
    hold = messages_of(batch(["hold"]))[0]
    assert "carries no levels" in (validate_signal({**hold, "entry_price": 100.0}) or "")
    assert "levels_invalid" in (validate_signal(messages_of(batch(["buy"]))[0], "levels_invalid") or "")


# --- merged writes ----------------------------------------------------------------------------------
def test_merge_batches_keeps_the_later_row_per_bar_in_ts_order() -> None:
    first = batch(["buy", "hold", "sell"])
    second = batch(["hold", "hold"])
    second.ts = first.ts[1:] + np.timedelta64(1, "h")  # bars 2 and 3: bar 2 overlaps
    second.confidence[:] = 0.9
    merged = merge_batches([first, second])
    assert merged.ts.tolist() == [first.ts[0], first.ts[1], first.ts[2], second.ts[1]]
    assert merged.confidence.tolist() == [0.7, 0.7, 0.9, 0.9]
    assert [int(a) for a in merged.action] == [ACTION_CODE[a] for a in ("buy", "hold", "hold", "hold")]
    assert merged.raw_output.shape == (4, 2) and len(merged.flags) == 4
    assert merge_batches([first]) is first
    # one batch with a bar twice (shadow jobs of one bar): one row, the later
    twice = first.take(np.array([2, 0, 0]))
    twice.confidence[2] = 0.95
    alone = merge_batches([twice])
    assert alone.ts.tolist() == [first.ts[0], first.ts[2]]
    assert alone.confidence.tolist() == [0.95, 0.7]



def _same_batch(a: object, b: object) -> None:
    for name in SIGNAL_ROW_COLUMNS:
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype.kind == "f":
            np.testing.assert_array_equal(x, y, err_msg=name)  # NaN levels of holds compare equal
        else:
            assert x.tolist() == y.tolist(), name
    for name in ("signal_id", "symbol", "interval", "model_name", "model_version", "model_sha256", "source",
                 "shadow"):
        assert getattr(a, name) == getattr(b, name), name


def test_signal_rows_gathered_one_batch_at_a_time_equal_merge_batches() -> None:
    first = batch(["buy", "hold", "sell"])
    second = batch(["hold", "hold"])
    second.ts = first.ts[1:] + np.timedelta64(1, "h")  # overlaps bar 2: the later row wins
    second.confidence[:] = 0.9
    second.flags = np.array(["", "levels_invalid"], dtype=object)
    singles = [first.take(np.array([i])) for i in (2, 0, 1)]  # one-row batches, out of order
    for parts in ([first, second], singles, [first, *singles, second]):
        rows = SignalRows(parts[0], capacity=2)  # below what they hold: the columns grow
        for part in parts[1:]:
            rows.append(part)
        assert len(rows) == sum(len(part) for part in parts)
        _same_batch(rows.take(), merge_batches(parts))


def test_signal_rows_widen_a_column_as_concatenate_would_and_refuse_another_width() -> None:
    first = batch(["buy"])
    first.confidence = first.confidence.astype(np.float32)
    second = batch(["sell"])
    second.ts = first.ts + np.timedelta64(1, "h")
    rows = SignalRows(first)
    rows.append(second)  # float64 confidence after a float32 one
    merged = rows.take()
    assert merged.confidence.dtype == np.float64
    _same_batch(merged, merge_batches([first, second]))
    other = batch(["buy"])
    other.raw_output = np.zeros((1, 3))
    with pytest.raises(ValueError, match="raw_output has shape"):
        SignalRows(first).append(other)


# --- names and config overrides ---------------------------------------------------------------------
def test_names_with_and_without_a_prefix() -> None:
    plain, tenant = Names(), Names(prefix="t1")
    assert (plain.features, plain.deadletter, plain.signals("BTC", "1h")) == (
        "features.>", "features.deadletter", "signals.BTC.1h")
    assert plain.stream("FEATURES") == "FEATURES" and plain.config_bucket == "sigserve-config"
    assert tenant.signals_all == "t1.signals.>" and tenant.stream("TRADING_SIGNALS") == "t1_TRADING_SIGNALS"
    assert tenant.config_bucket == "t1_sigserve-config"


def test_apply_config_overrides_model_and_policy() -> None:
    definition = SignalDefinition("s", "trend", "@production", "1h", ("BTC",), Policy(threshold=0.6))
    assert apply_config(definition, StreamConfig()) is definition
    pinned = apply_config(definition, build({"model_config": {"version": 4}}))
    assert (pinned.model_name, pinned.model_ref) == ("trend", "4")
    other = apply_config(definition, build({"model_config": {"name": "challenger"}}))
    assert (other.model_name, other.model_ref) == ("challenger", "@production")
    sized = apply_config(definition, build({"signal_generation": {"atr_multiplier_sl": 2.0, "equity": 5e4}}))
    assert sized.policy.atr_multiplier_sl == 2.0 and sized.policy.equity == 5e4
    assert sized.policy.threshold == 0.6 and sized.policy.atr_multiplier_tp == definition.policy.atr_multiplier_tp


# --- hot config ---------------------------------------------------------------------------------------
def test_defaults_are_safe_and_layers_merge_key_by_key() -> None:
    config = StreamConfig()
    assert config.inference_settings.confidence_threshold == 0.0  # the definition's policy alone
    assert config.inference_settings.max_latency_ms is None and config.inference_settings.publish_holds
    assert config.signal_generation.overrides() == {} and config.model.ref is None
    merged = build({"inference_settings": {"confidence_threshold": 0.6, "publish_holds": False}},
                   {"inference_settings": {"confidence_threshold": 0.7}})
    assert merged.inference_settings.confidence_threshold == 0.7
    assert merged.inference_settings.publish_holds is False
    assert set(merged.to_dict()) == {"model_config", "inference_settings", "signal_generation", "monitoring"}
    assert build({"model_config": {"version": "@staging"}}).model.ref == "@staging"


@pytest.mark.parametrize("layer", [
    {"inference_settings": {"confidence_threshold": 1.5}},
    {"inference_settings": {"unknown": 1}},
    {"model_config": {"version": "latest"}},
    {"signal_generation": {"atr_multiplier_sl": 0}},
    {"nonsense": {}},
    {"monitoring": 3},
])
def test_invalid_config_is_refused(layer: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        build(layer)


def test_config_keys_values_and_file_round_trip(tmp_path: Path) -> None:
    assert parse_value("0.6") == 0.6 and parse_value("true") is True and parse_value("null") is None
    assert parse_value("production") == "production"
    assert split_key("inference_settings.publish_holds") == ("inference_settings", "publish_holds")
    assert split_key("monitoring") == ("monitoring", None)
    for bad in ("nope.x", "inference_settings.a.b"):
        with pytest.raises(ValidationError):
            split_key(bad)
    layer = set_key({}, "inference_settings.confidence_threshold", 0.6)
    assert layer == {"inference_settings": {"confidence_threshold": 0.6}}
    path = tmp_path / "stream.yaml"
    write_file(path, layer)
    assert read_file(path) == layer and read_file(tmp_path / "absent.yaml") == {}
    path.write_text("- a list\n")
    with pytest.raises(ValidationError):
        read_file(path)


async def test_live_config_applies_a_valid_file_change_and_ignores_an_invalid_one(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "stream.yaml"
    path.write_text("inference_settings:\n  confidence_threshold: 0.6\n")
    live = LiveConfig(path, poll_s=0.05)
    await live.start()
    seen: list[tuple[float, float]] = []
    live.subscribe(lambda old, new: seen.append((old.inference_settings.confidence_threshold,
                                                 new.inference_settings.confidence_threshold)))
    try:
        assert live.current.inference_settings.confidence_threshold == 0.6
        path.write_text("inference_settings:\n  confidence_threshold: 0.8\n")
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        assert seen == [(0.6, 0.8)]
        path.write_text("inference_settings:\n  confidence_threshold: two\n")
        for _ in range(100):
            if live.errors:
                break
            await asyncio.sleep(0.02)
        assert live.errors == 1 and live.current.inference_settings.confidence_threshold == 0.8
    finally:
        await live.stop()


def test_an_invalid_start_config_is_refused(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "stream.yaml"
    path.write_text("inference_settings:\n  max_latency_ms: -1\n")
    with pytest.raises(SigserveError):
        asyncio.run(LiveConfig(path).start())


# --- Kafka sink without a broker ------------------------------------------------------------------
class FakeProducer:
    """Stands in for aiokafka's producer: fails the first ``failures`` sends, records the rest."""

    failures = 2

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.calls = 0

    async def start(self) -> None:
        FakeProducer.instance = self

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, key: bytes) -> Any:
        import asyncio

        self.calls += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.calls <= FakeProducer.failures:
            future.set_exception(ConnectionError("broker down"))
        else:
            self.sent.append((topic, key, value))
            future.set_result(None)
        return future

    instance: FakeProducer


async def test_kafka_sink_never_blocks_counts_retries_and_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import aiokafka

    from sigserve.stream_kafka import KafkaSink

    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", FakeProducer)
    sink = KafkaSink("broker:9092", max_queue=5, batch=1)
    await sink.start()
    producer = FakeProducer.instance
    assert producer.config["acks"] == "all" and producer.config["enable_idempotence"] is True
    for i in range(7):  # offer() is synchronous: the hot path never awaits the broker
        sink.offer(f"k{i}".encode(), f"v{i}".encode())
    assert sink.stats["dropped"] == 2 and sink.pending == 5  # over the bound: counted, not silent
    for _ in range(200):
        if sink.stats["sent"] == 5:
            break
        await asyncio.sleep(0.05)
    await sink.stop()
    assert sink.stats["sent"] == 5 and sink.stats["failed_attempts"] == 2  # retried after the failures
    assert [k for _, k, _ in producer.sent] == [b"k0", b"k1", b"k2", b"k3", b"k4"]
    assert {t for t, _, _ in producer.sent} == {"trading_signals_archive"}


def test_stream_options_input_defaults_to_durable_and_refuses_an_unknown_one() -> None:
    assert StreamOptions().input == "durable" and StreamOptions(input="core").input == "core"
    with pytest.raises(ValidationError, match="unknown stream input 'jetstream': use durable") as refused:
        StreamOptions(input="jetstream")  # type: ignore[arg-type]
    assert refused.value.code == "validation_error" and refused.value.details["field"] == "input"


async def test_a_core_message_settles_as_a_no_op() -> None:
    """Core input acks and naks what a core subscription delivered: nothing happens, nothing raises."""
    msg = BusMessage("features.BTCUSDT.1m", b"{}")
    await msg.ack()
    await msg.nak(delay=1.0)
    await msg.term()
    assert msg.settled is False  # no settle callback: nothing was sent anywhere
