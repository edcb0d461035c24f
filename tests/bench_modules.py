"""The bench's scripts as modules for tests (``bench/`` is no package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_module(name: str) -> ModuleType:
    """``bench/<name>.py``, imported by path (with ``bench/`` on ``sys.path`` meanwhile, for the
    sibling modules a script imports by name, as it does when run).

    Usage::

        tail_sched = load_bench_module("tail_sched")
    """
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    added = str(BENCH) not in sys.path
    if added:
        sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(str(BENCH))
    return module
