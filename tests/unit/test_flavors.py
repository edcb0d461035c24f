"""Model flavor detection and inspection (sigserve.registry.flavors) on tiny real models."""

from __future__ import annotations

import itertools
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sigserve.domain import Task
from sigserve.errors import ValidationError
from sigserve.registry import flavors
from sigserve.registry.flavors import ModelInspection, check_lightgbm_text, inspect_model
from tests.fixtures import models as fx

ROOT = Path(__file__).resolve().parents[2]

# (id, trainer, flavor, ext)
FORMATS: list[tuple[str, Callable[[Path, str], Path], str, str]] = [
    ("lightgbm", lambda d, t: fx.train_lightgbm(d, t), "lightgbm", ".txt"),
    ("xgboost-json", lambda d, t: fx.train_xgboost(d, t, "json"), "xgboost", ".json"),
    ("xgboost-ubj", lambda d, t: fx.train_xgboost(d, t, "ubj"), "xgboost", ".ubj"),
    ("onnx-lightgbm", lambda d, t: fx.train_onnx(d, t), "onnx", ".onnx"),
    ("onnx-sklearn", lambda d, t: fx.train_onnx(d, t, source="sklearn"), "onnx", ".onnx"),
    ("sklearn-skops", lambda d, t: fx.train_sklearn(d, t, "skops"), "sklearn", ".skops"),
    ("sklearn-pkl", lambda d, t: fx.train_sklearn(d, t, "pkl"), "sklearn", ".pkl"),
]
EXPECTED_CLASSES = {"binary": ("0", "1"), "multiclass": ("0", "1", "2"), "regression": ()}


@pytest.mark.parametrize("task", fx.TASKS)
@pytest.mark.parametrize(("trainer", "flavor", "ext"), [f[1:] for f in FORMATS],
                         ids=[f[0] for f in FORMATS])
def test_every_format_is_recognised_and_described(
    tmp_path: Path, trainer: Callable[[Path, str], Path], flavor: str, ext: str, task: str
) -> None:
    path = trainer(tmp_path, task)
    # the isolated load (the default, ~0.5-3 s a file) once per format; in-process for the rest
    info = inspect_model(path, trust_pickle=True, isolate=task == "binary")
    assert isinstance(info, ModelInspection)
    assert info.flavor == flavor
    assert info.ext == ext
    assert info.task == Task(task)
    assert info.classes == EXPECTED_CLASSES[task]
    assert info.n_features == 8
    assert info.feature_names == tuple(f"f{i}" for i in range(8))
    assert "library_version" in info.extra


@pytest.mark.parametrize(
    "trainer",
    [
        lambda d, names: fx.train_lightgbm(d, "binary", n_features=3, feature_names=names),
        lambda d, names: fx.train_xgboost(d, "binary", "ubj", n_features=3, feature_names=names),
        lambda d, names: fx.train_onnx(d, "binary", n_features=3, feature_names=names),
        lambda d, names: fx.train_sklearn(d, "binary", n_features=3, feature_names=names),
    ],
    ids=["lightgbm", "xgboost", "onnx", "sklearn"],
)
def test_feature_names_come_from_the_model_in_order(
    tmp_path: Path, trainer: Callable[[Path, list[str]], Path]
) -> None:
    names = ["rsi_14", "atr_14", "ret_1"]
    info = inspect_model(trainer(tmp_path, names), isolate=False)
    assert info.feature_names == tuple(names)
    assert info.n_features == 3


def test_lightgbm_header_facts(tmp_path: Path) -> None:
    info = inspect_model(fx.train_lightgbm(tmp_path, "multiclass", n_trees=7), isolate=False)
    assert info.extra["objective"].startswith("multiclass")
    assert info.extra["num_class"] == 3
    assert info.extra["num_trees"] == 21  # 7 rounds x 3 classes
    assert info.extra["format_version"] == "v4"


def test_xgboost_objective_and_rounds(tmp_path: Path) -> None:
    info = inspect_model(fx.train_xgboost(tmp_path, "regression", "json", n_trees=5), isolate=False)
    assert info.extra["objective"] == "reg:squarederror"
    assert info.extra["num_boosted_rounds"] == 5


def test_onnx_facts(tmp_path: Path) -> None:
    info = inspect_model(fx.train_onnx(tmp_path, "multiclass"), isolate=False)
    assert info.extra["input_dtype"] == "float32"
    assert "TreeEnsembleClassifier" in info.extra["ops"]
    assert "ZipMap" not in info.extra["ops"]


def test_sklearn_facts(tmp_path: Path) -> None:
    info = inspect_model(fx.train_sklearn(tmp_path, "binary", "skops"), isolate=False)
    assert info.extra["estimator"].endswith("HistGradientBoostingClassifier")


