"""The model registry (sigserve.registry): content-addressed artifacts, versions, names and classes,
the lifecycle with its aliases, tamper detection before deserialisation, and the runtime cache."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sigserve.app import Services
from sigserve.domain import ModelCard, Stage, Task
from sigserve.errors import SigserveError, ValidationError
from sigserve.registry.models import ModelRegistry, parse_model_ref
from tests.fixtures import models as fx


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry-models")


_CACHE: dict[str, Path] = {}


def trained(model_dir: Path, key: str, make: Callable[[Path], Path]) -> Path:
    """Train each fixture model once per module (a subdirectory per key keeps file names apart)."""
    if key not in _CACHE:
        target = model_dir / key
        target.mkdir(exist_ok=True)
        _CACHE[key] = make(target)
    return _CACHE[key]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_of(exc: pytest.ExceptionInfo[SigserveError]) -> str:
    return exc.value.code


# (id, trainer, flavor, ext, register kwargs)
FILES: list[tuple[str, Callable[[Path], Path], str, str, dict[str, Any]]] = [
    ("lightgbm", lambda d: fx.train_lightgbm(d, "binary"), "lightgbm", ".txt", {}),
    ("xgboost-json", lambda d: fx.train_xgboost(d, "binary", "json"), "xgboost", ".json", {}),
    ("xgboost-ubj", lambda d: fx.train_xgboost(d, "binary", "ubj"), "xgboost", ".ubj", {}),
    ("sklearn-skops", lambda d: fx.train_sklearn(d, "binary", "skops"), "sklearn", ".skops", {}),
    ("sklearn-pkl", lambda d: fx.train_sklearn(d, "binary", "pkl"), "sklearn", ".pkl",
     {"trust_pickle": True}),
    ("onnx", lambda d: fx.train_onnx(d, "binary"), "onnx", ".onnx", {}),
]


@pytest.mark.parametrize(("key", "make", "flavor", "ext", "kwargs"), FILES,
                         ids=[f[0] for f in FILES])
async def test_register_stores_a_content_addressed_copy(
    services: Services, model_dir: Path, key: str, make: Callable[[Path], Path], flavor: str,
    ext: str, kwargs: dict[str, Any],
) -> None:
    source = trained(model_dir, key, make)
    card = await services.registry.register(source, name="m", **kwargs)
    expected_sha = sha256(source)
    assert card.sha256 == expected_sha
    assert card.artifact_path == f"artifacts/{expected_sha[:2]}/{expected_sha}{ext}"
    stored = services.settings.home / card.artifact_path
    assert stored.is_file()
    assert sha256(stored) == expected_sha
    assert stored.read_bytes() == source.read_bytes()
    assert card.flavor == flavor
    assert card.task is Task.BINARY
    assert card.classes == ("0", "1")
    assert card.feature_names == tuple(fx.default_names(8))  # read from the file itself
    assert card.stage is Stage.REGISTERED
    assert card.version == 1
    assert card.extra["source_file"] == source.name
    # what the store returns later is the same card
    assert await services.registry.get("m", 1) == card
    runtime = await services.registry.runtime(card)
    out = runtime.predict(fx.features(5))
    assert out.shape == (5, 2)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)


async def test_pickle_needs_trust(services: Services, model_dir: Path) -> None:
    source = trained(model_dir, "sklearn-pkl", FILES[4][1])
    with pytest.raises(ValidationError, match="pickle"):
        await services.registry.register(source, name="m")
    assert await services.store.list_models("m") == []
    assert list((services.settings.home / "artifacts").rglob("*.pkl")) == []  # nothing stored


async def test_versions_increase_per_name(services: Services, model_dir: Path) -> None:
    lgb = trained(model_dir, "lightgbm", FILES[0][1])
    xgb = trained(model_dir, "xgboost-json", FILES[1][1])
    registry = services.registry
    a1 = await registry.register(lgb, name="a")
    a2 = await registry.register(xgb, name="a")
    b1 = await registry.register(lgb, name="b")
    a3 = await registry.register(lgb, name="a")  # same file again: a new version, one artifact
    assert [a1.version, a2.version, a3.version, b1.version] == [1, 2, 3, 1]
    assert a1.sha256 == a3.sha256 == b1.sha256 != a2.sha256
    assert a1.artifact_path == a3.artifact_path
    assert [c.version for c in await services.store.list_models("a")] == [1, 2, 3]
    files = [p for p in (services.settings.home / "artifacts").rglob("*") if p.is_file()]
    assert len(files) == 2  # content-addressed: the same bytes are stored once


async def test_multiclass_and_regression_classes(services: Services, model_dir: Path) -> None:
    multi = trained(model_dir, "lightgbm-multi", lambda d: fx.train_lightgbm(d, "multiclass"))
    reg = trained(model_dir, "xgboost-reg", lambda d: fx.train_xgboost(d, "regression"))
    registry = services.registry
    plain = await registry.register(multi, name="mc")
    assert plain.task is Task.MULTICLASS and plain.classes == ("0", "1", "2")
    named = await registry.register(multi, name="mc", classes=["down", "flat", "up"])
    assert named.classes == ("down", "flat", "up")
    assert (await registry.get("mc", 2)).classes == ("down", "flat", "up")
    with pytest.raises(ValidationError, match="multiclass"):
        await registry.register(multi, name="mc", classes=["down", "up"])
    regression = await registry.register(reg, name="rg")
    assert regression.task is Task.REGRESSION and regression.classes == ()


async def test_feature_names_from_arguments(services: Services, model_dir: Path) -> None:
    source = trained(model_dir, "lightgbm", FILES[0][1])
    names = [f"x{i}" for i in range(8)]
    card = await services.registry.register(source, name="m", features=names)
    assert card.feature_names == tuple(names)
    with pytest.raises(ValidationError) as err:
        await services.registry.register(source, name="m", features=names[:5])
    assert err.value.details == {"expected": 8, "given": 5}
    with pytest.raises(ValidationError, match="repeat"):
        await services.registry.register(source, name="m", features=["x0"] * 8)
    assert [c.version for c in await services.store.list_models("m")] == [1]


async def test_missing_feature_names_refused(services: Services, model_dir: Path) -> None:
    import onnx

    def unnamed(directory: Path) -> Path:
        path = fx.train_onnx(directory, "binary")
        model = onnx.load(str(path))
        del model.metadata_props[:]
        target = directory / "unnamed.onnx"
        onnx.save(model, str(target))
        return target

    source = trained(model_dir, "onnx-unnamed", unnamed)
    with pytest.raises(ValidationError, match="feature names") as err:
        await services.registry.register(source, name="m")
    assert err.value.details["flavor"] == "onnx"
    assert await services.store.list_models("m") == []
    card = await services.registry.register(source, name="m", features=fx.default_names(8))
    assert card.feature_names == tuple(fx.default_names(8))


async def test_register_refusals(services: Services, tmp_path: Path, model_dir: Path) -> None:
    source = trained(model_dir, "lightgbm", FILES[0][1])
    with pytest.raises(ValidationError, match="bad model name"):
        await services.registry.register(source, name="no spaces")
    with pytest.raises(ValidationError, match="no such model file"):
        await services.registry.register(tmp_path / "absent.txt", name="m")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ValidationError, match="unknown model format"):
        await services.registry.register(garbage, name="m")


def test_parse_model_ref() -> None:
    assert parse_model_ref("trend") == ("trend", "@production")
    assert parse_model_ref("trend@staging") == ("trend", "@staging")
    assert parse_model_ref("trend:07") == ("trend", "7")
    for bad in ("trend@latest", "trend:0", "trend:x", "bad name"):
        with pytest.raises(ValidationError):
            parse_model_ref(bad)


# --- lifecycle -----------------------------------------------------------------------------------


async def three_versions(services: Services, model_dir: Path) -> list[ModelCard]:
    source = trained(model_dir, "lightgbm", FILES[0][1])
    return [await services.registry.register(source, name="m") for _ in range(3)]


async def test_promote_demotes_the_previous_holder(services: Services, model_dir: Path) -> None:
    registry = services.registry
    await three_versions(services, model_dir)
    with pytest.raises(SigserveError) as err:
        await registry.resolve("m", "@production")
    assert code_of(err) == "model_not_found"

    assert (await registry.promote("m", 1, Stage.PRODUCTION)).stage is Stage.PRODUCTION
    assert (await registry.resolve("m", "@production")).version == 1
    await registry.promote("m", 2, Stage.STAGING)
    assert (await registry.resolve("m", "@staging")).version == 2

    await registry.promote("m", 3, Stage.PRODUCTION)
    stages = {c.version: c.stage for c in await services.store.list_models("m")}
    assert stages == {1: Stage.REGISTERED, 2: Stage.STAGING, 3: Stage.PRODUCTION}
    assert (await registry.resolve("m", "@production")).version == 3
    assert (await registry.resolve("m", "@staging")).version == 2

    # staging -> production moves the alias: no version holds staging any more
    await registry.promote("m", 2, Stage.PRODUCTION)
    stages = {c.version: c.stage for c in await services.store.list_models("m")}
    assert stages == {1: Stage.REGISTERED, 2: Stage.PRODUCTION, 3: Stage.REGISTERED}
    with pytest.raises(SigserveError) as err:
        await registry.resolve("m", "@staging")
    assert code_of(err) == "model_not_found"
    assert (await registry.resolve("m", "2")).version == 2

    events = await services.store.model_events("m")
    assert {"version": 3, "from": "production", "to": "registered"}.items() <= next(
        e for e in reversed(events) if e["version"] == 3).items()

    with pytest.raises(ValidationError):
        await registry.promote("m", 1, Stage.RETIRED)
    with pytest.raises(SigserveError) as err:
        await registry.promote("m", 9, Stage.PRODUCTION)
    assert code_of(err) == "model_not_found"
    with pytest.raises(SigserveError) as err:
        await registry.resolve("nope", "@production")
    assert code_of(err) == "model_not_found"


@pytest.mark.parametrize("end", ["retire", "reject"])
async def test_retired_or_rejected_is_never_served(services: Services, model_dir: Path,
                                                   end: str) -> None:
    registry = services.registry
    cards = await three_versions(services, model_dir)
    await registry.promote("m", 1, Stage.PRODUCTION)
    runtime = await registry.runtime(cards[0])  # served (and cached) while in production
    assert runtime is not None

    ended = await getattr(registry, end)("m", 1)
    assert ended.stage is (Stage.RETIRED if end == "retire" else Stage.REJECTED)
    with pytest.raises(SigserveError) as err:
        await registry.runtime(ended)  # even with the runtime still in the cache
    assert code_of(err) == "model_lifecycle_refused"
    assert err.value.details["stage"] == str(ended.stage)
    with pytest.raises(SigserveError) as err:
        await registry.resolve("m", "@production")  # its last holder is no longer servable
    assert code_of(err) == "model_lifecycle_refused"
    assert err.value.details["version"] == 1

    for stage in (Stage.PRODUCTION, Stage.STAGING):
        with pytest.raises(SigserveError) as err:
            await registry.promote("m", 1, stage)
        assert code_of(err) == "model_lifecycle_refused"
    assert (await registry.get("m", 1)).stage is ended.stage
    # the other versions are untouched and still served
    assert (await registry.get("m", 2)).stage is Stage.REGISTERED
    await registry.runtime(await registry.get("m", 2))


# --- tamper detection ----------------------------------------------------------------------------


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[ModelCard]:
    """Record every deserialisation that goes through sigserve.runtimes.load_runtime."""
    import sigserve.runtimes

    calls: list[ModelCard] = []
    real = sigserve.runtimes.load_runtime

    def recording(card: ModelCard, path: Path, **kwargs: Any) -> Any:
        calls.append(card)
        return real(card, path, **kwargs)

    monkeypatch.setattr(sigserve.runtimes, "load_runtime", recording)
    return calls


@pytest.mark.parametrize(("key", "make", "flavor", "ext", "kwargs"), [FILES[0], FILES[4]],
                         ids=["lightgbm", "sklearn-pkl"])
async def test_one_flipped_byte_is_refused_before_loading(
    services: Services, model_dir: Path, load_calls: list[ModelCard], key: str,
    make: Callable[[Path], Path], flavor: str, ext: str, kwargs: dict[str, Any],
) -> None:
    source = trained(model_dir, key, make)
    card = await services.registry.register(source, name="m", **kwargs)
    stored = services.settings.home / str(card.artifact_path)
    data = bytearray(stored.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x01
    stored.write_bytes(bytes(data))

    with pytest.raises(SigserveError) as err:
        await services.registry.runtime(card)
    assert code_of(err) == "artifact_corrupt"
    assert err.value.http_status == 502
    assert err.value.details["expected"] == card.sha256
    assert err.value.details["actual"] == sha256(stored) != card.sha256
    assert load_calls == []  # the corrupt file never reached a deserialiser

    # a fresh registry (a restarted process) refuses it just the same
    fresh = ModelRegistry(services.store, services.settings)
    with pytest.raises(SigserveError) as err:
        await fresh.runtime(card)
    assert code_of(err) == "artifact_corrupt"
    assert load_calls == []


async def test_tampering_after_a_load_is_caught_on_the_next_load(
    services: Services, model_dir: Path, load_calls: list[ModelCard],
) -> None:
    source = trained(model_dir, "lightgbm", FILES[0][1])
    card = await services.registry.register(source, name="m")
    await services.registry.runtime(card)
    assert len(load_calls) == 1
    stored = services.settings.home / str(card.artifact_path)
    stored.write_bytes(stored.read_bytes() + b"\n")
    services.registry.forget(card.sha256)
    with pytest.raises(SigserveError) as err:
        await services.registry.runtime(card)
    assert code_of(err) == "artifact_corrupt"
    assert len(load_calls) == 1

    # registering the original bytes again heals the content-addressed copy
    again = await services.registry.register(source, name="m")
    assert again.artifact_path == card.artifact_path
    assert sha256(stored) == card.sha256
    await services.registry.runtime(card)
    assert len(load_calls) == 2


async def test_deleted_artifact_is_missing(services: Services, model_dir: Path,
                                           load_calls: list[ModelCard]) -> None:
    source = trained(model_dir, "lightgbm", FILES[0][1])
    card = await services.registry.register(source, name="m")
    (services.settings.home / str(card.artifact_path)).unlink()
    with pytest.raises(SigserveError) as err:
        await services.registry.runtime(card)
    assert code_of(err) == "model_artifact_missing"
    assert err.value.http_status == 409
    assert load_calls == []

    from dataclasses import replace

    with pytest.raises(SigserveError) as err:
        await services.registry.runtime(replace(card, sha256=None))
    assert code_of(err) == "model_artifact_missing"


# --- runtime cache -------------------------------------------------------------------------------


async def test_runtime_is_cached_by_sha(services: Services, model_dir: Path,
                                        load_calls: list[ModelCard]) -> None:
    source = trained(model_dir, "lightgbm", FILES[0][1])
    registry = services.registry
    v1 = await registry.register(source, name="m")
    first = await registry.runtime(v1)
    second = await registry.runtime(v1)
    assert second is first
    assert len(load_calls) == 1
    # another version with the same bytes shares the loaded runtime
    v2 = await registry.register(source, name="m")
    assert await registry.runtime(v2) is first
    assert len(load_calls) == 1
    # forget drops it: the next use verifies and loads again
    registry.forget(v1.sha256)
    third = await registry.runtime(v1)
    assert third is not first
    assert len(load_calls) == 2
    # the cache holds at most cache_size runtimes (least recently used goes first)
    small = ModelRegistry(services.store, services.settings, cache_size=1)
    other = await registry.register(trained(model_dir, "xgboost-json", FILES[1][1]), name="x")
    r1 = await small.runtime(v1)
    await small.runtime(other)
    assert await small.runtime(v1) is not r1


async def test_concurrent_first_uses_share_one_load(services: Services, model_dir: Path,
                                                     load_calls: list[ModelCard]) -> None:
    # a signal not warmed up, asked for by 16 clients at once: one load, one runtime for all
    source = trained(model_dir, "lightgbm", FILES[0][1])
    card = await services.registry.register(source, name="m")
    runtimes = await asyncio.gather(*(services.registry.runtime(card) for _ in range(16)))
    assert len(load_calls) == 1
    assert all(r is runtimes[0] for r in runtimes)
    assert await services.registry.runtime(card) is runtimes[0]  # and cached
    assert len(load_calls) == 1


async def test_a_failed_shared_load_refuses_every_waiter_and_the_next_use_loads_again(
    services: Services, model_dir: Path, load_calls: list[ModelCard],
) -> None:
    source = trained(model_dir, "lightgbm", FILES[0][1])
    card = await services.registry.register(source, name="m")
    stored = services.settings.home / str(card.artifact_path)
    stored.write_bytes(stored.read_bytes() + b"\n")
    results = await asyncio.gather(*(services.registry.runtime(card) for _ in range(4)),
                                   return_exceptions=True)
    assert all(isinstance(r, SigserveError) and r.code == "artifact_corrupt" for r in results)
    assert load_calls == []
    await services.registry.register(source, name="m")  # heals the stored copy
    runtime = await services.registry.runtime(card)  # not the failed load's answer: a new load
    assert len(load_calls) == 1
    assert runtime.predict(np.zeros((1, len(card.feature_names)))).shape[0] == 1


@pytest.fixture
def slow_loads(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[str, float, float]], threading.Event]:
    """load_runtime held until the event is set; each load's (artifact, start, end) recorded."""
    import sigserve.runtimes

    spans: list[tuple[str, float, float]] = []
    release = threading.Event()
    real = sigserve.runtimes.load_runtime

    def held(card: ModelCard, path: Path, **kwargs: Any) -> Any:
        began = time.perf_counter()
        release.wait(10)
        time.sleep(0.02)
        try:
            return real(card, path, **kwargs)
        finally:
            spans.append((str(card.sha256), began, time.perf_counter()))

    monkeypatch.setattr(sigserve.runtimes, "load_runtime", held)
    return spans, release


