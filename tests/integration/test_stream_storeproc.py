"""The stream worker on a DuckDB store in a child process (``sigserve stream``'s wiring): every
message gives one stored row and one published signal, a bar sent again publishes the same
signal id and stays one row, and a second worker on the same file refuses at start."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from sigserve.bus import MemoryBus
from sigserve.config import Settings
from sigserve.errors import StoreUnavailable
from sigserve.stream import Names
from sigserve.stream_cli import _open_services
from tests.integration.test_stream import (
    INTERVAL,
    SIGNAL,
    Rig,
    make_market,
    seed_store,
    until_async,
)


async def test_a_worker_on_a_store_process_stores_and_publishes_each_bar_once(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", store=f"duckdb:///{tmp_path / 'sigserve.duckdb'}")
    async with _open_services(settings, True) as services:
        assert type(services.store).__name__ == "StoreProcess"
        bus = MemoryBus()
        await bus.connect()
        market = make_market(("BTCUSDT", "ETHUSDT"), 80)
        await seed_store(services, tmp_path, market)
        names = Names(prefix=f"t{uuid.uuid4().hex[:10]}")
        rig = Rig(services, bus, market, names)
        await bus.subscribe(names.signals_all, rig.signals)
        try:
            worker = await rig.worker()
            assert worker.writer.linger_s > 0  # group commit on the embedded store
            for i in range(30):
                for symbol in market.symbols:
                    await rig.publish(symbol, i)
            got = await rig.signals.wait(60)
            assert len({m["signal_id"] for m in got}) == 60

            async def stored(n: int) -> bool:
                return len(await rig.stored()) >= n

            await until_async(lambda: stored(60), what="60 stored rows")
            rows = await rig.stored()
            assert len(rows) == 60 and {r["source"] for r in rows} == {"stream"}
            by_key = {(m["symbol"], m["timestamp_ms"]): m for m in got}
            for r in rows:
                m = by_key[(r["symbol"], int(np.datetime64(r["ts"], "ms").astype(np.int64)))]
                assert m["signal_type"] == r["action"] and m["confidence_score"] == r["confidence"]
            # the same bar again: the same signal id, still one row
            await rig.publish(market.symbols[0], 0)
            await rig.signals.wait(61)
            assert rig.signals.messages[-1]["signal_id"] in {m["signal_id"] for m in got}
            assert len(await rig.stored()) == 60
            # a second worker process on the same file refuses at start (one writing process)
            second = Settings(home=tmp_path / "home2", store=settings.store_url)
            with pytest.raises(StoreUnavailable):
                async with _open_services(second, True):
                    pass
        finally:
            for w in rig.workers:
                await w.stop()
            await bus.close()
        assert await services.store.last_signal_ts(SIGNAL, market.symbols[0], INTERVAL) == market.ts[29]
