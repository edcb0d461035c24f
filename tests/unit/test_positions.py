"""The position book: what it answers for any bar equals what the table's rows give, after any
sequence of writes (appends, replays, bulk rewrites, holds), and it forgets what it cannot follow."""

from __future__ import annotations

import numpy as np
import pytest

from sigserve.domain import ACTION_CODE, FLAT, LONG, SHORT, SignalBatch
from sigserve.stores import positions
from sigserve.stores.positions import PositionBook

T0 = np.datetime64("2024-01-01T00:00:00", "us")
MIN = np.timedelta64(60_000_000, "us")
KEY = ("sig", 1, "BTC", "1m")
SIDE = {"buy": LONG, "sell": SHORT, "close_long": FLAT, "close_short": FLAT}


def batch(minutes: list[int], actions: list[str], *, shadow: bool = False) -> SignalBatch:
    n = len(minutes)
    return SignalBatch(
        signal_id="sig", symbol="BTC", interval="1m", model_name="m", model_version=1,
        model_sha256="ab" * 32, source="stream", ts=T0 + np.array(minutes, dtype=np.int64) * MIN,
        action=np.array([ACTION_CODE[a] for a in actions], dtype=np.int8),
        confidence=np.full(n, 0.6), raw_output=np.tile([0.4, 0.6], (n, 1)),
        entry_price=np.full(n, 100.0), stop_loss=np.full(n, 99.0), take_profit=np.full(n, 101.0),
        recommended_size=np.full(n, 1.0), feature_keys=np.array(["k"] * n, dtype=object),
        latency_ms=np.zeros(n), flags=np.array([""] * n, dtype=object), shadow=shadow)


class Table:
    """The rows as the store would hold them: the truth the book must agree with."""

    def __init__(self) -> None:
        self.rows: dict[int, str] = {}

    def write(self, minutes: list[int], actions: list[str]) -> None:
        self.rows.update(zip(minutes, actions, strict=True))

    def side_before(self, minute: int) -> int:
        events = [(m, a) for m, a in self.rows.items() if m < minute and a != "hold"]
        return SIDE[max(events)[1]] if events else FLAT

    def summary(self) -> tuple[int, int, int | None]:
        newest = max(self.rows)
        events = [m for m, a in self.rows.items() if a != "hold"]
        return newest, self.side_before(newest + 1), max(events) if events else None

    def events(self) -> tuple[np.ndarray, np.ndarray]:
        events = sorted((m, a) for m, a in self.rows.items() if a != "hold")
        return (T0 + np.array([m for m, _ in events], dtype=np.int64) * MIN,
                np.array([ACTION_CODE[a] for _, a in events], dtype=np.int64))


def learn(book: PositionBook, table: Table) -> None:
    newest, side, last = table.summary()
    book.learn(KEY, T0 + newest * MIN, side, None if last is None else T0 + last * MIN)


def check(book: PositionBook, table: Table) -> None:
    probe = np.arange(-1, max(table.rows) + 3)
    got = book.sides_before(KEY, T0 + probe * MIN)
    assert got is not None
    side, want = FLAT, []
    for m in probe.tolist():  # the side before m: the newest event before it
        want.append(side)
        if table.rows.get(m, "hold") != "hold":
            side = SIDE[table.rows[m]]
    assert got.tolist() == want
    newest, side, last = table.summary()
    summary = book.summary(KEY)
    assert summary is not None
    assert summary[0] == T0 + newest * MIN and summary[1] == side
    assert summary[2] == (None if last is None else T0 + last * MIN)


@pytest.mark.parametrize(("seed", "merge_rows", "put_rows"),
                         [(seed, 4096, 64) for seed in range(4)] + [(4, 4096, 1), (5, 4096, 1), (6, 8, 1),
                                                                    (7, 8, 64)])
