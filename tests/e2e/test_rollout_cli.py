"""``sigserve rollout``: start, status, advance, report, rollback, promote, with audit rows
(actor ``cli:<user>``) and refusals, on a copy of the HTTP world's home."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.http_world import SIGNAL
from tests.e2e.test_cli import cli, ok, ok_json, refused


def test_rollout_commands(home: Path) -> None:
    refused(home, "validation_error", "rollout", "advance", SIGNAL)
    refused(home, "model_not_found", "rollout", "start", SIGNAL, "--version", "9")
    refused(home, "signal_not_found", "rollout", "status", "nope")
    started = ok_json(home, "rollout", "start", SIGNAL, "--version", "2")
    assert started["to"]["stage"] == "shadow" and started["actor"].startswith("cli:")
    assert "champion 1, challenger 2 at 10%" in ok(home, "rollout", "advance", SIGNAL)
    # a backfill through the rollout, then the report sees both versions on every bar
    ok(home, "backfill", "--signal", SIGNAL, "--symbol", "BTCUSDT", "--interval", "1h", "--mode", "window",
       "--start", "2024-01-04T00:00Z", "--end", "2024-01-08T00:00Z")
    report = ok_json(home, "rollout", "report", SIGNAL, "--horizon", "2")
    assert report["versions"] == [1, 2] and report["bars"] == 97
    assert report["comparisons"][0]["agreement_rate"] == 1.0  # version 2 is the same file
    ok(home, "rollout", "rollback", SIGNAL)
    status = ok_json(home, "rollout", "status", SIGNAL)
    assert status["policy"]["challenger"] is None and status["serving"] == 1
    assert [e["action"] for e in status["events"]] == ["start", "advance", "rollback"]
    text = ok(home, "rollout", "status", SIGNAL)
    assert "rollback" in text and "share 0.1->0.0" in text
    result = cli(home, "rollout", "promote", SIGNAL)
    assert result.rc == 2 and result.err.startswith("validation_error:")
    json.dumps(status)
