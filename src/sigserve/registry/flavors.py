"""Model flavors: recognise a model file by its content, read what it says about itself, and load it
once with its own library so that a corrupt or invalid file is refused at registration.

Formats, in the order they are recognised:

- pickle / joblib (``.pkl``, ``.pickle``, ``.joblib``, or a pickle header): scikit-learn models.
  Refused unless ``trust_pickle=True``: a pickle can run any code when loaded.
- LightGBM text model (starts with ``tree`` and a ``version=v``/``num_class=`` header).
- XGBoost JSON (an object with a ``learner`` key) and XGBoost UBJ (its binary twin).
- skops (a zip with ``schema.json``): scikit-learn models. Types outside scikit-learn and numpy
  are refused unless ``trust_pickle=True``.
- ONNX (a protobuf ``ModelProto``; ``.onnx``). Feature names come from
  ``metadata_props["feature_names"]`` (comma separated) when the converter stored them.

LightGBM and XGBoost files do not store class labels: their classes are the label indices
``"0" .. "k-1"`` they were trained on. Regression models have no classes (``()``); ``classes`` and
``task`` are None when the file does not say (a custom objective, an unlabelled ONNX graph).

Usage::

    info = inspect_model(Path("model.txt"))
    info.flavor, info.task, info.feature_names, info.ext
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..domain import Task
from ..errors import ValidationError, missing_extra

__all__ = ["FLAVORS", "ModelInspection", "check_lightgbm_text", "inspect_model", "probe_main"]

FLAVORS = ("lightgbm", "xgboost", "onnx", "sklearn")

_PICKLE_EXTS = frozenset({".pkl", ".pickle", ".joblib"})
_HEAD_BYTES = 4096

_LGB_BINARY = frozenset({"binary", "cross_entropy", "xentropy"})
_LGB_MULTICLASS = frozenset(
    {"multiclass", "softmax", "multiclassova", "multiclass_ova", "ova", "ovr"}
)
_LGB_UNKNOWN = frozenset({"custom", "none", "null", "na", ""})

_XGB_JSON_HEAD = re.compile(rb'^\s*\{\s*"learner"\s*:')
_UBJ_LENGTH_MARKERS = b"iUIlL"

_TRUST_HINT = (
    "loading it can run arbitrary code. Convert the model to a native format (LightGBM text, "
    "XGBoost JSON/UBJ, ONNX or skops), or, if you trust this exact file, register it with "
    "--trust-pickle (its sha256 is then trusted, never its path)"
)


@dataclass(frozen=True)
class ModelInspection:
    flavor: str  # "lightgbm" | "xgboost" | "onnx" | "sklearn"
    ext: str  # artifact extension: ".txt", ".json", ".ubj", ".onnx", ".skops", ".pkl"
    task: Task | None  # None when the format does not say
    feature_names: tuple[str, ...] | None
    classes: tuple[str, ...] | None  # as strings; () for regression
    n_features: int | None
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable facts


def inspect_model(
    path: Path, *, trust_pickle: bool = False, isolate: bool = True
) -> ModelInspection:
    """Recognise the model file at ``path``, load it with its library and describe it.

    Raises :class:`~sigserve.errors.ValidationError` for an unknown format, a file its library
    refuses, or a pickle (or a skops file with foreign types) when ``trust_pickle`` is False;
    ``missing_extra`` errors name the extra to install for an absent optional library.

    The native loaders (LightGBM, XGBoost UBJ, ...) trust their input and can crash the whole
    process on a truncated or tampered file. With ``isolate`` (the default) the file is first
    loaded, and predicted on a few rows, in a child process (about a second, at registration
    only); a crash there is refused as an invalid file. LightGBM text is also checked for
    structure (tree offsets, node and feature indices) before LightGBM reads it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"model file not found: {path}", details={"path": str(path)})
    with path.open("rb") as fh:
        head = fh.read(_HEAD_BYTES)
    suffix = path.suffix.lower()

    if suffix in _PICKLE_EXTS or head[:1] == b"\x80":
        return _inspect_pickle(path, trust_pickle, isolate)
    if head.startswith(b"tree") and (b"version=v" in head or b"num_class=" in head):
        check_lightgbm_text(path.read_bytes())
        _probe(path, "lightgbm", isolate)
        return _inspect_lightgbm(path)
    if head[:1] == b"{" and head[1:2] in _UBJ_LENGTH_MARKERS and b"learner" in head[:64]:
        _probe(path, "xgboost", isolate)
        return _inspect_xgboost(path, ".ubj")
    if head.lstrip()[:1] == b"{" and _is_xgboost_json(path, head):
        _probe(path, "xgboost", isolate)
        return _inspect_xgboost(path, ".json")
    if head.startswith(b"PK\x03\x04") and _is_skops(path):
        return _inspect_skops(path, trust_pickle, isolate)
    if suffix == ".onnx" or head[:1] == b"\x08":
        found = _inspect_onnx(path, strict=suffix == ".onnx", isolate=isolate)
        if found is not None:
            return found
    raise ValidationError(
        f"unknown model format for {path.name}: expected a LightGBM text model, XGBoost JSON/UBJ, "
        "ONNX, skops or (with --trust-pickle) a scikit-learn pickle",
        details={"path": str(path)},
    )


