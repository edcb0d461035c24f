"""The shadow worker's pipe protocol: frames cut anywhere reassemble, and a job's rows survive
the trip unchanged."""

from __future__ import annotations

import pickle

import numpy as np

from sigserve.domain import FeatureBatch
from sigserve.routing.shadow_process import FLUSH, JOB, decode_job, encode_job, frame, read_frames
from sigserve.timeutil import TS_DTYPE


def test_frames_cut_anywhere_come_out_whole_and_in_order() -> None:
    stream = frame(JOB, b"abc") + frame(FLUSH, b"") + frame(b"R", bytes(range(256)) * 40)
    for cut in (1, 3, 4, 5, 9, 11, 500, len(stream) - 1):
        inbox = bytearray()
        got = []
        for start in range(0, len(stream), cut):
            inbox += stream[start:start + cut]
            got += read_frames(inbox)
        assert got == [(JOB, b"abc"), (FLUSH, b""), (b"R", bytes(range(256)) * 40)]
        assert not inbox


def test_a_job_round_trips_with_its_rows_and_served_actions() -> None:
    names = ("a", "b", "c")
    rows = FeatureBatch("BTCUSDT", "1h", np.array(["2024-01-01T00:00", "2024-01-01T01:00"], dtype=TS_DTYPE),
                        np.arange(6, dtype=np.float64).reshape(2, 3) / 7.0, names,
                        np.array(["k1", "k2"], dtype=object), np.array([101.5, np.nan]))
    data = encode_job(7, 2, rows, np.array([1, 2], dtype=np.int8), "stream", True)
    ((kind, payload),) = read_frames(bytearray(data))
    assert kind == JOB
    key, served_version, back, served, source, write = decode_job(pickle.loads(payload), names)
    assert (key, served_version, source, write) == (7, 2, "stream", True)
    assert (back.symbol, back.interval, back.names) == ("BTCUSDT", "1h", names)
    np.testing.assert_array_equal(back.ts, rows.ts)
    np.testing.assert_array_equal(back.values, rows.values)
    np.testing.assert_array_equal(back.close, rows.close)
    assert back.feature_keys.tolist() == ["k1", "k2"]
    assert served.tolist() == [1, 2]
