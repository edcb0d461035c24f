"""The stream worker's embedded store in a process of its own.

A DuckDB file has one writing process, and its Python API runs in the caller's process: on a
thread of the worker, each write (4-6 ms of CPU, several statements, each a GIL release and
re-acquire) made the event loop wait for the GIL while it received and published, and the
worker's receipt -> publish p99 grew from about 2 ms (PostgreSQL, or DuckDB with the writes
switched off) to 10-45 ms. :class:`StoreProcess` is a :class:`~sigserve.stores.base.Store`
whose calls run in a child process that owns the store: the worker never opens the file, never
shares its GIL with DuckDB, and its loop only pickles a call and reads an answer.

- Calls are answered in the order they were made (the child serves one at a time, as a DuckDB
  connection does), so the writer's and the acks' ordering hold as on the store's thread.
- Errors come back as the same :class:`~sigserve.errors.SigserveError` class, message and
  details (``store_unavailable`` for a file locked by another process, so the CLI's refusal of a
  second DuckDB worker is unchanged); anything else as ``internal_error``.
- The child dies with its parent: it exits when the socket closes (the parent stopped or was
  killed), and ignores SIGINT (the parent closes it in order).

Usage::

    store = StoreProcess("duckdb:///data/sigserve.duckdb")
    await store.open()       # spawns the child, which opens the store and warms it up
    await store.write_signals(batch)
    await store.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from .errors import InternalError, SigserveError, StoreUnavailable
from .idle import give_way

log = logging.getLogger("sigserve.stream")
_HEADER = struct.Struct("!Q")
# a call whose argument is a list of pickled SignalBatch: the child unpickles them one by one
_PICKLED_SIGNAL_BATCHES = "write_signal_batches:pickled"


def _error_payload(exc: BaseException) -> tuple[str, str, str, dict[str, Any]]:
    if isinstance(exc, SigserveError):
        cls = type(exc)
        try:
            details = pickle.loads(pickle.dumps(exc.details))
        except Exception:
            details = {k: str(v) for k, v in exc.details.items()}
        return cls.__module__, cls.__qualname__, exc.message, details
    return ("sigserve.errors", "InternalError", f"store error: {type(exc).__name__}: {str(exc)[:300]}", {})


def _rebuild_error(module: str, name: str, message: str, details: dict[str, Any]) -> SigserveError:
    try:
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, SigserveError):
            return cls(message, details=details)
    except Exception:  # pragma: no cover - a class that cannot be rebuilt
        pass
    return InternalError(message, details=details)


class StoreProcess:
    """A Store whose every call runs in a child process that owns the real store (see the
    module docstring). Method calls are forwarded by name; results and arguments are pickled."""

    def __init__(self, url: str, *, nice: int = 0) -> None:
        self.url = url
        self.nice = nice
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._receiver: asyncio.Task[None] | None = None
        self._closed = False
        self._alive = False
        self.restarts = 0

    # --- lifecycle ----------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._shutdown()
            raise

    async def _start(self) -> None:
        """Spawn the child and open the store in it (again after the child died: the next call
        restarts it, so a worker paused on ``store_unavailable`` resumes once the file opens)."""
        if self._receiver is not None:  # a dead child's leftovers
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.kill()
            await asyncio.to_thread(self._proc.wait)
        self._alive = True
        parent, child = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sigserve.stream_storeproc", str(child.fileno()), str(self.nice)],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                env={**os.environ, "SIGSERVE_STORE_URL_CHILD": self.url})
        except OSError as exc:
            parent.close()
            raise StoreUnavailable(f"cannot start the store process: {exc}", details={"store": self.url}) from exc
        finally:
            child.close()
        self._reader, self._writer = await asyncio.open_connection(sock=parent)
        self._receiver = asyncio.get_running_loop().create_task(self._receive(), name="store-process")
        try:
            await self._call("open", (), {})
        except BaseException:
            self._alive = False  # the next call spawns a fresh child and tries again
            with contextlib.suppress(Exception):
                self._proc.kill()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(SigserveError):
            await self._call("close", (), {})
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        proc = self._proc
        if proc is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
        self._fail_pending(StoreUnavailable("the store process stopped", details={"store": self.url}))

    def _fail_pending(self, exc: SigserveError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    # --- calls --------------------------------------------------------------------------------
    async def write_signal_batches(self, batches: Sequence[Any]) -> list[int]:
        """As ``Store.write_signal_batches``, each batch pickled in a step of its own with the
        loop given way between (a stream's write cycle pickled its four symbols' rows in one
        0.3-0.5 ms turn of the worker's loop, which a feature message arriving then waited
        behind)."""
        parts = []
        for batch in batches:
            parts.append(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
            await give_way()
        return list(await self._call(_PICKLED_SIGNAL_BATCHES, (parts,), {}))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        async def method(*args: Any, **kwargs: Any) -> Any:
            return await self._call(name, args, kwargs)

        method.__name__ = name
        return method

    async def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._closed and name != "close":
            raise StoreUnavailable("the store process is not running", details={"store": self.url})
        if not self._alive and not self._closed and name != "open":
            self.restarts += 1
            log.warning("restarting the store process (restart %d)", self.restarts)
            try:
                await self._start()
            except SigserveError:
                self._alive = False
                raise
        writer = self._writer
        if writer is None:
            raise StoreUnavailable("the store process is not running", details={"store": self.url})
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        payload = pickle.dumps((call_id, name, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        writer.write(_HEADER.pack(len(payload)) + payload)  # buffered by the loop: never blocks
        return await future

    async def _receive(self) -> None:
        reader = self._reader
        assert reader is not None
        try:
            while True:
                header = await reader.readexactly(_HEADER.size)
                call_id, ok, value = pickle.loads(await reader.readexactly(_HEADER.unpack(header)[0]))
                future = self._pending.pop(call_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(_rebuild_error(*value))
        except (asyncio.IncompleteReadError, ConnectionError):
            self._alive = False
            if not self._closed:
                log.error("the store process exited")
            self._fail_pending(StoreUnavailable("the store process exited", details={"store": self.url}))


# --- the child ---------------------------------------------------------------------------------
def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def serve(fd: int, url: str, nice: int = 0) -> None:
    """The child: open the store for ``url`` and answer calls on the socket ``fd`` until it
    closes (or a ``close`` call)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    sock = socket.socket(fileno=fd)
    from .stores import open_store

    store = open_store(url)
    loop = asyncio.new_event_loop()
    try:
        while True:
            header = _recv_exactly(sock, _HEADER.size)
            if header is None:
                break
            data = _recv_exactly(sock, _HEADER.unpack(header)[0])
            if data is None:
                break
            call_id, name, args, kwargs = pickle.loads(data)
            if name == _PICKLED_SIGNAL_BATCHES:
                name, args = "write_signal_batches", ([pickle.loads(part) for part in args[0]],)
            try:
                result = loop.run_until_complete(getattr(store, name)(*args, **kwargs))
                warm_up = getattr(store, "warm_up", None)
                if name == "open" and warm_up is not None:
                    loop.run_until_complete(warm_up())
                reply = pickle.dumps((call_id, True, result), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                reply = pickle.dumps((call_id, False, _error_payload(exc)), protocol=pickle.HIGHEST_PROTOCOL)
            sock.sendall(_HEADER.pack(len(reply)) + reply)
            if name == "close":
                break
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(store.close())
        loop.close()
        sock.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]), os.environ["SIGSERVE_STORE_URL_CHILD"], int(sys.argv[2]) if len(sys.argv) > 2 else 0)


__all__ = ["StoreProcess", "serve"]