# --- helpers ---------------------------------------------------------------------------------


def _import(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra(module.split(".")[0], extra) from exc


def _refuse_load(kind: str, path: Path, exc: BaseException) -> ValidationError:
    return ValidationError(
        f"{kind} could not load {path.name}: {str(exc).strip() or type(exc).__name__}",
        details={"path": str(path), "flavor": kind},
    )


def _class_labels(task: Task | None, n_class: int) -> tuple[str, ...] | None:
    if task is Task.BINARY:
        return ("0", "1")
    if task is Task.MULTICLASS:
        return tuple(str(i) for i in range(n_class))
    if task is Task.REGRESSION:
        return ()
    return None


# --- isolation probe ---------------------------------------------------------------------------

_PROBE_TIMEOUT_S = 300
_PROBE_ROWS = 16
_PROBE_MISSING = 4  # exit status of probe_main for a missing optional library
_PROBE_CODE = (
    "import sys; from sigserve.registry.flavors import probe_main; "
    "sys.exit(probe_main(sys.argv[1], sys.argv[2]))"
)


def _probe(path: Path, flavor: str, isolate: bool) -> None:
    """Load ``path`` and predict a few rows in a child process; refuse the file if that fails."""
    if not isolate:
        return
    paths = [p or os.getcwd() for p in sys.path]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE_CODE, flavor, str(path)],
            capture_output=True, text=True, errors="replace", env=env,
            timeout=_PROBE_TIMEOUT_S, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ValidationError(
            f"loading {path.name} with {flavor} took over {_PROBE_TIMEOUT_S} s",
            details={"path": str(path), "flavor": flavor},
        ) from exc
    if done.returncode == 0:
        return
    if done.returncode < 0:
        raise ValidationError(
            f"{flavor} crashed (signal {-done.returncode}) loading {path.name}: the file is "
            "corrupt or was tampered with",
            details={"path": str(path), "flavor": flavor, "signal": -done.returncode},
        )
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    if done.returncode == _PROBE_MISSING and lines:
        module, _, extra = lines[-1].partition(" ")
        raise missing_extra(module, extra)
    reason = lines[-1] if lines else f"exit status {done.returncode}"
    raise ValidationError(
        f"{flavor} could not load and predict with {path.name}: {reason}",
        details={"path": str(path), "flavor": flavor},
    )


