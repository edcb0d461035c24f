"""Prometheus metrics of one app: its own registry (two apps in a process never collide).

- ``sigserve_http_request_duration_seconds{route,method,status}``: every request, by route
  template (``/models/{name}``, never the raw path) or ``unmatched``;
- ``sigserve_stage_duration_seconds{stage}``: the engine's stages (feature_read: for one bar its
  row and the position before it, one statement on PostgreSQL; position_read: a separate position
  read, as a window's; predict, policy, write), fed by ``Engine.observer``;
- ``sigserve_signals_total{action,endpoint}``: signals answered or written;
- ``sigserve_errors_total{error_code}``: refusals by error code;
- ``sigserve_bar_group_requests``: how many one-bar requests of a series were served together
  (the bar batcher's groups; 1: alone), fed by ``BarBatcher.on_group``;
- ``sigserve_bar_cache_blocks_total{result}`` (hit, miss) and ``sigserve_bar_cache_held_blocks``:
  the DuckDB store's bar cache (``sigserve.stores.bar_cache``), read when scraped;
- ``sigserve_signal_journal_rows_total{state}`` (appended, applied),
  ``sigserve_signal_journal_unapplied_rows`` and ``sigserve_signal_journal_apply_failures`` (in
  a row, now): a DuckDB file store's signal journal (``sigserve.stores.signal_journal``), read
  when scraped. Unapplied rows that keep growing, or failures above 0, mean the applier is behind
  or failing (the rows stay durable in the journal; readers of signal_history get the error).

Label children are cached, so an observation is a dict lookup and the histogram's own lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGES = ("feature_read", "position_read", "predict", "policy", "write")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Histogram(
            "sigserve_http_request_duration_seconds", "HTTP request latency, arrival to last byte",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stages = Histogram(
            "sigserve_stage_duration_seconds", "Engine stage latency",
            ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.signals = Counter(
            "sigserve_signals", "Signals answered or written, by action",
            ["action", "endpoint"], registry=self.registry)
        self.errors = Counter(
            "sigserve_errors", "Refusals, by error_code", ["error_code"], registry=self.registry)
        self.bar_groups = Histogram(
            "sigserve_bar_group_requests", "One-bar requests of a series served together",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._stage_children: dict[str, Any] = {s: self.stages.labels(s) for s in STAGES}
        self._signal_children: dict[tuple[str, str], Any] = {}
        self._error_children: dict[str, Any] = {}
        self._store: _StoreCollector | None = None

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(route, method, str(status))
        child.observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stage_children.get(stage)
        if child is None:
            child = self._stage_children[stage] = self.stages.labels(stage)
        child.observe(seconds)

    def count_signals(self, action: str, endpoint: str, n: int = 1) -> None:
        key = (action, endpoint)
        child = self._signal_children.get(key)
        if child is None:
            child = self._signal_children[key] = self.signals.labels(action, endpoint)
        child.inc(n)

    def count_error(self, code: str) -> None:
        child = self._error_children.get(code)
        if child is None:
            child = self._error_children[code] = self.errors.labels(code)
        child.inc()

    def watch_store(self, store: Any) -> None:
        """Export what a store keeps in memory (the DuckDB store's bar cache and signal journal),
        read at scrape time; None: stop."""
        if self._store is not None:
            self.registry.unregister(self._store)
            self._store = None
        if store is not None and (getattr(store, "bar_cache", None) is not None
                                  or getattr(store, "journal", None) is not None):
            self._store = _StoreCollector(store)
            self.registry.register(self._store)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _counter(name: str, documentation: str, label: str, values: dict[str, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in values.items():
        family.add_metric([value], count)
    return family


class _StoreCollector:
    """The bar cache's, the position book's and the signal journal's counts, read from the store
    at scrape time:
    nothing is added to a read or a write (and a reopened journal is followed)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        cache = getattr(self.store, "bar_cache", None)
        if cache is not None:
            yield _counter("sigserve_bar_cache_blocks", "Block lookups of the DuckDB store's bar cache, by result",
                           "result", {"hit": cache.hits, "miss": cache.misses})
            yield CounterMetricFamily("sigserve_bar_cache_prefetched_blocks",
                                      "Blocks the DuckDB store's bar cache loaded ahead of the live bars",
                                      value=cache.prefetched)
            yield GaugeMetricFamily("sigserve_bar_cache_held_blocks",
                                    "Blocks of bars the DuckDB store's bar cache holds", value=len(cache))
        book = getattr(self.store, "position_book", None)
        if book is not None:
            yield GaugeMetricFamily("sigserve_position_book_rows",
                                    "Non-hold signal rows the DuckDB store's position book holds in memory"
                                    " (histories read inside, for replays and corrections)",
                                    value=book.loaded_events)
        journal = getattr(self.store, "journal", None)
        if journal is not None:
            yield _counter("sigserve_signal_journal_rows", "Signal rows through the DuckDB store's journal, by state",
                           "state", {"appended": journal.appended, "applied": journal.applied})
            yield GaugeMetricFamily("sigserve_signal_journal_unapplied_rows",
                                    "Signal rows durable in the journal, not yet in signal_history",
                                    value=journal.unapplied_rows)
            yield GaugeMetricFamily("sigserve_signal_journal_apply_failures",
                                    "Failed applies of the signal journal in a row (0: the last succeeded)",
                                    value=self.store.journal_apply_failures)
