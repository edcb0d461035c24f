"""bench/stream.py's HostMeter: steal time and IPIs per message over a window."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.bench_modules import load_bench_module


@pytest.fixture(scope="module")
def stream_bench() -> ModuleType:
    return load_bench_module("stream")


def write_proc(folder: Path, *, user: int, idle: int, iowait: int, steal: int, cal: tuple[int, int],
               res: tuple[int, int]) -> None:
    # /proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice
    (folder / "stat").write_text(f"cpu  {user} 0 10 {idle} {iowait} 0 0 {steal} 0 0\ncpu0 1 2 3\n")
    (folder / "interrupts").write_text(
        "           CPU0       CPU1\n"
        "  0:         40          0   IO-APIC    2-edge      timer\n"
        f"RES: {res[0]:>10} {res[1]:>10}   Rescheduling interrupts\n"
        f"CAL: {cal[0]:>10} {cal[1]:>10}   Function call interrupts\n"
        "TLB:        500        600   TLB shootdowns\n")


def test_window_deltas(stream_bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meter = stream_bench.HostMeter(tmp_path)
    meter.tick = 100
    clock = iter([1000.0, 1002.0])  # a 2 s window
    monkeypatch.setattr(stream_bench.time, "monotonic", lambda: next(clock))
    write_proc(tmp_path, user=1000, idle=5000, iowait=0, steal=30, cal=(100, 200), res=(10, 20))
    meter.start()
    # 2 s x 2 CPUs = 400 ticks, 50 of them stolen; 2,000 CALs and 100 RESs
    write_proc(tmp_path, user=1150, idle=5180, iowait=20, steal=80, cal=(1100, 1200), res=(60, 70))
    out = meter.stop(1000)
    assert out == {"host_steal_ms_per_s": 250.0,  # 50 ticks = 500 ms over 2 s
                   "host_ipi_per_msg": 2.1}  # 2,100 over 1,000 messages (TLB shootdowns not counted)


def test_nothing_without_proc(stream_bench: ModuleType, tmp_path: Path) -> None:
    meter = stream_bench.HostMeter(tmp_path / "absent")
    meter.start()
    assert meter.stop(1000) == {}