def probe_main(flavor: str, path_text: str) -> int:
    """The child side of the isolation probe: load the model, predict a few rows, exit 0.

    Exit 3 with the reason on stderr when the library refuses the file; 4 with ``module extra``
    when an optional library is missing; a native crash ends the process by a signal.
    """
    import warnings

    import numpy as np

    warnings.simplefilter("ignore")
    if flavor in ("lightgbm", "xgboost"):
        # their optional scikit-learn and pandas integrations cost ~2 s of imports here
        for optional in ("sklearn", "pandas"):
            sys.modules.setdefault(optional, None)  # type: ignore[arg-type]
    path = Path(path_text)
    rows = np.random.default_rng(0).normal(size=(_PROBE_ROWS, 1))
    try:
        if flavor == "lightgbm":
            import lightgbm

            booster = lightgbm.Booster(model_file=str(path))
            x = np.resize(rows, (_PROBE_ROWS, booster.num_feature()))
            booster.predict(x)
            booster.predict(x[:1])
        elif flavor == "xgboost":
            from ..runtimes.xgboost_rt import load_booster

            xgb = load_booster(path)
            x = np.resize(rows, (_PROBE_ROWS, xgb.num_features()))
            xgb.inplace_predict(x, validate_features=False)
        elif flavor == "onnx":
            ort = _import("onnxruntime", "onnx")
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            inp = session.get_inputs()[0]
            n = inp.shape[-1] if isinstance(inp.shape[-1], int) else None
            names = session.get_modelmeta().custom_metadata_map.get("feature_names")
            n = n or (len(names.split(",")) if names else None)
            if n:
                dtype = np.float32 if inp.type == "tensor(float)" else np.float64
                session.run(None, {inp.name: np.resize(rows, (_PROBE_ROWS, n)).astype(dtype)})
        else:
            from ..runtimes.sklearn_rt import load_sklearn_model

            model = load_sklearn_model(path)
            n = getattr(model, "n_features_in_", None)
            if n:
                fn = getattr(model, "predict_proba", None) or model.predict
                fn(np.resize(rows, (_PROBE_ROWS, int(n))))
    except ValidationError as exc:
        if exc.details.get("extra"):
            print(f"{exc.details['module']} {exc.details['extra']}", file=sys.stderr)
            return _PROBE_MISSING
        print(exc.message, file=sys.stderr)
        return 3
    except Exception as exc:
        print(" ".join(f"{type(exc).__name__}: {exc}".split())[:500], file=sys.stderr)
        return 3
    return 0


# --- LightGBM --------------------------------------------------------------------------------


def _invalid_lightgbm(reason: str) -> ValidationError:
    return ValidationError(f"invalid LightGBM model: {reason}", details={"reason": reason})


def _ints(kv: dict[str, str], key: str, count: int, tree: int) -> list[int]:
    try:
        values = [int(v) for v in kv.get(key, "").split()]
    except ValueError as exc:
        raise _invalid_lightgbm(f"tree {tree}: {key} holds a non-integer") from exc
    if len(values) != count:
        raise _invalid_lightgbm(f"tree {tree}: {key} has {len(values)} values, expected {count}")
    return values


def _check_tree(block: str, tree: int, n_features: int) -> None:
    kv: dict[str, str] = {}
    for line in block.splitlines()[1:]:
        key, sep, value = line.partition("=")
        if sep:
            kv[key] = value
    try:
        num_leaves = int(kv["num_leaves"])
        num_cat = int(kv.get("num_cat", "0"))
    except (KeyError, ValueError) as exc:
        raise _invalid_lightgbm(f"tree {tree}: bad or missing num_leaves/num_cat") from exc
    if num_leaves < 1 or num_cat < 0:
        raise _invalid_lightgbm(f"tree {tree}: num_leaves={num_leaves} num_cat={num_cat}")
    if len(kv.get("leaf_value", "").split()) != num_leaves:
        raise _invalid_lightgbm(f"tree {tree}: leaf_value does not hold {num_leaves} values")
    if num_leaves == 1:
        return
    n = num_leaves - 1
    if any(not 0 <= f < n_features for f in _ints(kv, "split_feature", n, tree)):
        raise _invalid_lightgbm(f"tree {tree}: a split uses a feature beyond {n_features}")
    thresholds = kv.get("threshold", "").split()
    if len(thresholds) != n:
        raise _invalid_lightgbm(f"tree {tree}: threshold does not hold {n} values")
    decision = _ints(kv, "decision_type", n, tree)
    for side in ("left_child", "right_child"):
        for node, child in enumerate(_ints(kv, side, n, tree)):
            # internal children come after their parent (so no cycles); leaves are ~index
            if not (node < child < n or -num_leaves <= child <= -1):
                raise _invalid_lightgbm(f"tree {tree}: {side} of node {node} is {child}")
    if num_cat:
        bounds = _ints(kv, "cat_boundaries", num_cat + 1, tree)
        if bounds[0] != 0 or any(b < a for a, b in itertools.pairwise(bounds)):
            raise _invalid_lightgbm(f"tree {tree}: cat_boundaries are not increasing from 0")
        _ints(kv, "cat_threshold", bounds[-1], tree)
    for node, kind in enumerate(decision):
        if kind & 1:  # a categorical split: its threshold indexes cat_boundaries
            try:
                idx = int(float(thresholds[node]))
            except ValueError as exc:
                raise _invalid_lightgbm(f"tree {tree}: bad categorical threshold") from exc
            if not 0 <= idx < num_cat:
                raise _invalid_lightgbm(f"tree {tree}: categorical split {node} out of range")
    if kv.get("is_linear", "0").strip() == "1":
        try:
            used = [int(v) for v in kv.get("leaf_features", "").split()]
        except ValueError as exc:
            raise _invalid_lightgbm(f"tree {tree}: leaf_features holds a non-integer") from exc
        if any(not 0 <= f < n_features for f in used):
            raise _invalid_lightgbm(f"tree {tree}: a linear leaf uses a feature beyond "
                                    f"{n_features}")


