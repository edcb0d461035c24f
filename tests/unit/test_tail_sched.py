"""bench/tail_sched.py: a rate phase's late messages against the scheduler's run slices."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from tests.bench_modules import load_bench_module


@pytest.fixture(scope="module")
def tail_sched() -> ModuleType:
    return load_bench_module("tail_sched")


def switch(end: float, cpu: int, task: str, delay_ms: float, run_ms: float) -> str:
    """A ``perf sched timehist -w`` switch line: time, CPU, task, wait, scheduling delay, run time."""
    return f"  {end:.6f} [{cpu:04d}]  {task:<30}  0.000  {delay_ms:.3f}  {run_ms:.3f}"


# Worker 100 (its thread 101 and its store process 200), nats-server 50, the client's pacer 70.
TIMEHIST = "\n".join([
    "           time    cpu  task name                       wait time  sch delay   run time",
    "--------------- ------  ------------------------------  ---------  ---------  ---------",
    # 10.000-10.004 on CPU 0: the worker's loop runs 3 ms, then nats-server runs 1 ms after
    # waiting 2.5 ms for a CPU (woken at 10.0005).
    switch(10.003, 0, "sigserve[100]", 0.0, 3.0),
    switch(10.004, 0, "nats-server[51/50]", 2.5, 1.0),
    # CPU 1 sits idle 3.5 ms of the window, then the store process runs 0.5 ms.
    switch(10.0035, 1, "<idle>", 0.0, 3.5),
    switch(10.004, 1, "python[200]", 0.1, 0.5),
    "    10.004100 [0001]  pacer[70/69]                                 awakened: nats-server[51/50]",
    # later, far from the late message: a quick client slice and a worker thread's slice
    switch(10.050, 1, "pacer[70/69]", 0.02, 0.05),
    switch(10.060, 0, "sigserve[101/100]", 0.01, 0.2),
])


def test_parse_sorts_slices_and_names_each_party(tail_sched: ModuleType) -> None:
    slices = tail_sched.parse(TIMEHIST, worker_pid=100, client_pid=-1, family={200})
    names = [tail_sched.PARTIES[p] for p in slices["party"].tolist()]
    assert names == ["worker", "idle", "nats", "worker_threads", "client", "worker_threads"]
    assert slices["end"].tolist() == sorted(slices["end"].tolist())
    assert slices["delay"][names.index("nats")] == pytest.approx(2.5)


def test_a_late_message_is_charged_to_who_ran_and_who_waited(tail_sched: ModuleType) -> None:
    slices = tail_sched.parse(TIMEHIST, worker_pid=100, client_pid=-1, family={200})
    sent = np.array([10.0002, 10.040])
    latency_ms = np.array([4.0, 0.3])  # the first is late (10.0002-10.0042), the second is not
    result = tail_sched.analyze(slices, sent, latency_ms, late_ms=1.5)
    assert (result["messages"], result["late"], result["late_pct"]) == (2, 1, 50.0)
    window = result["late_windows"]
    ran = window["ran_ms"]
    assert ran["worker"] == pytest.approx(2.8)
    assert ran["nats"] == pytest.approx(1.0)
    assert ran["idle"] == pytest.approx(3.3)
    assert ran["worker_threads"] == pytest.approx(0.5)  # the store process, in the window
    assert ran["client"] == 0.0  # its slice ended 46 ms after the window
    assert window["max_wait_ms"]["nats"] == pytest.approx(2.5)
    # CPU 1 idle 3.3 ms of it while nats-server waited 2.5 ms: a wait the guest had a CPU for
    assert window["late_with_idle_and_waiting_pct"] == 100.0
    assert result["whole_phase"]["nats"]["over_0_5_ms_pct"] == 100.0
    assert result["whole_phase"]["worker"]["over_0_5_ms_pct"] == 0.0
    # the trace spans 10.000-10.060 s (60 ms): the worker loop's one 3 ms run, none shorter
    # than 1 ms counted (its thread's 0.2 ms run is another party's)
    assert result["whole_phase"]["worker_runs_per_s"] == {
        "1-2_ms": 0.0, "2-4_ms": round(1 / 0.060, 1), "4_ms_and_more": 0.0}


def test_no_late_message_charges_nothing(tail_sched: ModuleType) -> None:
    slices = tail_sched.parse(TIMEHIST, worker_pid=100, client_pid=-1, family={200})
    result = tail_sched.analyze(slices, np.array([10.0002]), np.array([1.0]), late_ms=1.5)
    assert result["late"] == 0
    assert set(result["late_windows"]["ran_ms"].values()) == {0.0}
    assert tail_sched.analyze(tail_sched.parse("", 1, 2, set()), np.array([1.0]), np.array([9.0])) == {
        "error": "no scheduler events"}