def test_the_book_agrees_with_the_table_after_random_writes(seed: int, merge_rows: int, put_rows: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes of up to ``put_rows`` rows are put one by one, larger ones merged; with
    ``merge_rows`` 8, writes of 9 rows or more drop the events (the store loads them again on
    its next read inside the history, as here): what stays must still be right."""
    monkeypatch.setattr(positions, "MERGE_ROWS", merge_rows)
    monkeypatch.setattr(positions, "PUT_ROWS", put_rows)
    rng = np.random.default_rng(seed)
    actions = ["hold", "buy", "sell", "close_long", "close_short"]
    table, book = Table(), PositionBook()
    first = list(range(40))
    table.write(first, [actions[i] for i in rng.integers(0, 5, 40)])
    learn(book, table)
    ts, codes = table.events()
    assert book.load_events(KEY, ts, codes)
    check(book, table)
    for _ in range(300):
        kind = rng.integers(0, 4)
        newest = max(table.rows)
        if kind == 0:  # the live case: the next bar
            minutes = [newest + 1]
        elif kind == 1:  # a replay of one bar inside history
            minutes = [int(rng.integers(0, newest + 1))]
        elif kind == 2:  # a few bars after the newest, at once
            minutes = list(range(newest + 1, newest + 1 + int(rng.integers(2, 6))))
        else:  # a bulk rewrite across history and past its end
            lo = int(rng.integers(0, newest + 1))
            minutes = list(range(lo, lo + int(rng.integers(2, 30))))
        written = [actions[i] for i in rng.integers(0, 5, len(minutes))]
        table.write(minutes, written)
        book.remember(batch(minutes, written))
        if book.sides_before(KEY, T0 + np.array([0]) * MIN) is None:  # dropped: load again
            assert len(minutes) > merge_rows
            summary = book.summary(KEY)
            if summary is not None:  # kept: it must agree with the table already
                newest, side, last = table.summary()
                assert summary[0] == T0 + newest * MIN and summary[1] == side
                assert summary[2] == (None if last is None else T0 + last * MIN)
            else:
                learn(book, table)
            assert book.load_events(KEY, *table.events())
        check(book, table)
    # a shadow's rows are not the signal's position
    before = book.sides_before(KEY, T0 + np.array([max(table.rows) + 1]) * MIN)
    book.remember(batch([max(table.rows) + 1], ["sell"], shadow=True))
    after = book.sides_before(KEY, T0 + np.array([max(table.rows) + 1]) * MIN)
    assert before is not None and after is not None and before.tolist() == after.tolist()


def test_without_events_the_summary_follows_appends_and_forgets_what_it_cannot_follow() -> None:
    table, book = Table(), PositionBook()
    table.write([0, 1, 2], ["buy", "hold", "hold"])
    learn(book, table)
    assert book.side_after_newest(KEY, T0 + np.array([3]) * MIN) == LONG
    assert book.side_after_newest(KEY, T0 + np.array([2]) * MIN) is None  # inside history
    assert book.sides_before(KEY, T0 + np.array([1]) * MIN) is None  # events not loaded
    book.remember(batch([3, 4], ["sell", "hold"]))
    assert book.side_after_newest(KEY, T0 + np.array([5]) * MIN) == SHORT
    book.remember(batch([1], ["buy"]))  # before the newest event (3): the position stands
    assert book.side_after_newest(KEY, T0 + np.array([5]) * MIN) == SHORT
    book.remember(batch([3], ["close_short"]))  # the newest event rewritten: learn again
    assert KEY not in book
    assert book.side_after_newest(KEY, T0 + np.array([5]) * MIN) is None


def test_loaded_events_are_bounded_least_recently_used_first() -> None:
    book = PositionBook(max_events=10)
    keys = [("sig", 1, symbol, "1m") for symbol in ("A", "B", "C")]
    for key in keys:
        book.learn(key, T0 + 3 * MIN, LONG, T0 + 3 * MIN)
        assert book.load_events(key, T0 + np.arange(4) * MIN, np.full(4, ACTION_CODE["buy"]))
    assert book.loaded_events <= 10
    assert book.sides_before(keys[0], T0 + np.array([1]) * MIN) is None  # the oldest dropped
    assert book.sides_before(keys[2], T0 + np.array([1]) * MIN) is not None
    assert book.side_after_newest(keys[0], T0 + np.array([9]) * MIN) == LONG  # its summary stays
    # a history larger than half the bound is not loaded at all
    assert not book.load_events(keys[1], T0 + np.arange(6) * MIN, np.full(6, ACTION_CODE["buy"]))


def test_an_empty_history_is_known_and_follows_its_first_rows() -> None:
    book = PositionBook()
    book.learn_empty(KEY)
    assert book.known_empty(KEY) and book.summary(KEY) is None
    assert book.side_after_newest(KEY, T0 + np.array([0]) * MIN) == FLAT
    book.remember(batch([0, 1], ["buy", "hold"]))
    assert not book.known_empty(KEY)
    assert book.side_after_newest(KEY, T0 + np.array([2]) * MIN) == LONG
    summary = book.summary(KEY)
    assert summary is not None and summary[0] == T0 + 1 * MIN and summary[2] == T0
