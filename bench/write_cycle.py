"""A stream worker's write cycle alone: ``Store.write_signal_batches`` of K histories x R rows.

A worker's write cycle (``sigserve.stream.SignalWriter``) hands the store every history's rows
of the last ``write_linger_ms`` in one call. Its cost in the worker's own process is CPU the
worker's loop does not spend receiving and publishing; how it grows with the number of symbols
(histories) a worker serves is the point of this bench. Each shape is written ``--cycles`` times
back to back, each cycle the next bars (appends, as a live stream writes), after a warm-up.

    .venv/bin/python bench/write_cycle.py                                # PostgreSQL, the default shapes
    .venv/bin/python bench/write_cycle.py --stores postgres,duckdb --shapes 4x12,50x1,50x2,200x1

Reported per shape: the calling process's CPU per cycle (``time.process_time``: the worker's
share; DuckDB runs in the calling process here, PostgreSQL's server work is not counted) and
the wall time per cycle, p50/p99, and the CPU per row. PostgreSQL needs
``SIGSERVE_BENCH_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``); the bench
writes to a schema of its own there and drops it after.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from common import machine, percentiles, write_result

from sigserve.domain import ACTION_CODE, SignalBatch
from sigserve.stores import Store, open_store

PG = os.environ.get("SIGSERVE_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
T0 = np.datetime64("2024-01-01T00:00:00", "us")
HOUR = np.timedelta64(3_600_000_000, "us")
KINDS = [ACTION_CODE[a] for a in ("buy", "hold", "sell", "hold", "close_long")]


def signal_batch(symbol: str, first_hour: int, rows: int) -> SignalBatch:
    """``rows`` stream signals of one history from ``first_hour`` on (a binary classifier's
    two-wide raw output, levels on every row, one feature key)."""
    return SignalBatch(
        signal_id="bench-cycle", symbol=symbol, interval="1h", model_name="m", model_version=1,
        model_sha256="ab" * 32, source="stream", ts=T0 + (first_hour + np.arange(rows)) * HOUR,
        action=np.array([KINDS[(first_hour + i) % len(KINDS)] for i in range(rows)], dtype=np.int8),
        confidence=np.linspace(0.55, 0.9, rows), raw_output=np.tile([0.3, 0.7], (rows, 1)),
        entry_price=np.full(rows, 100.0), stop_loss=np.full(rows, 95.0), take_profit=np.full(rows, 110.0),
        recommended_size=np.full(rows, 0.5), feature_keys=np.array(["fk"] * rows, dtype=object),
        latency_ms=np.full(rows, 0.3), flags=np.array([""] * rows, dtype=object))


async def bench_shape(store: Store, histories: int, rows: int, cycles: int, warm: int) -> dict[str, Any]:
    cpu_ms: list[float] = []
    wall_ms: list[float] = []
    for cycle in range(warm + cycles):
        batches = [signal_batch(f"S{k}", cycle * rows, rows) for k in range(histories)]
        c0, w0 = time.process_time(), time.perf_counter()
        await store.write_signal_batches(batches)
        if cycle >= warm:
            cpu_ms.append((time.process_time() - c0) * 1000.0)
            wall_ms.append((time.perf_counter() - w0) * 1000.0)
    cpu, wall = percentiles(cpu_ms), percentiles(wall_ms)
    return {"shape": f"{histories}x{rows}", "histories": histories, "rows_per_history": rows,
            "cycles": cycles, "cpu_ms": {k: round(cpu[k], 3) for k in ("p50", "p99", "mean")},
            "wall_ms": {k: round(wall[k], 3) for k in ("p50", "p99", "mean")},
            "cpu_us_per_row": round(cpu["p50"] * 1000.0 / (histories * rows), 1)}


async def bench_store(kind: str, shapes: list[tuple[int, int]], cycles: int, warm: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="sigserve-bench-cycle-") as tmp:
        schema = f"bench_cycle_{uuid.uuid4().hex[:8]}"
        if kind == "postgres":
            url = f"{PG}{'&' if '?' in PG else '?'}schema={schema}"
        else:
            url = f"duckdb:///{Path(tmp) / 'cycle.duckdb'}"
        store = open_store(url)
        await store.open()
        try:
            out = []
            for histories, rows in shapes:
                result = await bench_shape(store, histories, rows, cycles, warm)
                result["store"] = kind
                print(result, flush=True)
                out.append(result)
            return out
        finally:
            await store.close()
            if kind == "postgres":
                import asyncpg

                con = await asyncpg.connect(PG)
                try:
                    await con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                finally:
                    await con.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default="postgres", help="comma-separated: postgres, duckdb")
    parser.add_argument("--shapes", default="4x12,20x3,50x1,50x2,200x1",
                        help="histories x rows per cycle, comma-separated")
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--warm", type=int, default=30)
    args = parser.parse_args()
    shapes = [(int(k), int(r)) for k, r in (shape.split("x") for shape in args.shapes.split(","))]
    results: list[dict[str, Any]] = []
    for kind in args.stores.split(","):
        results += uvloop.run(bench_store(kind.strip(), shapes, args.cycles, args.warm))
    path = write_result("write-cycle", {"machine": machine(), "runs": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