async def test_a_waiter_that_gives_up_leaves_the_load_to_the_others(
    services: Services, model_dir: Path, slow_loads: tuple[list[tuple[str, float, float]], threading.Event],
) -> None:
    spans, release = slow_loads
    card = await services.registry.register(trained(model_dir, "lightgbm", FILES[0][1]), name="m")
    impatient = asyncio.ensure_future(services.registry.runtime(card))
    patient = asyncio.ensure_future(services.registry.runtime(card))
    await asyncio.sleep(0.05)
    impatient.cancel()  # a request past its deadline, a client gone
    release.set()
    runtime = await patient
    assert impatient.cancelled()
    assert len(spans) == 1
    assert await services.registry.runtime(card) is runtime  # the load was cached all the same
    assert len(spans) == 1


async def test_loads_of_different_models_run_one_at_a_time(
    services: Services, model_dir: Path, slow_loads: tuple[list[tuple[str, float, float]], threading.Event],
) -> None:
    # native loaders (and the lazy imports in front of them) are entered by one thread at a time
    spans, release = slow_loads
    first = await services.registry.register(trained(model_dir, "lightgbm", FILES[0][1]), name="m")
    second = await services.registry.register(trained(model_dir, "xgboost-json", FILES[1][1]), name="x")
    assert first.sha256 != second.sha256
    release.set()
    await asyncio.gather(services.registry.runtime(first), services.registry.runtime(second))
    assert len(spans) == 2
    earlier, later = sorted(spans, key=lambda span: span[1])
    assert earlier[2] <= later[1]  # the second began after the first ended


