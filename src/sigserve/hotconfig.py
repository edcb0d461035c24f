"""Hot operational configuration of the stream worker (seed 001's Central Hub).

Four sections, each optional, with safe defaults that change nothing about what the engine
computes (so a streamed bar equals ``predict_bar``'s until an operator says otherwise):

``model_config``        ``name`` / ``version`` override the signal definitions' model
                        (``version``: a number, ``production`` or ``staging``); ``auto_reload``
                        checks the store's catalog version every ``reload_interval_s`` and, when
                        it moved, re-resolves aliases and swaps a new version in.
``inference_settings``  ``confidence_threshold`` (0: the definition's policy alone; a buy or sell
                        under it becomes hold), ``publish_holds``, ``max_latency_ms`` (None: no
                        budget) with ``fallback_to_hold``, ``grace_period_s`` (None: no fallback
                        to the store's newest feature row).
``signal_generation``   ``atr_multiplier_sl``, ``atr_multiplier_tp``, ``risk_fraction``, ``equity``,
                        ``max_leverage``: None keeps each definition's policy value.
``monitoring``          ``stats_interval_s`` (a stats log line), ``log_signals``.

Sources, later wins: defaults < the YAML file (``SIGSERVE_STREAM_CONFIG``, default
``$SIGSERVE_HOME/stream.yaml``) < the KV bucket ``sigserve-config`` (one key per section, a JSON
object) when a bus is given. ``LiveConfig`` watches both and applies a valid change at once; an
invalid one is logged and ignored (the last valid config stays).

Usage::

    live = LiveConfig(path, bus)
    await live.start()
    live.current.inference_settings.confidence_threshold
    live.subscribe(callback)          # called with (old, new) after every applied change
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticError

from .errors import ValidationError

log = logging.getLogger("sigserve.config")
BUCKET = "sigserve-config"
SECTIONS = ("model_config", "inference_settings", "signal_generation", "monitoring")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelSettings(_Section):
    name: str | None = Field(default=None, description="model name; None: each definition's")
    version: str | None = Field(default=None, description="a version number, production or staging")
    auto_reload: bool = Field(default=True, description="follow alias moves and registry changes")
    reload_interval_s: float = Field(default=5.0, gt=0)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> str | None:
        if value is None:
            return None
        text = str(value).strip().lstrip("@")
        if text in ("production", "staging") or text.isdigit():
            return text
        raise ValueError("use a version number, production or staging")

    @property
    def ref(self) -> str | None:
        """The model reference as signal definitions store it (``@alias`` or a number)."""
        if self.version is None:
            return None
        return self.version if self.version.isdigit() else f"@{self.version}"


class InferenceSettings(_Section):
    confidence_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    publish_holds: bool = True
    max_latency_ms: float | None = Field(default=None, gt=0)
    fallback_to_hold: bool = False
    grace_period_s: float | None = Field(default=30.0, gt=0)


class SignalGeneration(_Section):
    atr_multiplier_sl: float | None = Field(default=None, gt=0)
    atr_multiplier_tp: float | None = Field(default=None, gt=0)
    risk_fraction: float | None = Field(default=None, gt=0, le=1)
    equity: float | None = Field(default=None, gt=0)
    max_leverage: float | None = Field(default=None, gt=0)

    def overrides(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Monitoring(_Section):
    stats_interval_s: float = Field(default=10.0, gt=0)
    log_signals: bool = False


class StreamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(),
                              populate_by_name=True)

    model: ModelSettings = Field(default_factory=ModelSettings, alias="model_config")
    inference_settings: InferenceSettings = Field(default_factory=InferenceSettings)
    signal_generation: SignalGeneration = Field(default_factory=SignalGeneration)
    monitoring: Monitoring = Field(default_factory=Monitoring)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


def build(*layers: dict[str, Any]) -> StreamConfig:
    """Merge layers (later wins, key by key within a section) and validate."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in (layer or {}).items():
            if section not in SECTIONS:
                raise ValidationError(f"unknown config section {section!r}: use {list(SECTIONS)}",
                                      details={"section": section})
            if not isinstance(values, dict):
                raise ValidationError(f"config section {section!r} must be a mapping",
                                      details={"section": section})
            merged.setdefault(section, {}).update(values)
    try:
        return StreamConfig.model_validate(merged)
    except PydanticError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ValidationError("invalid stream config: " + "; ".join(problems),
                              details={"problems": problems}) from exc


def read_file(path: Path | None) -> dict[str, Any]:
    """The YAML file's sections ({} when there is no file)."""
    if path is None or not path.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, OSError) as exc:
        raise ValidationError(f"cannot read the stream config {path}: {exc}", details={"path": str(path)}) from exc
    if not isinstance(data, dict):
        raise ValidationError(f"the stream config {path} must be a mapping of sections",
                              details={"path": str(path)})
    return data


def write_file(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=True))
    tmp.replace(path)  # atomic: a watcher never reads half a file


