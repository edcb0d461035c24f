"""trading_decision events on a real NATS JetStream audit bus: one per /api/v1/predict decision,
stored in the decisions stream (message id = decision_id), sent after the response."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from sigserve.bus.nats import NatsBus
from tests.e2e.http_world import BTC, World, serving, settings_for
from tests.services import require_tcp

URL = "nats://127.0.0.1:4222"


async def test_decisions_reach_nats(home: Path, world: World) -> None:
    require_tcp("NATS", "127.0.0.1", 4222)
    subject = f"audit_test_{uuid.uuid4().hex[:8]}.trading_decision"
    listener = NatsBus(URL)
    await listener.connect()
    got: list[dict[str, Any]] = []

    async def handler(msg: Any) -> None:
        got.append(json.loads(msg.data))

    await listener.subscribe(f"{subject}.>", handler)
    stream = "DECISIONS_" + subject.replace(".", "_")
    try:
        async with serving(settings_for(home, audit_bus=URL, audit_subject=subject)) as (_, client):
            ids = []
            for i in (150, 151, 152, 153):
                r = await client.post("/api/v1/predict", json={
                    "symbol": BTC, "timestamp": world.t(i), "features": world.feature_dict(BTC, i)})
                assert r.status_code == 200
                ids.append(r.json()["decision_id"])
            for _ in range(100):
                if len(got) == len(ids):
                    break
                await asyncio.sleep(0.05)
        assert [g["decision_id"] for g in got] == ids
        assert all(g["event"] == "trading_decision" and g["symbol"] == BTC for g in got)
        assert await listener.stream_count(stream) == len(ids)
    finally:
        await listener.delete_stream(stream)
        await listener.close()
