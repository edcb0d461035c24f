"""The signal journal's record format: every column of a batch comes back as it went in."""

from __future__ import annotations

import os
import zlib
from dataclasses import fields
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from sigserve.domain import SignalBatch
from sigserve.errors import StoreUnavailable
from sigserve.stores import signal_journal
from sigserve.stores.signal_journal import HEADER, MAGIC, SignalJournal, decode, encode, read_segment, record


def batch() -> SignalBatch:
    return SignalBatch(
        signal_id="sig", symbol="ETH", interval="5m", model_name="m", model_version=7,
        model_sha256="ef" * 32, source="catchup_scan",
        ts=np.array(["2024-03-01T00:05", "2024-03-01T00:10"], dtype="datetime64[us]"),
        action=np.array([1, 4], dtype=np.int8), confidence=np.array([0.25, 1.0]),
        raw_output=np.array([[0.1, 0.2, 0.7], [np.nan, 0.5, 0.5]]),
        entry_price=np.array([np.nan, 2.5]), stop_loss=np.array([1.0, -np.inf]),
        take_profit=np.array([3.0, np.nan]), recommended_size=np.array([0.0, 1e-300]),
        feature_keys=np.array(["k1", None], dtype=object), latency_ms=np.array([0.1, 12.0]),
        flags=np.array(["", "levels_invalid"], dtype=object), shadow=True)


def test_a_record_decodes_to_the_same_batch() -> None:
    original, when = batch(), datetime(2026, 12, 3, 17, 0, 1, 123456)
    back, created_at = decode(encode(original, when))
    assert created_at == when
    for f in fields(SignalBatch):
        a, b = getattr(original, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype or (a.dtype.kind == b.dtype.kind == "O"), f.name
            assert a.shape == b.shape, f.name
            if a.dtype.kind == "f":
                np.testing.assert_array_equal(a, b)  # NaN and inf kept, bit for bit
            else:
                assert a.tolist() == b.tolist(), f.name
        else:
            assert a == b, f.name


def test_reading_stops_at_a_damaged_record(tmp_path: Path) -> None:
    path = tmp_path / "0000000000000001.log"
    good = record(batch(), datetime(2026, 12, 3))
    payload = good[HEADER.size:]
    bad_crc = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload) ^ 1) + payload
    path.write_bytes(good + good + bad_crc + good)
    assert len(read_segment(path)) == 2
    path.write_bytes(good + good[:-3])  # cut short
    assert len(read_segment(path)) == 1


def test_a_failed_append_leaves_no_record_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = SignalJournal(tmp_path / "journal")
    assert journal.open() == ([], [])
    when = datetime(2026, 12, 3)
    journal.append(batch(), when)
    real_sync = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(signal_journal.os, "fdatasync", failing)
    with pytest.raises(StoreUnavailable):
        journal.append(batch(), when)
    monkeypatch.setattr(signal_journal.os, "fdatasync", real_sync)
    journal.append(batch(), when)
    # the refused record is gone from the file: what a crash now would replay is what was
    # acknowledged
    (segment,) = sorted(journal.directory.glob("*.log"))
    assert len(read_segment(segment)) == 2 and journal.pending_rows == 4 and journal.appended == 4
    journal.close()


def test_append_many_syncs_once_and_reopens_to_every_batch_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = SignalJournal(tmp_path / "journal")
    journal.open()
    syncs: list[int] = []
    real_sync = os.fdatasync

    def counting(fd: int) -> None:
        syncs.append(fd)
        real_sync(fd)

    monkeypatch.setattr(signal_journal.os, "fdatasync", counting)
    first, second = batch(), batch()
    second.symbol = "BTC"
    journal.append_many([first, second, first], datetime(2026, 12, 4))
    assert len(syncs) == 1
    assert journal.pending_rows == journal.appended == 6
    # a failed sync cuts every record of the call off
    monkeypatch.setattr(signal_journal.os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(StoreUnavailable):
        journal.append_many([second, second], datetime(2026, 12, 4))
    monkeypatch.setattr(signal_journal.os, "fdatasync", real_sync)
    journal.close()
    again = SignalJournal(tmp_path / "journal")
    entries, _ = again.open()
    assert [b.symbol for b, _ in entries] == ["ETH", "BTC", "ETH"]
    again.close()
