"""Where a rate phase's late messages waited, from the kernel's scheduler events.

``bench/stream.py`` runs this when ``SIGSERVE_BENCH_SCHED=1`` (Linux, root, ``perf`` on the
PATH): ``perf sched record`` runs system-wide during each rate phase, on CLOCK_MONOTONIC (the
clock of the send times), and the result gets a ``sched`` entry. For the messages over
``late_ms`` it tells, averaged over their windows (send to receive), how long each party ran and
how long each waited for a CPU once woken:

- ``ran_ms``: worker (its main thread: the event loop), worker_threads (its other threads and
  its store process), nats, client (the measuring process), other, idle (CPU time nobody used,
  summed over the CPUs);
- ``max_wait_ms``: per party, the longest wake-to-run delay that began in the window;
- ``late_with_idle_and_waiting``: the share of late windows in which a CPU sat idle for 0.5 ms or
  more while nats-server, the client or the worker waited 0.5 ms or more for a CPU (the guest's
  scheduler had a CPU to give: the wait was the wake-up of an idle vCPU, or a placement).

Over the whole phase: each party's wake-to-run delay p99 and its share over 0.5 ms, and
``worker_runs_per_s``: how often the worker's loop ran 1-2, 2-4 and 4+ ms without sleeping (a
burst holds a vCPU the NATS server and the client then lack; on VM-Q, stop 25, the write cycles
made nearly all of them). Usage::

    SIGSERVE_BENCH_SCHED=1 flock /tmp/sigserve-bench.lock .venv/bin/python bench/stream.py \\
        --stores duckdb --phases rate-1000-core --seconds 10
    .venv/bin/python bench/tail_sched.py timehist.txt dump.npy WORKER_PID   # a kept trace again
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

PARTIES = ("worker", "worker_threads", "nats", "client", "other", "idle")
# run-slice lengths (ms) counted in ``whole_phase.worker_runs_per_s``
_RUN_BANDS = (("1-2_ms", 1.0, 2.0), ("2-4_ms", 2.0, 4.0), ("4_ms_and_more", 4.0, float("inf")))
_SWITCH = re.compile(r"\s*([\d.]+)\s+\[(\d+)\]\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")
_TASK = re.compile(r"(.*)\[(\d+)(?:/(\d+))?\]$")
_SIGNIFICANT_MS = 0.5


class SchedTrace:
    """``perf sched record`` around a phase; :meth:`stop` gives the ``timehist`` text."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="sigserve-sched-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        """None when a trace can be taken, else why not."""
        if not sys.platform.startswith("linux"):
            return "not Linux"
        if shutil.which("perf") is None:
            return "perf is not on the PATH"
        return None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["perf", "sched", "record", "-k", "CLOCK_MONOTONIC", "-o", str(self.folder / "sched.data")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> str:
        if self.proc is None:
            return ""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=120)
        if self.proc.returncode not in (0, -signal.SIGINT):
            raise RuntimeError(f"perf sched record failed: {err.decode(errors='replace')[-500:]}")
        out = subprocess.run(["perf", "sched", "timehist", "-w", "-i", str(self.folder / "sched.data")],
                             capture_output=True, text=True, timeout=600, check=True).stdout
        shutil.rmtree(self.folder, ignore_errors=True)
        return out


def _party(name: str, worker_pid: int, client_pid: int, family: set[int]) -> int:
    """The index in PARTIES of a ``comm[tid/pid]`` (or ``comm[pid]``) task name."""
    if name.startswith("<idle>"):
        return PARTIES.index("idle")
    match = _TASK.match(name)
    if match is None:
        return PARTIES.index("other")
    comm, tid, pid = match[1], int(match[2]), int(match[3] or match[2])
    if tid == worker_pid:
        return PARTIES.index("worker")
    if pid == worker_pid or pid in family:
        return PARTIES.index("worker_threads")
    if comm.startswith("nats-server"):
        return PARTIES.index("nats")
    if pid == client_pid or comm == "pacer":
        return PARTIES.index("client")
    return PARTIES.index("other")


