"""The model registry: register files, move versions through the lifecycle, resolve aliases, and
load verified runtimes (cached by sha256, so each artifact is deserialised once per process).

Lifecycle: registered -> staging -> production -> retired, or rejected_by_operator at any point.
A retired or rejected version is never served. ``@production`` and ``@staging`` resolve to the
version that holds that stage; promoting another version demotes the holder to ``registered``.

Usage::

    registry = ModelRegistry(store, settings)
    card = await registry.register(Path("model.txt"), name="trend")
    await registry.promote("trend", card.version, Stage.PRODUCTION)
    card = await registry.resolve("trend", "@production")
    runtime = await registry.runtime(card)
"""

from __future__ import annotations

import asyncio
import gc
import re
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import Settings
from ..domain import ALIASES, SERVABLE_STAGES, ModelCard, Stage, Task
from ..errors import ModelLifecycleRefused, ModelNotFound, ValidationError
from ..runtimes.base import Runtime
from ..singleflight import SingleFlight
from ..stores.base import Store
from .artifacts import LocalArtifactSource, sha256_file

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def parse_model_ref(text: str) -> tuple[str, str]:
    """``name``, ``name@alias`` or ``name:version`` -> (name, ref); ref is ``@alias`` or digits.

    >>> parse_model_ref("trend:3")
    ('trend', '3')
    >>> parse_model_ref("trend")
    ('trend', '@production')
    """
    if "@" in text:
        name, alias = text.split("@", 1)
        if alias not in ALIASES:
            raise ValidationError(f"unknown alias @{alias}: use one of {['@' + a for a in ALIASES]}",
                                  details={"alias": alias})
        ref = "@" + alias
    elif ":" in text:
        name, version = text.split(":", 1)
        if not version.isdigit() or int(version) < 1:
            raise ValidationError(f"bad model version {version!r} in {text!r}", details={"ref": text})
        ref = str(int(version))
    else:
        name, ref = text, "@production"
    if not _NAME_RE.match(name):
        raise ValidationError(f"bad model name {name!r}", details={"name": name})
    return name, ref


RuntimeKey = tuple[str, str | None, str, tuple[str, ...]]

# Loads run one at a time in the process. Measured: 16 concurrent first requests for a signal
# not warmed up loaded its lleaves model 16 times at once, and 6 of them failed with "partially
# initialized module 'lleaves' has no attribute 'Model'" (the lazy import entered from several
# threads). Native loaders (LLVM, LightGBM, onnxruntime) are not made to be entered
# concurrently either, and a load is rare: at startup, on a promotion or a rollout.
_LOAD_LOCK = threading.Lock()