def check_lightgbm_text(data: bytes) -> None:
    """Check a LightGBM text model's structure before LightGBM parses it.

    LightGBM trusts its ``tree_sizes`` offsets and its node and feature indices: a truncated or
    tampered file makes it read out of bounds or abort the process. This checks that the file
    reaches ``end of trees``, that every tree lies where ``tree_sizes`` says, and that every split
    names an existing feature and existing child nodes.
    """
    start = data.find(b"\nTree=") + 1
    end = data.find(b"\nend of trees") + 1
    if start <= 0 or end <= start:
        raise _invalid_lightgbm("no trees, or the file is truncated (no 'end of trees')")
    header: dict[str, str] = {}
    for line in data[:start].decode("utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    try:
        n_features = int(header["max_feature_idx"]) + 1
    except (KeyError, ValueError) as exc:
        raise _invalid_lightgbm("bad or missing max_feature_idx") from exc
    if n_features < 1:
        raise _invalid_lightgbm(f"max_feature_idx={n_features - 1}")
    region = data[start:end]
    blocks: list[bytes] = []
    if "tree_sizes" in header:
        try:
            sizes = [int(v) for v in header["tree_sizes"].split()]
        except ValueError as exc:
            raise _invalid_lightgbm("tree_sizes holds a non-integer") from exc
        if any(size <= 0 for size in sizes) or sum(sizes) != len(region):
            raise _invalid_lightgbm("tree_sizes do not match the trees in the file")
        offset = 0
        for i, size in enumerate(sizes):
            block = region[offset : offset + size]
            if not re.match(rb"Tree=%d\r?\n" % i, block):
                raise _invalid_lightgbm(f"tree {i} is not where tree_sizes puts it")
            blocks.append(block)
            offset += size
    else:
        blocks = [b"Tree=" + part for part in region.split(b"Tree=")[1:]]
    for i, block in enumerate(blocks):
        _check_tree(block.decode("utf-8", errors="replace"), i, n_features)




def _lightgbm_header(path: Path) -> dict[str, str]:
    header: dict[str, str] = {}
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if line.startswith("Tree="):
                break
            key, sep, value = line.partition("=")
            if sep:
                header[key.strip()] = value
    return header


def _inspect_lightgbm(path: Path) -> ModelInspection:
    from ..runtimes import import_lightgbm

    lightgbm = import_lightgbm()

    header = _lightgbm_header(path)
    try:
        booster = lightgbm.Booster(model_file=str(path))
    except Exception as exc:
        raise _refuse_load("lightgbm", path, exc) from exc
    objective_line = header.get("objective", "").strip()
    objective = objective_line.split(" ")[0] if objective_line else ""
    n_class = int(header.get("num_class", booster.num_model_per_iteration()))
    task: Task | None
    if objective in _LGB_BINARY:
        task = Task.BINARY
    elif objective in _LGB_MULTICLASS:
        task = Task.MULTICLASS
    elif objective in _LGB_UNKNOWN:
        task = None
    else:
        task = Task.REGRESSION
    names_line = header.get("feature_names")
    names = tuple(names_line.split(" ")) if names_line else tuple(booster.feature_name())
    n_features = int(booster.num_feature())
    return ModelInspection(
        flavor="lightgbm",
        ext=".txt",
        task=task,
        feature_names=names or None,
        classes=_class_labels(task, n_class),
        n_features=n_features,
        extra={
            "objective": objective_line or None,
            "num_class": n_class,
            "num_trees": int(booster.num_trees()),
            "num_iterations": int(booster.current_iteration()),
            "format_version": header.get("version"),
            "library_version": lightgbm.__version__,
        },
    )


# --- XGBoost ---------------------------------------------------------------------------------


def _is_xgboost_json(path: Path, head: bytes) -> bool:
    if _XGB_JSON_HEAD.match(head):
        return True
    try:
        with path.open("rb") as fh:
            doc = json.load(fh)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and "learner" in doc


def _xgboost_task(objective: str) -> Task | None:
    if objective.startswith("binary:"):
        return Task.BINARY
    if objective.startswith("multi:"):
        return Task.MULTICLASS
    if objective.startswith(("reg:", "count:", "survival:", "rank:")):
        return Task.REGRESSION
    return None


def _inspect_xgboost(path: Path, ext: str) -> ModelInspection:
    xgboost = _import("xgboost", "xgboost")
    from ..runtimes.xgboost_rt import load_booster

    try:
        booster = load_booster(path)
        config = json.loads(booster.save_config())
    except Exception as exc:
        raise _refuse_load("xgboost", path, exc) from exc
    learner = config.get("learner", {})
    objective = str(learner.get("objective", {}).get("name", ""))
    params = learner.get("learner_model_param", {})
    n_class = int(params.get("num_class", "0") or 0)
    task = _xgboost_task(objective)
    names = booster.feature_names
    version = config.get("version")
    return ModelInspection(
        flavor="xgboost",
        ext=ext,
        task=task,
        feature_names=tuple(names) if names else None,
        classes=_class_labels(task, n_class),
        n_features=int(booster.num_features()),
        extra={
            "objective": objective or None,
            "num_class": n_class,
            "num_boosted_rounds": int(booster.num_boosted_rounds()),
            "booster": learner.get("gradient_booster", {}).get("name"),
            "format_version": ".".join(str(v) for v in version) if version else None,
            "library_version": xgboost.__version__,
        },
    )


# --- ONNX ------------------------------------------------------------------------------------

_ONNX_FLOAT = {1: "float32", 11: "float64"}  # onnx.TensorProto.FLOAT / DOUBLE
_ONNX_LABEL_TYPES = frozenset({6, 7, 8})  # INT32, INT64, STRING


def _inspect_onnx(path: Path, *, strict: bool, isolate: bool) -> ModelInspection | None:
    """Describe an ONNX model; None when the file is not ONNX and ``strict`` is False."""
    onnx = _import("onnx", "onnx")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        if not strict:
            return None
        raise _refuse_load("onnx", path, exc) from exc
    graph = model.graph
    if not strict and not graph.node:
        return None
    ort = _import("onnxruntime", "onnx")
    _probe(path, "onnx", isolate)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise _refuse_load("onnxruntime", path, exc) from exc

    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValidationError(
            f"the ONNX model takes {len(inputs)} inputs; sigserve feeds one (n, features) matrix",
            details={"inputs": [i.name for i in inputs]},
        )
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type not in _ONNX_FLOAT:
        raise ValidationError(
            "the ONNX model's input must be a float32 or float64 tensor",
            details={"elem_type": int(tensor.elem_type)},
        )
    dims = list(tensor.shape.dim)
    n_features = int(dims[-1].dim_value) if len(dims) == 2 and dims[-1].dim_value > 0 else None

    meta = {p.key: p.value for p in model.metadata_props}
    names: tuple[str, ...] | None = None
    if meta.get("feature_names"):
        names = tuple(s.strip() for s in meta["feature_names"].split(","))
        if n_features is not None and len(names) != n_features:
            raise ValidationError(
                f"the ONNX model takes {n_features} features but metadata_props names "
                f"{len(names)}",
                details={"n_features": n_features, "feature_names": list(names)},
            )
        n_features = n_features or len(names)

    labels: list[str] | None = None
    classifier = regressor = False
    ops = []
    for node in graph.node:
        ops.append(node.op_type)
        if node.op_type.endswith("Classifier") or node.op_type == "ZipMap":
            classifier = True
        if node.op_type.endswith("Regressor"):
            regressor = True
        for attr in node.attribute:
            if labels is None and attr.name == "classlabels_strings" and attr.strings:
                labels = [s.decode("utf-8") for s in attr.strings]
            elif labels is None and attr.name == "classlabels_int64s" and attr.ints:
                labels = [str(i) for i in attr.ints]
    prob_width: int | None = None
    for out in graph.output:
        kind = out.type.WhichOneof("value")
        if kind == "sequence_type":
            classifier = True
        elif kind == "tensor_type":
            t = out.type.tensor_type
            if t.elem_type in _ONNX_LABEL_TYPES:
                classifier = True
            out_dims = list(t.shape.dim)
            if t.elem_type in _ONNX_FLOAT and len(out_dims) == 2 and out_dims[1].dim_value > 0:
                prob_width = prob_width or int(out_dims[1].dim_value)

    task: Task | None = None
    classes: tuple[str, ...] | None = None
    if classifier:
        if labels is None and prob_width:
            labels = [str(i) for i in range(prob_width)]
        if labels:
            task = Task.BINARY if len(labels) == 2 else Task.MULTICLASS
            classes = tuple(labels)
    elif regressor or prob_width == 1:
        task, classes = Task.REGRESSION, ()

    return ModelInspection(
        flavor="onnx",
        ext=".onnx",
        task=task,
        feature_names=names,
        classes=classes,
        n_features=n_features,
        extra={
            "producer": f"{model.producer_name} {model.producer_version}".strip() or None,
            "ir_version": int(model.ir_version),
            "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
            "input_dtype": _ONNX_FLOAT[tensor.elem_type],
            "ops": sorted(set(ops)),
            "library_version": onnx.__version__,
        },
    )


# --- scikit-learn (skops, pickle) --------------------------------------------------------------


def _is_skops(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return "schema.json" in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _inspect_skops(path: Path, trust_pickle: bool, isolate: bool) -> ModelInspection:
    _import("sklearn", "sklearn")
    sio = _import("skops.io", "sklearn")
    from ..runtimes.sklearn_rt import load_sklearn_model

    try:
        untrusted = list(sio.get_untrusted_types(file=path))
    except Exception as exc:
        raise _refuse_load("skops", path, exc) from exc
    foreign = sorted(t for t in untrusted if not t.startswith(("sklearn.", "numpy.")))
    if foreign and not trust_pickle:
        raise ValidationError(
            f"the skops file {path.name} holds types outside scikit-learn and numpy "
            f"({', '.join(foreign)}); " + _TRUST_HINT,
            details={"path": str(path), "untrusted_types": foreign},
        )
    _probe(path, "sklearn", isolate)
    try:
        model = load_sklearn_model(path, trusted_types=untrusted)
    except Exception as exc:
        raise _refuse_load("skops", path, exc) from exc
    return _describe_sklearn(model, ".skops", path)


def _inspect_pickle(path: Path, trust_pickle: bool, isolate: bool) -> ModelInspection:
    if not trust_pickle:
        raise ValidationError(
            f"refusing to load the pickle {path.name}: " + _TRUST_HINT,
            details={"path": str(path), "hint": "--trust-pickle"},
        )
    _import("sklearn", "sklearn")
    from ..runtimes.sklearn_rt import load_sklearn_model

    _probe(path, "sklearn", isolate)
    try:
        model = load_sklearn_model(path)
    except ValidationError:
        raise
    except Exception as exc:
        raise _refuse_load("pickle", path, exc) from exc
    return _describe_sklearn(model, ".pkl", path)


def _describe_sklearn(model: Any, ext: str, path: Path) -> ModelInspection:
    from sklearn import __version__ as sklearn_version
    from sklearn.base import is_classifier

    if not callable(getattr(model, "predict", None)):
        raise ValidationError(
            f"{path.name} holds a {type(model).__name__}, not a fitted scikit-learn estimator",
            details={"path": str(path), "type": type(model).__name__},
        )
    names_in = getattr(model, "feature_names_in_", None)
    names = tuple(str(n) for n in names_in) if names_in is not None else None
    n_in = getattr(model, "n_features_in_", None)
    n_features = int(n_in) if n_in is not None else (len(names) if names else None)
    task: Task | None
    classes: tuple[str, ...] | None
    raw_classes = getattr(model, "classes_", None)
    if is_classifier(model):
        if raw_classes is None or getattr(raw_classes, "ndim", 1) != 1:
            task, classes = None, None  # unfitted or multi-output
        else:
            classes = tuple(str(c) for c in raw_classes)
            task = Task.BINARY if len(classes) == 2 else Task.MULTICLASS
            if not callable(getattr(model, "predict_proba", None)):
                raise ValidationError(
                    f"the {type(model).__name__} classifier has no predict_proba",
                    details={"estimator": type(model).__name__},
                )
    else:
        task, classes = Task.REGRESSION, ()
    cls = type(model)
    return ModelInspection(
        flavor="sklearn",
        ext=ext,
        task=task,
        feature_names=names,
        classes=classes,
        n_features=n_features,
        extra={
            "estimator": f"{cls.__module__}.{cls.__qualname__}",
            "trained_with": getattr(model, "_sklearn_version", None),
            "library_version": sklearn_version,
        },
    )