def parse(timehist: str, worker_pid: int, client_pid: int, family: set[int]) -> dict[str, np.ndarray]:
    """Every run slice: its end (s), CPU, party, wake-to-run delay before it (ms) and length (ms)."""
    end, cpu, party, delay, length = [], [], [], [], []
    for line in timehist.splitlines():
        match = _SWITCH.match(line)
        if match is None:
            continue
        end.append(float(match[1]))
        cpu.append(int(match[2]))
        party.append(_party(match[3], worker_pid, client_pid, family))
        delay.append(float(match[5]))
        length.append(float(match[6]))
    order = np.argsort(np.array(end))
    return {"end": np.array(end)[order], "cpu": np.array(cpu, dtype=np.int32)[order],
            "party": np.array(party, dtype=np.int32)[order], "delay": np.array(delay)[order],
            "length": np.array(length)[order]}


def analyze(slices: dict[str, np.ndarray], sent: np.ndarray, latency_ms: np.ndarray,
            late_ms: float = 1.5) -> dict[str, Any]:
    """The ``sched`` entry of a rate phase (see the module's docstring)."""
    end, party, delay, length = slices["end"], slices["party"], slices["delay"], slices["length"]
    if end.size == 0:
        return {"error": "no scheduler events"}
    start = end - length / 1000.0  # also where the wake-to-run delay before the slice ended
    covered = (sent > start.min()) & (sent + latency_ms / 1000.0 < end.max())
    late = np.flatnonzero(covered & (latency_ms > late_ms))
    longest = float(length.max()) / 1000.0
    ran = np.zeros(len(PARTIES))
    worst = np.zeros(len(PARTIES))
    idle_and_waiting = 0
    path = [PARTIES.index(p) for p in ("worker", "nats", "client")]
    for k in late:
        lo, hi = sent[k], sent[k] + latency_ms[k] / 1000.0
        first, last = np.searchsorted(end, lo), np.searchsorted(end, hi + longest)
        s, e, p = start[first:last], end[first:last], party[first:last]
        overlap = np.clip(np.minimum(e, hi) - np.maximum(s, lo), 0.0, None) * 1000.0
        ran_here = np.bincount(p, weights=overlap, minlength=len(PARTIES))
        ran += ran_here
        began = (s >= lo - 0.002) & (s < hi)
        waits = np.zeros(len(PARTIES))
        np.maximum.at(waits, p[began], delay[first:last][began])
        worst += waits
        if ran_here[PARTIES.index("idle")] >= _SIGNIFICANT_MS and waits[path].max() >= _SIGNIFICANT_MS:
            idle_and_waiting += 1
    n = max(late.size, 1)
    whole: dict[str, Any] = {}
    for i, name in enumerate(PARTIES[:-1]):
        mine = delay[party == i]
        if mine.size:
            whole[name] = {"wake_to_run_p99_ms": round(float(np.percentile(mine, 99)), 3),
                           "over_0_5_ms_pct": round(float((mine > _SIGNIFICANT_MS).mean() * 100), 2)}
    # The worker loop's runs of 1 ms and more, per second of trace: the bursts it holds a vCPU
    # for (a write cycle's work and its settling), whatever the messages' latency says.
    seconds = max(float(end.max() - start.min()), 1e-9)
    worker_runs = length[party == PARTIES.index("worker")]
    whole["worker_runs_per_s"] = {
        label: round(float(((worker_runs >= lo) & (worker_runs < hi)).sum()) / seconds, 1)
        for label, lo, hi in _RUN_BANDS}
    return {
        "messages": int(covered.sum()), "late_ms": late_ms, "late": int(late.size),
        "late_pct": round(late.size / max(int(covered.sum()), 1) * 100, 2),
        "late_windows": {
            "ran_ms": {name: round(float(v / n), 3) for name, v in zip(PARTIES, ran, strict=True)},
            "max_wait_ms": {name: round(float(v / n), 3) for name, v in zip(PARTIES, worst, strict=True)
                            if name != "idle"},
            "late_with_idle_and_waiting_pct": round(idle_and_waiting / n * 100, 1),
        },
        "whole_phase": whole,
    }


def main() -> None:
    timehist, dump, worker_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sent, latency, _ = np.load(dump)
    slices = parse(Path(timehist).read_text(), worker_pid, client_pid=-1, family=set())
    print(json.dumps(analyze(slices, sent, latency), indent=1))


if __name__ == "__main__":
    main()
