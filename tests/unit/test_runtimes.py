"""Runtimes (sigserve.runtimes): output shapes, one row == the same row in a batch (bit for bit),
agreement with each library's own predict, lleaves parity with LightGBM, and refusals."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sigserve.domain import ModelCard, Task
from sigserve.errors import ValidationError
from sigserve.registry.flavors import inspect_model
from sigserve.runtimes import compile_lightgbm, load_runtime
from tests.fixtures import models as fx

X = fx.features(300)
X_CLEAN = fx.features(300, nan=False)  # for linear models, which refuse NaN


def card_for(path: Path, **changes: Any) -> ModelCard:
    info = inspect_model(path, trust_pickle=True, isolate=False)
    assert info.task is not None and info.classes is not None and info.feature_names
    card = ModelCard(
        name="m", version=1, flavor=info.flavor, sha256=None, artifact_path=None,
        task=info.task, feature_names=info.feature_names, classes=info.classes,
        extra=dict(info.extra),
    )
    return dataclasses.replace(card, **changes) if changes else card


def lleaves_card(path: Path, cache_dir: Path) -> ModelCard:
    compiled = compile_lightgbm(path, cache_dir / f"{path.stem}.o")
    card = card_for(path)
    return dataclasses.replace(card, runtime="lleaves",
                               extra={**card.extra, "compiled_path": str(compiled)})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


# (id, trainer, runtime name, rows to feed)
RUNTIMES: list[tuple[str, Callable[[Path, str], Path], str, np.ndarray]] = [
    ("lightgbm", lambda d, t: fx.train_lightgbm(d, t), "lightgbm", X),
    ("xgboost-json", lambda d, t: fx.train_xgboost(d, t, "json"), "xgboost", X),
    ("xgboost-ubj", lambda d, t: fx.train_xgboost(d, t, "ubj"), "xgboost", X),
    ("onnx-lightgbm", lambda d, t: fx.train_onnx(d, t), "onnxruntime", X),
    ("onnx-forest", lambda d, t: fx.train_onnx(d, t, source="sklearn"), "onnxruntime", X),
    ("onnx-linear", lambda d, t: fx.train_onnx(d, t, source="sklearn-linear"), "onnxruntime",
     X_CLEAN),
    ("sklearn-skops", lambda d, t: fx.train_sklearn(d, t, "skops"), "sklearn", X),
    ("sklearn-pkl", lambda d, t: fx.train_sklearn(d, t, "pkl"), "sklearn", X),
    ("sklearn-forest", lambda d, t: fx.train_sklearn(d, t, kind="forest"), "sklearn", X),
    ("sklearn-linear", lambda d, t: fx.train_sklearn(d, t, kind="linear"), "sklearn", X_CLEAN),
]
WIDTH = {"binary": 2, "multiclass": 3, "regression": 1}


def _assert_contract(out: np.ndarray, task: str, n: int) -> None:
    assert out.shape == (n, WIDTH[task])
    assert out.dtype == np.float64
    assert out.flags.c_contiguous
    assert np.isfinite(out).all()
    if task != "regression":
        assert ((out >= 0) & (out <= 1)).all()
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)


def _assert_rows_match_batch(runtime: Any, x: np.ndarray) -> None:
    batch = runtime.predict(x)
    for i in range(x.shape[0]):
        one = runtime.predict(x[i : i + 1])
        assert np.array_equal(one[0], batch[i]), f"row {i}: {one[0]!r} != {batch[i]!r}"
    for n in (2, 3, 4, 5):  # small batches (a stream's micro-batches) may take other paths
        assert np.array_equal(runtime.predict(x[:n]), batch[:n]), f"first {n} rows"


@pytest.mark.parametrize("task", fx.TASKS)
@pytest.mark.parametrize(("case", "trainer", "name", "x"), RUNTIMES, ids=[r[0] for r in RUNTIMES])
def test_shapes_and_single_row_equals_batch_row(
    model_dir: Path, case: str, trainer: Callable[[Path, str], Path], name: str, x: np.ndarray,
    task: str,
) -> None:
    path = trainer(_subdir(model_dir, case), task)
    runtime = load_runtime(card_for(path), path)
    assert runtime.name == name
    out = runtime.predict(x)
    _assert_contract(out, task, x.shape[0])
    _assert_rows_match_batch(runtime, x)
    # a non-contiguous or float32 view is accepted and answers the same
    assert np.array_equal(runtime.predict(np.asfortranarray(x)), out)
    assert runtime.predict(x[:0]).shape == (0, WIDTH[task])


def _subdir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(exist_ok=True)
    return d


@pytest.mark.parametrize("task", fx.TASKS)
def test_lleaves_shapes_single_row_and_parity_with_lightgbm(tmp_path: Path, task: str) -> None:
    # A tiny model: an lleaves compile of hundreds of trees takes tens of seconds; 10 trees < 1 s.
    path = fx.train_lightgbm(tmp_path, task, n_trees=10)
    fast = load_runtime(lleaves_card(path, tmp_path / "cache"), path)
    ref = load_runtime(card_for(path), path)
    assert fast.name == "lleaves"
    out = fast.predict(X)
    _assert_contract(out, task, X.shape[0])
    _assert_rows_match_batch(fast, X)
    np.testing.assert_allclose(out, ref.predict(X), rtol=0, atol=1e-12)


def test_lleaves_parallel_batches_match_single_rows(tmp_path: Path) -> None:
    path = fx.train_lightgbm(tmp_path, "binary", n_trees=10)
    runtime = load_runtime(lleaves_card(path, tmp_path / "cache"), path, threads=2)
    big = fx.features(25_000, seed=3)  # above the thread-pool threshold
    batch = runtime.predict(big)
    for i in (0, 1, 12_499, 12_500, 12_501, 24_999):
        assert np.array_equal(runtime.predict(big[i : i + 1])[0], batch[i])
    ref = load_runtime(card_for(path), path)
    np.testing.assert_allclose(batch, ref.predict(big), rtol=0, atol=1e-12)


def test_lleaves_compiles_once_and_loads_from_the_cache(tmp_path: Path) -> None:
    path = fx.train_lightgbm(tmp_path, "binary", n_trees=10)
    cache = tmp_path / "cache" / "model.o"
    card = dataclasses.replace(card_for(path), runtime="lleaves",
                               extra={"compiled_path": str(cache)})
    runtime = load_runtime(card, path)  # the cache is absent: compiled there now
    assert cache.is_file() and cache.stat().st_size > 0
    stamp = cache.stat().st_mtime_ns
    assert compile_lightgbm(path, cache) == cache
    again = load_runtime(card, path)
    assert cache.stat().st_mtime_ns == stamp
    assert np.array_equal(again.predict(X), runtime.predict(X))
    assert not list(cache.parent.glob("*.tmp"))


def test_lleaves_needs_a_compiled_path(tmp_path: Path) -> None:
    path = fx.train_lightgbm(tmp_path, "binary", n_trees=3)
    with pytest.raises(ValidationError, match="compiled_path"):
        load_runtime(card_for(path, runtime="lleaves"), path)


@pytest.mark.parametrize("task", fx.TASKS)
def test_lightgbm_matches_booster_predict_exactly(model_dir: Path, task: str) -> None:
    import lightgbm

    path = fx.train_lightgbm(_subdir(model_dir, "lightgbm"), task)
    runtime = load_runtime(card_for(path), path)
    raw = np.asarray(lightgbm.Booster(model_file=str(path)).predict(X))
    out = runtime.predict(X)
    if task == "binary":
        assert np.array_equal(out[:, 1], raw) and np.array_equal(out[:, 0], 1.0 - raw)
    else:
        assert np.array_equal(out, raw.reshape(len(X), -1))


def test_lightgbm_threaded_batches_match_single_rows(tmp_path: Path) -> None:
    path = fx.train_lightgbm(tmp_path, "multiclass")
    runtime = load_runtime(card_for(path), path, threads=2)
    big = fx.features(5_000, seed=7)  # above the one-thread threshold
    batch = runtime.predict(big)
    for i in range(0, 5_000, 97):
        assert np.array_equal(runtime.predict(big[i : i + 1])[0], batch[i])


@pytest.mark.parametrize("task", fx.TASKS)
def test_xgboost_matches_booster_predict(model_dir: Path, task: str) -> None:
    import xgboost

    path = fx.train_xgboost(_subdir(model_dir, "xgboost-ubj"), task, "ubj")
    runtime = load_runtime(card_for(path), path)
    booster = xgboost.Booster(model_file=str(path))
    raw = booster.predict(xgboost.DMatrix(X, feature_names=booster.feature_names))
    out = runtime.predict(X)
    expected = raw.reshape(len(X), -1).astype(np.float64)
    np.testing.assert_allclose(out[:, 1:] if task == "binary" else out, expected, atol=1e-7)


@pytest.mark.parametrize("task", fx.TASKS)
def test_onnx_agrees_with_lightgbm_to_float32_precision(model_dir: Path, task: str) -> None:
    path = fx.train_onnx(_subdir(model_dir, "onnx-lightgbm"), task)
    runtime = load_runtime(card_for(path), path)
    session = getattr(runtime, "_session")  # noqa: B009 - a private attribute, on purpose
    assert session.get_session_options().intra_op_num_threads == 1
    out = runtime.predict(X)
    x, y = fx.synthetic(task)
    assert out.shape[0] == len(X)
    # the converted model is a float32 tree ensemble: close to, not bit-identical with, LightGBM
    import lightgbm

    params: dict[str, Any] = {"n_estimators": 20, "num_leaves": 7, "min_child_samples": 5,
                              "n_jobs": 1, "random_state": 0, "deterministic": True,
                              "force_row_wise": True, "verbose": -1}
    ref: np.ndarray
    if task == "regression":
        ref = np.asarray(lightgbm.LGBMRegressor(**params).fit(x, y).predict(X)).reshape(-1, 1)
    else:
        ref = np.asarray(lightgbm.LGBMClassifier(**params).fit(x, y).predict_proba(X))
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("task", fx.TASKS)
def test_sklearn_matches_the_estimator_exactly(model_dir: Path, task: str) -> None:
    import pandas as pd

    path = fx.train_sklearn(_subdir(model_dir, "sklearn-skops"), task)
    runtime = load_runtime(card_for(path), path)
    model = fx.fit_sklearn(task)
    frame = pd.DataFrame(X, columns=fx.default_names(8))
    ref = model.predict(frame).reshape(-1, 1) if task == "regression" else model.predict_proba(
        frame)
    assert np.array_equal(runtime.predict(X), ref)


@pytest.mark.parametrize("source", ["onnx-linear", "sklearn-linear"])
def test_matrix_product_models_fall_back_to_row_by_row(model_dir: Path, source: str) -> None:
    trainer = {r[0]: r[1] for r in RUNTIMES}[source]
    path = trainer(_subdir(model_dir, source), "binary")
    runtime = load_runtime(card_for(path), path)
    assert getattr(runtime, "row_exact") is True  # noqa: B009
    _assert_rows_match_batch(runtime, X_CLEAN)
    tree_path = fx.train_sklearn(_subdir(model_dir, "sklearn-forest"), "binary", kind="forest")
    assert getattr(load_runtime(card_for(tree_path), tree_path), "row_exact") is False  # noqa: B009


@pytest.mark.parametrize(
    "trainer",
    [lambda d: fx.train_lightgbm(d), lambda d: fx.train_xgboost(d), lambda d: fx.train_onnx(d),
     lambda d: fx.train_sklearn(d)],
    ids=["lightgbm", "xgboost", "onnx", "sklearn"],
)
def test_wrong_column_count_and_shape_are_refused(
    tmp_path: Path, trainer: Callable[[Path], Path]
) -> None:
    path = trainer(tmp_path)
    runtime = load_runtime(card_for(path), path)
    with pytest.raises(ValidationError, match="takes 8 features, got 7") as err:
        runtime.predict(X[:, :7])
    assert err.value.details == {"expected": 8, "got": 7}
    with pytest.raises(ValidationError, match="2-D"):
        runtime.predict(X[0])


def test_card_that_disagrees_with_the_model_is_refused(tmp_path: Path) -> None:
    path = fx.train_lightgbm(tmp_path, "multiclass")
    with pytest.raises(ValidationError, match="outputs per row"):
        load_runtime(card_for(path, task=Task.BINARY, classes=("0", "1")), path)
    with pytest.raises(ValidationError, match="features but its card names"):
        load_runtime(card_for(path, feature_names=("a", "b")), path)
    with pytest.raises(ValidationError, match="outputs per row"):
        load_runtime(card_for(path, classes=("0", "1", "2", "3")), path)


def test_unknown_flavor_runtime_or_file_is_refused(tmp_path: Path) -> None:
    path = fx.train_lightgbm(tmp_path, "binary", n_trees=3)
    with pytest.raises(ValidationError, match="unknown model flavor"):
        load_runtime(card_for(path, flavor="catboost"), path)
    with pytest.raises(ValidationError, match="does not serve"):
        load_runtime(card_for(path, runtime="tl2cgen"), path)
    with pytest.raises(ValidationError, match="not found"):
        load_runtime(card_for(path), tmp_path / "gone.txt")
