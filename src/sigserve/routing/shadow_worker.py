"""The shadow worker process: ``python -m sigserve.routing.shadow_worker --home HOME``, started
by a server's :class:`.shadow_process.ShadowProcessRunner` (see there for the protocol).

It reads frames on stdin and answers on stdout. Each shadow version is loaded once, as the server
loads a model (lifecycle and sha checks, lleaves' compiled object verified too); jobs are
gathered for ``--linger-ms`` after the first, then predicted together (one vectorised predict per
version and symbol, ``Engine.compute``: no I/O) and sent back with their comparisons. The server
writes the rows: the worker never opens the store. It ends at the end of its input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pickle
import selectors
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..config import Settings
from ..errors import ModelNotFound, SigserveError
from ..registry.models import ModelRegistry
from .shadow import ShadowRows, predict_shadows
from .shadow_process import (
    FLUSH,
    FLUSHED,
    JOB,
    KEEP_VERSIONS,
    LOAD,
    LOAD_FAILED,
    RESULTS,
    decode_job,
    frame,
    read_available,
    read_frames,
)

if TYPE_CHECKING:
    from ..domain import ModelCard
    from ..engine import Engine, Prepared


class ShippedCards(ModelRegistry):
    """The registry's loading (sha checks, runtime cache) over the cards the server sent: an
    ensemble's parts are looked up here, not in the store. The worker never reads or writes the
    store (cards come from the server, rows go back to it), so it has none."""

    def __init__(self, home: Path, threads: int) -> None:
        super().__init__(cast(Any, None), Settings(home=home, predict_threads=threads))
        self.cards: dict[tuple[str, int], ModelCard] = {}

    async def get(self, name: str, version: int) -> ModelCard:
        card = self.cards.get((name, version))
        if card is None:
            raise ModelNotFound(f"no model {name}:{version}", details={"name": name, "version": version})
        return card


class Worker:
    def __init__(self, home: Path, threads: int, linger_s: float, max_batch: int, out: Any) -> None:
        from ..engine import Engine

        self.registry = ShippedCards(home, threads)
        self.engine: Engine = Engine(cast(Any, None), self.registry)  # compute() only: no I/O
        self.linger_s = linger_s
        self.max_batch = max_batch
        self.versions: OrderedDict[int, Prepared | None] = OrderedDict()  # None: failed to load
        self.pending: list[ShadowRows] = []
        self.pending_failed = 0
        self.first_at = 0.0
        self.out = out

    def load(self, payload: bytes) -> None:
        from ..engine import assemble

        key, definition, card, parts = pickle.loads(payload)
        self.versions[key] = None
        while len(self.versions) > KEEP_VERSIONS:
            self.versions.popitem(last=False)
        try:
            self.registry.cards.update({(p.name, p.version): p for p in parts})
            self.versions[key] = assemble(definition, card, asyncio.run(self.registry.runtime(card)))
        except SigserveError as exc:
            self.send(LOAD_FAILED, pickle.dumps((f"{card.ref}", exc.code, exc.message)))
        except Exception as exc:  # a version that cannot load fails its jobs, not the worker
            self.send(LOAD_FAILED, pickle.dumps((f"{card.ref}", "internal_error", repr(exc))))

    def job(self, payload: bytes) -> None:
        fields = pickle.loads(payload)
        shadow = self.versions.get(fields[0])
        if shadow is None:  # its version failed to load
            self.pending_failed += 1
        else:
            _, served_version, rows, served, source, write = decode_job(fields, shadow.read_names)
            self.pending.append(ShadowRows(shadow, served_version, rows, served, source, write))
        if len(self.pending) + self.pending_failed == 1:
            self.first_at = time.monotonic()

    def predict(self) -> None:
        items, failed = self.pending, self.pending_failed
        self.pending, self.pending_failed = [], 0
        if not items and not failed:
            return
        rows: list[Any] = []
        comparisons: list[Any] = []
        try:
            rows, comparisons = predict_shadows(self.engine, items)
        except Exception as exc:  # counted by the server; the worker goes on
            print(f"sigserve shadow worker: predictions failed: {exc!r}", file=sys.stderr)
            failed += len(items)
            items = []
        self.send(RESULTS, pickle.dumps((rows, [tuple(c) for c in comparisons], len(items), failed),
                                        pickle.HIGHEST_PROTOCOL))

    def due(self) -> float | None:
        """Seconds until the gathered jobs are predicted (None: none gathered)."""
        if not self.pending and not self.pending_failed:
            return None
        if len(self.pending) >= self.max_batch:
            return 0.0
        return max(0.0, self.first_at + self.linger_s - time.monotonic())

    def send(self, kind: bytes, payload: bytes) -> None:
        try:
            self.out.write(frame(kind, payload))
            self.out.flush()
        except BrokenPipeError:  # the server is gone: nothing left to answer
            raise SystemExit(0) from None

    def run(self, control: int) -> None:
        # After a batch's first job the worker sleeps out the linger on ``control`` (the server
        # writes there to cut it short: a flush) instead of waking for each job: a write to a
        # pipe with no reader waiting wakes no one, so the server's send stays a copy (measured:
        # waking the worker per job cost the server's requests ~40 us at p50).
        fd = sys.stdin.buffer.fileno()
        os.set_blocking(fd, False)
        os.set_blocking(control, False)
        inbox = bytearray()
        waiting = selectors.DefaultSelector()
        waiting.register(fd, selectors.EVENT_READ)
        waiting.register(control, selectors.EVENT_READ)
        lingering = selectors.DefaultSelector()
        lingering.register(control, selectors.EVENT_READ)
        while True:
            wait = self.due()
            if wait is None:
                waiting.select()
            elif wait > 0:
                lingering.select(wait)
            with contextlib.suppress(BlockingIOError):
                os.read(control, 4096)
            ended = read_available(fd, inbox)
            for kind, payload in read_frames(inbox):
                if kind == JOB:
                    self.job(payload)
                elif kind == LOAD:
                    self.load(payload)
                elif kind == FLUSH:
                    self.predict()
                    self.send(FLUSHED, payload)
            if ended:
                self.predict()
                return
            if self.due() == 0.0:
                self.predict()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sigserve.routing.shadow_worker")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--linger-ms", type=float, default=100.0)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--control-fd", type=int, required=True,
                        help="a pipe whose bytes cut a linger short (the server's flush)")
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to run on (default: the server's)")
    args = parser.parse_args(argv)
    # Shadows take a CPU only when nothing else wants it: never the champion's time.
    if hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    # Frames go to the pipe the server reads, and anything a library prints goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    Worker(args.home, args.threads, args.linger_ms / 1000.0, args.max_batch, out).run(args.control_fd)


if __name__ == "__main__":
    main()
