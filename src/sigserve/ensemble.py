"""Regime-gated ensembles: a regime model, one specialist per regime, and a meta-controller.

An ensemble is itself a registered model (flavor ``ensemble``): its artifact is a small JSON spec,
content-addressed and sha-verified like any other, and it moves through the same lifecycle. Every
part is a normal registered model, pinned by version: loading the ensemble loads each part through
the registry (sha verified, lifecycle refusals), on every resolution, so retiring a part stops
the ensemble from serving (``model_lifecycle_refused``).

Prediction, for each row::

    p_regime = regime_model(x)                       # (n, R): bull / bear / sideways ...
    w        = p_regime, reordered to the specialists  (default)
             | meta_model(x)                           (a meta model, classes = the regimes)
    output   = sum_r w[:, r] * specialist_r(x)        # the specialists' probabilities, blended

The specialists share one task and one class list (the ensemble's). Each part reads its own
features; the ensemble's feature list is their union, in order.

Usage::

    card = await register_ensemble(registry, "regime-gated", regime="regime:1",
                                   specialists={"bull": "trend:3", "bear": "revert:2", "sideways": "flat:1"})
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .domain import ModelCard, Stage
from .errors import ValidationError

if TYPE_CHECKING:
    from .registry.models import ModelRegistry
    from .runtimes.base import Runtime


class _Parts(threading.local):
    # (model ref, regime probabilities with entropy, strategy weights) of this thread's last
    # one-row ensemble prediction: /api/v1/predict answers them with the decision
    value: tuple[str, dict[str, float], dict[str, float]] | None = None


ENSEMBLE_PARTS = _Parts()


def take_last_parts(ref: str | None = None) -> tuple[dict[str, float], dict[str, float]] | None:
    parts = ENSEMBLE_PARTS.value
    ENSEMBLE_PARTS.value = None
    if parts is None or (ref is not None and parts[0] != ref):
        return None
    return parts[1], parts[2]


def _parse_ref(text: str) -> tuple[str, int]:
    from .registry.models import parse_model_ref

    name, ref = parse_model_ref(text)
    if ref.startswith("@"):
        raise ValidationError(f"ensemble parts are pinned versions (NAME:VERSION), not {text!r}",
                              details={"part": text})
    return name, int(ref)


async def register_ensemble(registry: ModelRegistry, name: str, *, regime: str,
                            specialists: dict[str, str], meta: str | None = None,
                            stage: Stage = Stage.REGISTERED) -> ModelCard:
    """Check the parts and register the ensemble as a model (flavor ``ensemble``)."""
    regime_card = await registry.get(*_parse_ref(regime))
    special = {label: await registry.get(*_parse_ref(ref)) for label, ref in specialists.items()}
    meta_card = await registry.get(*_parse_ref(meta)) if meta else None
    for card in (regime_card, *special.values(), *([meta_card] if meta_card else [])):
        registry.check_servable(card)
        if card.flavor == "ensemble":
            raise ValidationError(f"an ensemble part cannot be an ensemble ({card.ref})")
    if set(regime_card.classes) != set(special):
        raise ValidationError(
            f"the regime model {regime_card.ref} has classes {list(regime_card.classes)}: name one"
            f" specialist for each (got {sorted(special)})",
            details={"regimes": list(regime_card.classes), "specialists": sorted(special)})
    if meta_card is not None and set(meta_card.classes) != set(special):
        raise ValidationError(f"the meta model's classes {list(meta_card.classes)} must be the regimes",
                              details={"meta_classes": list(meta_card.classes)})
    tasks = {(str(c.task), c.classes) for c in special.values()}
    if len(tasks) != 1:
        raise ValidationError("the specialists must share one task and class list",
                              details={"specialists": {k: [str(c.task), list(c.classes)] for k, c in special.items()}})
    first = next(iter(special.values()))
    names: list[str] = []
    for card in (regime_card, *special.values(), *([meta_card] if meta_card else [])):
        names.extend(n for n in card.feature_names if n not in names)
    spec = {"kind": "regime_gated", "regime": regime_card.ref,
            "specialists": {label: card.ref for label, card in special.items()},
            "meta": meta_card.ref if meta_card else None}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ensemble.json"
        path.write_text(json.dumps(spec, sort_keys=True))
        sha, relative = registry.artifacts.put(path, ".json")
    card = ModelCard(name=name, version=0, flavor="ensemble", sha256=sha, artifact_path=relative,
                     task=first.task, feature_names=tuple(names), classes=first.classes, stage=stage,
                     extra={"ensemble": spec})
    return await registry.store.insert_model(card)


async def load_ensemble(registry: ModelRegistry, card: ModelCard) -> EnsembleRuntime:
    """The ensemble's runtime: its spec verified by sha, every part loaded through the registry."""
    path = registry.artifacts.verified_path(card.sha256, card.artifact_path)
    spec = json.loads(path.read_text())
    names = card.feature_names

    async def part(ref: str) -> Part:
        part_card = await registry.get(*_parse_ref(ref))
        runtime = await registry.runtime(part_card)  # lifecycle + sha checks
        return Part(part_card, runtime, np.array([names.index(n) for n in part_card.feature_names]))

    regime = await part(spec["regime"])
    specialists = {label: await part(ref) for label, ref in spec["specialists"].items()}
    meta = await part(spec["meta"]) if spec.get("meta") else None
    return EnsembleRuntime(card, regime, specialists, meta)


