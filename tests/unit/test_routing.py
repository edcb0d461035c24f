"""The routing rule is deterministic across processes (never Python's salted hash()), follows
its documented formula, and splits traffic in proportion to the share."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from sigserve.domain import TrafficPolicy
from sigserve.errors import ValidationError
from sigserve.routing import bucket, challenger_mask, trading_date
from sigserve.routing import rollout as steps


def test_bucket_is_the_documented_formula() -> None:
    digest = hashlib.sha256(b"BTCUSDT|2024-03-01").digest()
    assert bucket("BTCUSDT", "2024-03-01") == int.from_bytes(digest[:8], "big") / 2**64
    assert trading_date(np.datetime64("2024-03-01T23:59:59.999999", "us")) == "2024-03-01"


def test_bucket_is_the_same_in_other_processes() -> None:
    code = "from sigserve.routing import bucket; print(repr(bucket('ETHUSDT', '2024-05-06')))"
    outputs = set()
    for seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outputs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   env=env, check=True).stdout.strip())
    assert outputs == {repr(bucket("ETHUSDT", "2024-05-06"))}


def test_mask_is_per_trading_date_and_matches_bucket() -> None:
    ts = np.arange(np.datetime64("2024-01-01T00:00", "us"), np.datetime64("2024-03-01T00:00", "us"),
                   np.timedelta64(1, "h"))
    mask = challenger_mask("BTCUSDT", ts, 0.3)
    for t, taken in zip(ts[::7], mask[::7], strict=True):
        assert taken == (bucket("BTCUSDT", trading_date(t)) < 0.3)
    days = ts.astype("datetime64[D]")
    for day in np.unique(days):  # the same symbol on the same day: one version
        assert len(set(mask[days == day].tolist())) == 1
    assert not challenger_mask("BTCUSDT", ts, 0.0).any() and challenger_mask("BTCUSDT", ts, 1.0).all()
    assert 0.2 < mask.mean() < 0.4


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_a_rollouts_split_routes_each_bar_as_pick_does(share: float) -> None:
    champion, challenger = object(), object()  # split and pick only hand the versions back
    rollout = steps.RolloutSet(TrafficPolicy("sig", 1, 2, share), champion, challenger, share)  # type: ignore[arg-type]
    ts = np.arange(np.datetime64("2024-01-01T00:00", "us"), np.datetime64("2024-02-01T00:00", "us"),
                   np.timedelta64(3, "h"))
    parts = rollout.split("BTCUSDT", ts)
    assert all(rows.any() for _, rows in parts)  # a version taking no bar is left out
    routed = np.empty(ts.size, dtype=object)
    for version, rows in parts:
        assert (routed[rows] == None).all()  # noqa: E711 - each bar goes to one version
        routed[rows] = version
    assert [rollout.pick("BTCUSDT", t) for t in ts] == routed.tolist()
    alone = steps.RolloutSet(TrafficPolicy("sig", 1), champion, None, 0.0)  # type: ignore[arg-type]
    assert [(v, rows.all()) for v, rows in alone.split("BTCUSDT", ts)] == [(champion, True)]
    assert alone.split("BTCUSDT", ts[:0]) == []


def test_stage_transitions() -> None:
    policy = steps.start(None, "s", champion=1, candidate=2, shadows=(5, 1))
    assert (policy.champion, policy.challenger, policy.share, policy.shadows, policy.stage) \
        == (1, 2, 0.0, (5,), "shadow")
    assert policy.versions == (1, 2, 5)
    shares = []
    for _ in range(3):
        policy = steps.advance(policy)
        shares.append((policy.share, policy.stage))
    assert shares == [(0.1, "canary"), (0.5, "canary"), (1.0, "full")]
    with pytest.raises(ValidationError):
        steps.advance(policy)
    with pytest.raises(ValidationError):
        steps.start(policy, "s", 1, 3)  # one rollout at a time
    promoted = steps.promote(policy)
    assert (promoted.champion, promoted.challenger, promoted.share, promoted.stage) == (2, None, 0.0, "none")
    back = steps.rollback(policy)
    assert (back.champion, back.challenger, back.share) == (1, None, 0.0)
    with pytest.raises(ValidationError):
        steps.promote(back)
    with pytest.raises(ValidationError):
        steps.start(None, "s", champion=1, candidate=1)
    assert steps.advance(steps.start(None, "s", 1, 2), share=0.25).share == 0.25
    assert TrafficPolicy.from_dict(policy.to_dict()) == policy