@pytest.mark.parametrize(
    ("trainer", "new_name", "flavor"),
    [
        (lambda d: fx.train_lightgbm(d), "model.bin", "lightgbm"),
        (lambda d: fx.train_xgboost(d, fmt="json"), "model.bin", "xgboost"),
        (lambda d: fx.train_xgboost(d, fmt="ubj"), "model.json", "xgboost"),
        (lambda d: fx.train_onnx(d), "model.bin", "onnx"),
        (lambda d: fx.train_sklearn(d, fmt="skops"), "model.zip", "sklearn"),
    ],
    ids=["lightgbm", "xgboost-json", "xgboost-ubj", "onnx", "skops"],
)
def test_detection_is_by_content_not_extension(
    tmp_path: Path, trainer: Callable[[Path], Path], new_name: str, flavor: str
) -> None:
    renamed = trainer(tmp_path).rename(tmp_path / new_name)
    info = inspect_model(renamed)  # the isolated probe loads it by content too
    assert info.flavor == flavor
    assert info.task is Task.BINARY


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.txt", b""),
        ("bars.csv", b"ts,open,high,low,close\n2024-01-01,1,2,0.5,1.5\n"),
        ("noise.bin", bytes(range(256)) * 8),
        ("config.json", b'{"objective": "binary", "trees": []}'),
        ("archive.zip", None),
    ],
)
def test_unknown_formats_are_refused(tmp_path: Path, name: str, content: bytes | None) -> None:
    path = tmp_path / name
    if content is None:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "not a model")
    else:
        path.write_bytes(content)
    with pytest.raises(ValidationError, match="unknown model format") as err:
        inspect_model(path)
    assert err.value.code == "validation_error"


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not found"):
        inspect_model(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    "trainer",
    [
        lambda d: fx.train_lightgbm(d),
        lambda d: fx.train_xgboost(d, fmt="ubj"),
        lambda d: fx.train_onnx(d),
        lambda d: fx.train_sklearn(d, fmt="skops"),
    ],
    ids=["lightgbm", "xgboost-ubj", "onnx", "skops"],
)
def test_corrupt_files_are_refused_at_inspection(
    tmp_path: Path, trainer: Callable[[Path], Path]
) -> None:
    path = trainer(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated upload
    with pytest.raises(ValidationError):
        inspect_model(path)


@pytest.fixture(scope="module")
def lgb_text(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return fx.train_lightgbm(tmp_path_factory.mktemp("lgb"), "binary", n_trees=5).read_bytes()


def test_lightgbm_structure_check_refuses_every_truncation(lgb_text: bytes) -> None:
    # LightGBM trusts tree_sizes and reads out of bounds (or aborts) on a truncated file, so
    # the check must catch every cut before LightGBM sees the text.
    check_lightgbm_text(lgb_text)
    end = lgb_text.index(b"end of trees")
    for cut in range(0, end, max(1, end // 200)):
        with pytest.raises(ValidationError, match="invalid LightGBM model"):
            check_lightgbm_text(lgb_text[:cut])


def _fix_tree_sizes(text: bytes) -> bytes:
    """Recompute tree_sizes after an edit, as a careful forger would."""
    start = text.index(b"\nTree=") + 1
    end = text.index(b"\nend of trees") + 1
    starts = [m.start() for m in re.finditer(rb"^Tree=\d+\r?$", text[start:end], re.M)]
    sizes = [b - a for a, b in itertools.pairwise([*starts, end - start])]
    line = b"tree_sizes=" + b" ".join(b"%d" % n for n in sizes)
    return re.sub(rb"^tree_sizes=[0-9 ]*$", line, text, count=1, flags=re.M)


@pytest.mark.parametrize(
    ("pattern", "new", "reason"),
    [
        (rb"split_feature=\d+", b"split_feature=99", "uses a feature beyond 8"),
        (rb"left_child=-?\d+", b"left_child=-9999", "left_child of node 0 is -9999"),
        (rb"right_child=-?\d+", b"right_child=0", "right_child of node 0 is 0"),
        (rb"num_leaves=\d+", b"num_leaves=99", "leaf_value does not hold 99"),
        (rb"decision_type=\d+", b"decision_type=1", "categorical split 0 out of range"),
        (rb"threshold=\S+ ", b"threshold=", "threshold does not hold"),
        (rb"max_feature_idx=7", b"max_feature_idx=x", "max_feature_idx"),
        (rb"tree_sizes=\d+", b"tree_sizes=1", "tree_sizes do not match"),
    ],
)
def test_lightgbm_structure_check_refuses_tampering(
    tmp_path: Path, lgb_text: bytes, pattern: bytes, new: bytes, reason: str
) -> None:
    tampered = re.sub(pattern, new, lgb_text, count=1)
    assert tampered != lgb_text
    if not pattern.startswith(b"tree_sizes"):
        tampered = _fix_tree_sizes(tampered)
    with pytest.raises(ValidationError, match=reason):
        check_lightgbm_text(tampered)
    path = tmp_path / "tampered.txt"
    path.write_bytes(tampered)
    with pytest.raises(ValidationError, match="invalid LightGBM model"):
        inspect_model(path, isolate=False)


def test_fixed_tree_sizes_helper_is_faithful(lgb_text: bytes) -> None:
    assert _fix_tree_sizes(lgb_text) == lgb_text


def test_a_library_crash_is_contained_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fx.train_xgboost(tmp_path, fmt="ubj")
    monkeypatch.setattr(flavors, "_PROBE_CODE",
                        "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(ValidationError, match=r"crashed \(signal 11\)") as err:
        inspect_model(path)
    assert err.value.details["signal"] == 11


def test_truncated_ubj_never_crashes_the_caller(tmp_path: Path) -> None:
    # XGBoost's UBJ reader can segfault on a truncated file; the isolated probe takes the hit.
    data = fx.train_xgboost(tmp_path, fmt="ubj").read_bytes()
    path = tmp_path / "cut.ubj"
    for cut in range(64, len(data), len(data) // 8):
        path.write_bytes(data[:cut])
        with pytest.raises(ValidationError):
            inspect_model(path)


class _Bomb:
    """Unpickling this touches a marker file: proof that a pickle was (not) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Path.touch, (str(self.marker),))


@pytest.mark.parametrize("name", ["model.pkl", "model.joblib", "model.pickle", "model.bin"])
def test_pickle_is_refused_without_trust_and_never_executed(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Bomb(marker), protocol=4))
    with pytest.raises(ValidationError, match="--trust-pickle") as err:
        inspect_model(path)
    assert err.value.code == "validation_error"
    assert not marker.exists()


def test_trusted_pickle_must_hold_an_estimator(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"not": "a model"}))
    with pytest.raises(ValidationError, match="not a fitted scikit-learn estimator"):
        inspect_model(path, trust_pickle=True, isolate=False)


def test_trusted_pickle_loads(tmp_path: Path) -> None:
    info = inspect_model(fx.train_sklearn(tmp_path, "multiclass", "pkl"), trust_pickle=True,
                         isolate=False)
    assert (info.flavor, info.ext, info.task) == ("sklearn", ".pkl", Task.MULTICLASS)


def test_skops_with_foreign_types_needs_trust(tmp_path: Path) -> None:
    import lightgbm
    import skops.io

    x, y = fx.synthetic("binary")
    model = lightgbm.LGBMClassifier(n_estimators=3, verbose=-1).fit(x, y)
    path = tmp_path / "lgbm.skops"
    skops.io.dump(model, path)
    with pytest.raises(ValidationError, match="--trust-pickle") as err:
        inspect_model(path)
    assert "lightgbm.sklearn.LGBMClassifier" in err.value.details["untrusted_types"]
    info = inspect_model(path, trust_pickle=True, isolate=False)
    assert (info.flavor, info.task, info.classes) == ("sklearn", Task.BINARY, ("0", "1"))


@pytest.mark.parametrize(
    ("module", "extra", "trainer"),
    [
        ("xgboost", "xgboost", lambda d: fx.train_xgboost(d)),
        ("onnx", "onnx", lambda d: fx.train_onnx(d)),
        ("skops.io", "sklearn", lambda d: fx.train_sklearn(d)),
    ],
)
def test_missing_library_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, extra: str,
    trainer: Callable[[Path], Path],
) -> None:
    path = trainer(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(ValidationError, match=rf"sigserve\[{extra}\]") as err:
        inspect_model(path, isolate=False)
    assert err.value.details["extra"] == extra


def test_custom_objective_leaves_the_task_open(tmp_path: Path) -> None:
    src = fx.train_lightgbm(tmp_path, "regression")
    text = src.read_text().replace("objective=regression", "objective=custom", 1)
    path = tmp_path / "custom.txt"
    path.write_text(text)
    info = inspect_model(path, isolate=False)
    assert info.task is None and info.classes is None


def test_importing_flavors_and_runtimes_loads_no_heavy_library() -> None:
    code = (
        "import sys, sigserve.registry.flavors, sigserve.runtimes;"
        "heavy = {'lightgbm', 'xgboost', 'onnx', 'onnxruntime', 'sklearn', 'skops', 'lleaves'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT,
                         env={"PYTHONPATH": f"{ROOT / 'src'}", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_inspection_leaves_the_file_alone(tmp_path: Path) -> None:
    path = fx.train_lightgbm(tmp_path)
    copy = tmp_path / "copy.txt"
    shutil.copy(path, copy)
    inspect_model(path, isolate=False)
    assert path.read_bytes() == copy.read_bytes()