@dataclass(frozen=True)
class Part:
    card: ModelCard
    runtime: Runtime
    columns: np.ndarray
    # a part that reads the ensemble's columns as they are takes the input without a copy
    _identity: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_identity", bool(np.array_equal(self.columns, np.arange(self.columns.size))))

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self._identity and x.shape[1] == self.columns.size:
            return self.runtime.predict(x)
        return self.runtime.predict(np.ascontiguousarray(x[:, self.columns]))


class EnsembleRuntime:
    name = "ensemble"

    def __init__(self, card: ModelCard, regime: Part, specialists: dict[str, Part],
                 meta: Part | None) -> None:
        self.card = card
        self.ref = card.ref
        self.regime = regime
        self.labels = tuple(specialists)
        self.specialists = tuple(specialists[label] for label in self.labels)
        self.meta = meta
        self.n_features: int | None = len(card.feature_names)
        # the regime (and meta) models' output columns, in specialist order
        self._regime_order = np.array([regime.card.classes.index(label) for label in self.labels])
        self._meta_order = (np.array([meta.card.classes.index(label) for label in self.labels])
                            if meta is not None else None)
        self._weight_keys = tuple(f"{label}:{s.card.name}" for label, s in zip(self.labels, self.specialists,
                                                                               strict=True))
        self._regime_order_list = self._regime_order.tolist()
        self._meta_order_list = self._meta_order.tolist() if self._meta_order is not None else []

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(features, dtype=np.float64)
        if x.shape[0] == 1:
            return self._predict_one(x)
        regime = self.regime.predict(x)
        probs = regime[:, self._regime_order]
        if self.meta is not None and self._meta_order is not None:
            weights = self.meta.predict(x)[:, self._meta_order]
        else:
            weights = probs
        out = weights[:, 0:1] * self.specialists[0].predict(x)
        for i in range(1, len(self.specialists)):
            out = out + weights[:, i : i + 1] * self.specialists[i].predict(x)
        return np.ascontiguousarray(out, dtype=np.float64)

    def _predict_one(self, x: np.ndarray) -> np.ndarray:
        """One row on Python floats (the live path): the same sums in the same order as the
        vectorised path, so the same bits, without a dozen small numpy operations."""
        regime = self.regime.predict(x)[0].tolist()
        probs = [regime[i] for i in self._regime_order_list]
        if self.meta is not None:
            meta = self.meta.predict(x)[0].tolist()
            weights = [meta[i] for i in self._meta_order_list]
        else:
            weights = probs
        out = [weights[0] * p for p in self.specialists[0].predict(x)[0].tolist()]
        for i in range(1, len(self.specialists)):
            w = weights[i]
            out = [o + w * p for o, p in zip(out, self.specialists[i].predict(x)[0].tolist(), strict=True)]
        distribution = dict(zip(self.labels, probs, strict=True))
        distribution["entropy"] = -sum(p * math.log(p) for p in probs if p > 0)
        ENSEMBLE_PARTS.value = (self.ref, distribution,
                                dict(zip(self._weight_keys, weights, strict=True)))
        return np.array([out], dtype=np.float64)


def describe(spec: dict[str, Any]) -> str:
    meta = spec.get("meta") or "regime probabilities"
    return f"regime {spec['regime']} -> {spec['specialists']} weighted by {meta}"