def parse_value(text: str) -> Any:
    """A CLI value as YAML reads it: 0.6 -> float, true -> bool, null -> None, else the text."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_key(key: str) -> tuple[str, str | None]:
    section, _, field = key.partition(".")
    if section not in SECTIONS:
        raise ValidationError(f"unknown config key {key!r}: start with one of {list(SECTIONS)}",
                              details={"key": key})
    if field and "." in field:
        raise ValidationError(f"config key {key!r} is too deep: use SECTION.FIELD", details={"key": key})
    return section, field or None


def set_key(layer: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``layer`` with SECTION.FIELD (or a whole SECTION, given a mapping) set."""
    section, field = split_key(key)
    out = copy.deepcopy(layer)
    if field is None:
        if not isinstance(value, dict):
            raise ValidationError(f"{section} takes a mapping (or set {section}.FIELD)")
        out[section] = value
    else:
        out.setdefault(section, {})[field] = value
    return out


async def read_kv(bus: Any, bucket: str = BUCKET) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for section in SECTIONS:
        raw = await bus.kv_get(bucket, section)
        if raw:
            layer[section] = decode_section(section, raw)
    return layer


def decode_section(section: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValidationError(f"KV {BUCKET}/{section} is not JSON", details={"key": section}) from exc
    if not isinstance(value, dict):
        raise ValidationError(f"KV {BUCKET}/{section} must be a JSON object", details={"key": section})
    return value


class LiveConfig:
    """The current config, kept up to date from the file (polled) and the KV bucket (watched)."""

    def __init__(self, path: Path | None, bus: Any = None, *, bucket: str = BUCKET,
                 poll_s: float = 0.5) -> None:
        self.path = path
        self.bus = bus
        self.bucket = bucket
        self.poll_s = poll_s
        self.file_layer: dict[str, Any] = {}
        self.kv_layer: dict[str, Any] = {}
        self.current = StreamConfig()
        self.version = 0
        self.errors = 0
        self._callbacks: list[Callable[[StreamConfig, StreamConfig], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._watch: Any = None
        self._mtime: float | None = None
        self._loaded = False

    def subscribe(self, callback: Callable[[StreamConfig, StreamConfig], None]) -> None:
        self._callbacks.append(callback)

    async def load(self) -> None:
        """Read every source (an invalid start config is refused); no watch, no side effect."""
        self.file_layer = read_file(self.path)
        self._mtime = self._stat()
        if self.bus is not None and self.bus.durable:
            self.kv_layer = await read_kv(self.bus, self.bucket)
        self.current = build(self.file_layer, self.kv_layer)
        self._loaded = True

    async def start(self) -> None:
        """``load`` unless done, then watch the file and the bucket (created when missing)."""
        if not self._loaded:
            await self.load()
        if self.path is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._poll(), name="config-file"))
        if self.bus is not None and self.bus.durable:
            self._watch = await self.bus.kv_watch(self.bucket, self._on_kv)

    async def rewatch(self) -> None:
        """After a broker reconnect: read the bucket again and watch it anew (a watch may not
        survive a server restart)."""
        if self.bus is None or not self.bus.durable:
            return
        from .errors import SigserveError

        if self._watch is not None:
            with contextlib.suppress(Exception):
                await self._watch.stop()
            self._watch = None
        try:
            layer = await read_kv(self.bus, self.bucket)
            self._apply(self.file_layer, layer, "kv (after a reconnect)")
            self._watch = await self.bus.kv_watch(self.bucket, self._on_kv)
        except SigserveError as exc:
            self.errors += 1
            log.warning("config KV not watched after the reconnect: %s", exc)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._watch is not None:
            await self._watch.stop()

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns if self.path is not None else None
        except OSError:
            return None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            mtime = self._stat()
            if mtime == self._mtime:
                continue
            self._mtime = mtime
            try:
                layer = read_file(self.path)
            except ValidationError as exc:
                self.errors += 1
                log.error("config file ignored: %s", exc.message)
                continue
            self._apply(layer, self.kv_layer, "file")

    async def _on_kv(self, key: str, value: bytes | None) -> None:
        if key not in SECTIONS:
            return
        layer = dict(self.kv_layer)
        try:
            if value is None:
                layer.pop(key, None)
            else:
                layer[key] = decode_section(key, value)
        except ValidationError as exc:
            self.errors += 1
            log.error("config KV change ignored: %s", exc.message)
            return
        self._apply(self.file_layer, layer, f"kv {key}")

    def _apply(self, file_layer: dict[str, Any], kv_layer: dict[str, Any], where: str) -> None:
        try:
            new = build(file_layer, kv_layer)
        except ValidationError as exc:
            self.errors += 1
            log.error("config change from %s ignored (the last valid config stays): %s", where, exc.message)
            return
        self.file_layer, self.kv_layer = file_layer, kv_layer
        if new == self.current:
            return
        old, self.current = self.current, new
        self.version += 1
        log.info("config changed (%s): %s", where, new.to_dict())
        for callback in self._callbacks:
            try:
                callback(old, new)
            except Exception:
                log.exception("config callback failed")