async def test_cache_is_keyed_by_what_the_runtime_was_checked_against(
    services: Services, model_dir: Path,
) -> None:
    """Two versions can hold the same bytes under different cards (another --task or --classes):
    each card gets the runtime built and checked for it, whatever was loaded first."""
    source = trained(model_dir, "lightgbm", FILES[0][1])
    registry = services.registry
    binary = await registry.register(source, name="m")
    as_regression = await registry.register(source, name="m", task="regression")
    assert as_regression.sha256 == binary.sha256
    x = fx.features(3)
    fresh = await ModelRegistry(services.store, services.settings).runtime(as_regression)
    expected = fresh.predict(x)
    assert expected.shape == (3, 1)

    warm = await registry.runtime(binary)
    assert warm.predict(x).shape == (3, 2)
    served = await registry.runtime(as_regression)
    assert served is not warm
    np.testing.assert_array_equal(served.predict(x), expected)
    assert await registry.runtime(binary) is warm


async def test_a_loaded_model_is_kept_out_of_full_collections(services: Services, model_dir: Path) -> None:
    # a model lives as long as the runtime cache: its objects are frozen, not traversed by every
    # full collection (a 300-tree model's tens of thousands of objects paused requests for ms)
    import gc

    card = await services.registry.register(trained(model_dir, "lightgbm", FILES[0][1]), name="m")
    gc.collect()
    gc.unfreeze()
    try:
        runtime = await services.registry.runtime(card)
        assert gc.get_freeze_count() > 0
        assert all(o is not runtime for o in gc.get_objects())  # frozen: in no generation
        assert await services.registry.runtime(card) is runtime  # cached: loaded once
    finally:
        gc.unfreeze()