class ModelRegistry:
    def __init__(self, store: Store, settings: Settings, cache_size: int = 16) -> None:
        self.store = store
        self.settings = settings
        self.artifacts = LocalArtifactSource(settings.home)
        self._runtimes: OrderedDict[RuntimeKey, Runtime] = OrderedDict()
        self._cache_size = cache_size
        # the load in progress per runtime key: concurrent first uses share it (one load)
        self._loading: SingleFlight[RuntimeKey, Runtime] = SingleFlight()

    @property
    def cache_size(self) -> int:
        """How many loaded runtimes the registry keeps (least recently used goes first)."""
        return self._cache_size

    # --- registration ---------------------------------------------------------------------
    async def register(self, path: Path, *, name: str, features: list[str] | None = None,
                       classes: list[str] | None = None, task: str | None = None,
                       metrics: dict[str, Any] | None = None, trust_pickle: bool = False,
                       stage: Stage = Stage.REGISTERED,
                       extra: dict[str, Any] | None = None) -> ModelCard:
        """``extra`` adds to the card (``sigserve train`` records the feature spec, its hash and
        feature_key, the training window and the reference distribution there)."""
        from .flavors import inspect_model

        if not _NAME_RE.match(name):
            raise ValidationError(f"bad model name {name!r}: letters, digits, _ . - only",
                                  details={"name": name})
        path = Path(path)
        if not path.is_file():
            raise ValidationError(f"no such model file: {path}", details={"path": str(path)})
        info = await asyncio.to_thread(inspect_model, path, trust_pickle=trust_pickle)
        feature_names = tuple(features) if features else info.feature_names
        if not feature_names:
            raise ValidationError(
                f"{path.name} does not carry feature names: pass --features a,b,c in model order",
                details={"flavor": info.flavor})
        if info.n_features is not None and len(feature_names) != info.n_features:
            raise ValidationError(
                f"the model takes {info.n_features} features but {len(feature_names)} names were given",
                details={"expected": info.n_features, "given": len(feature_names)})
        if len(set(feature_names)) != len(feature_names):
            raise ValidationError("feature names repeat", details={"features": list(feature_names)})
        resolved_task = Task(task) if task else info.task
        if resolved_task is None:
            raise ValidationError(f"cannot tell the task of {path.name}: pass --task",
                                  details={"choices": [t.value for t in Task]})
        class_names = tuple(classes) if classes else (info.classes or ())
        if resolved_task is Task.BINARY and not class_names:
            class_names = ("0", "1")
        if resolved_task is Task.REGRESSION:
            class_names = ()
        elif resolved_task is Task.BINARY and len(class_names) != 2:
            raise ValidationError(f"a binary model needs 2 classes, got {list(class_names)}")
        elif resolved_task is Task.MULTICLASS and len(class_names) < 3:
            n = info.extra.get("num_class")
            raise ValidationError(
                f"a multiclass model needs its class labels ({n or 'k'} of them): pass --classes",
                details={"num_class": n})
        sha, relative = self.artifacts.put(path, info.ext)
        card = ModelCard(
            name=name, version=0, flavor=info.flavor, sha256=sha, artifact_path=relative,
            task=resolved_task, feature_names=tuple(feature_names), classes=class_names,
            stage=stage, metrics=dict(metrics or {}),
            extra={**info.extra, "source_file": path.name, **(extra or {})},
        )
        return await self.store.insert_model(card)

    # --- lifecycle ------------------------------------------------------------------------
    async def get(self, name: str, version: int) -> ModelCard:
        card = await self.store.get_model(name, version)
        if card is None:
            raise ModelNotFound(f"no model {name}:{version}", details={"name": name, "version": version})
        return card

    async def resolve(self, name: str, ref: str) -> ModelCard:
        """The card for ``@alias`` or a version number (as text). Not lifecycle-checked."""
        if ref.startswith("@"):
            stage = Stage(ref[1:])
            versions = [c for c in await self.store.list_models(name) if c.stage == stage]
            if not versions:
                known = await self.store.list_models(name)
                if not known:
                    raise ModelNotFound(f"no model named {name!r}", details={"name": name})
                # The alias's last holder was retired or rejected: that is a lifecycle refusal,
                # not an unknown model (the signal and the model both exist).
                holders = [e for e in await self.store.model_events(name) if e["to"] == stage.value]
                if holders:
                    last = next(c for c in known if c.version == holders[-1]["version"])
                    if last.stage not in SERVABLE_STAGES:
                        raise ModelLifecycleRefused(
                            f"{name}{ref} was version {last.version}, which is {last.stage}:"
                            " promote another version", details={"name": name, "alias": ref,
                                                                 "version": last.version,
                                                                 "stage": str(last.stage)})
                raise ModelNotFound(f"no version of {name!r} holds the alias {ref}",
                                    details={"name": name, "alias": ref})
            return versions[-1]
        return await self.get(name, int(ref))

    async def promote(self, name: str, version: int, to: Stage, actor: str = "cli") -> ModelCard:
        if to not in (Stage.STAGING, Stage.PRODUCTION):
            raise ValidationError(f"promote goes to staging or production, not {to}")
        card = await self.get(name, version)
        self.check_servable(card)
        await self.store.set_model_stage(name, version, to, actor)
        return await self.get(name, version)

    async def retire(self, name: str, version: int, actor: str = "cli") -> ModelCard:
        await self.get(name, version)
        await self.store.set_model_stage(name, version, Stage.RETIRED, actor)
        return await self.get(name, version)

    async def reject(self, name: str, version: int, actor: str = "cli") -> ModelCard:
        await self.get(name, version)
        await self.store.set_model_stage(name, version, Stage.REJECTED, actor)
        return await self.get(name, version)

    @staticmethod
    def check_servable(card: ModelCard) -> None:
        if card.stage not in SERVABLE_STAGES:
            raise ModelLifecycleRefused(
                f"model {card.ref} is {card.stage} and is never served",
                details={"name": card.name, "version": card.version, "stage": str(card.stage)})

    # --- loading --------------------------------------------------------------------------
    async def runtime(self, card: ModelCard) -> Runtime:
        """A loaded runtime for a servable card: sha verified on every load from disk, cached."""
        self.check_servable(card)
        if card.flavor == "ensemble":  # a regime-gated ensemble: its parts load (and refuse) here
            from ..ensemble import load_ensemble

            return await load_ensemble(self, card)
        # The runtime was checked against this card's task and classes: the same bytes under
        # another card (re-registered with --task/--classes) get their own checked runtime.
        key = (card.sha256 or "", card.runtime, str(card.task), card.classes)
        cached = self._runtimes.get(key)
        if cached is not None:
            self._runtimes.move_to_end(key)
            return cached
        return await self._loading.run(key, lambda: self._load_and_cache(key, card))

    async def _load_and_cache(self, key: RuntimeKey, card: ModelCard) -> Runtime:
        runtime = await asyncio.to_thread(self._load, card)
        if not self._loading.owns(key):
            return runtime  # forgotten while it loaded (forget): served to its waiters, not cached
        self._runtimes[key] = runtime
        # A loaded model lives as long as the cache: keep its objects (tens of thousands for a
        # 300-tree model) out of the collector's full passes, as servers do with what startup
        # allocated. Measured: a version loaded by a rollout left 38k objects in the oldest
        # generation, and a full pass over them paused a request for 22 ms. A model dropped
        # from the cache is still freed by reference counting.
        gc.freeze()
        while len(self._runtimes) > self._cache_size:
            self._runtimes.popitem(last=False)
        return runtime

    def _load(self, card: ModelCard) -> Runtime:
        from ..runtimes import load_runtime

        with _LOAD_LOCK:
            path = self.artifacts.verified_path(card.sha256, card.artifact_path)
            if card.runtime == "lleaves":
                # The compiled object is native code: it is verified like the artifact it came from.
                compiled = self.artifacts.verified_path(card.extra.get("compiled_sha256"),
                                                        card.extra.get("compiled_path"))
                card = replace(card, extra={**card.extra, "compiled_path": str(compiled)})
            return load_runtime(card, path, threads=self.settings.predict_threads)

    def forget(self, sha256: str | None = None) -> None:
        """Drop cached runtimes (all, or those of one artifact), so the next use re-verifies."""
        for key in list(self._runtimes):
            if sha256 is None or key[0] == sha256:
                del self._runtimes[key]
        # a load under way is dropped too: a later use loads again, from the bytes on disk then
        self._loading.drop(None if sha256 is None else lambda key: key[0] == sha256)

    async def compile(self, name: str, version: int) -> ModelCard:
        """Compile a LightGBM version with lleaves (once; cached by sha) and serve it compiled."""
        from ..runtimes import compile_lightgbm

        card = await self.get(name, version)
        self.check_servable(card)
        if card.flavor != "lightgbm":
            raise ValidationError(f"only LightGBM models compile; {card.ref} is {card.flavor}",
                                  details={"flavor": card.flavor})
        path = self.artifacts.verified_path(card.sha256, card.artifact_path)
        target = self.settings.home / "compiled" / f"{card.sha256}.o"
        target.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(compile_lightgbm, path, target)
        relative = str(target.relative_to(self.settings.home))
        extra = {**card.extra, "compiled_path": relative, "compiled_sha256": sha256_file(target)}
        await self.store.update_model_extra(name, version, "lleaves", extra)
        self.forget(card.sha256)
        return await self.get(name, version)
