"""Fit the configured model type with class weights and save it in its native format.

==============  ==========================  =========================================
type            file                        notes
==============  ==========================  =========================================
lightgbm        LightGBM text (``.txt``)    early stopping on the validation part
xgboost         XGBoost JSON (``.json``)    early stopping on the validation part;
                                            ``pip install 'sigserve[xgboost]'``
random_forest   skops (``.skops``)          scikit-learn; ``pip install 'sigserve[sklearn]'``
==============  ==========================  =========================================

``class_weight: balanced`` weighs each training row by ``n / (k * n_class)``, so a rare class
counts as much as a frequent one. ``params`` pass through to the library (``n_estimators`` is the
number of boosting rounds for LightGBM and XGBoost).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..domain import Task
from ..errors import ValidationError, missing_extra
from .config import MODEL_TYPES, ModelConfig


@dataclass
class FittedModel:
    path: Path
    model_type: str
    predict: Callable[[np.ndarray], np.ndarray]  # (n, k) -> probabilities (n,) / (n, classes) / values
    importance: np.ndarray  # one value per feature (gain where the library has it)
    params: dict[str, Any] = field(default_factory=dict)
    best_iteration: int | None = None
    trust_pickle: bool = False


def class_weights(y: np.ndarray, k: int) -> np.ndarray:
    """Per-row weights ``n / (k * n_class)`` (balanced)."""
    codes = np.asarray(y).astype(np.int64)
    counts = np.bincount(codes, minlength=k).astype(np.float64)
    per_class = np.where(counts > 0, codes.shape[0] / (k * np.maximum(counts, 1.0)), 0.0)
    return np.asarray(per_class[codes], dtype=np.float64)


def fit_model(config: ModelConfig, task: Task, classes: tuple[str, ...], names: tuple[str, ...],
              x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray,
              out_dir: Path) -> FittedModel:
    if config.type not in MODEL_TYPES:  # the config refuses it first; kept for direct callers
        raise ValidationError(f"unknown model type {config.type!r}: supported are {', '.join(MODEL_TYPES)}",
                              details={"type": config.type, "supported": list(MODEL_TYPES)})
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = None
    if task is not Task.REGRESSION and config.class_weight == "balanced":
        weights = class_weights(y_train, len(classes))
    fit = {"lightgbm": _lightgbm, "xgboost": _xgboost, "random_forest": _random_forest}[config.type]
    return fit(config, task, classes, names, x_train, y_train, x_valid, y_valid, weights, out_dir)


def _lightgbm(config: ModelConfig, task: Task, classes: tuple[str, ...], names: tuple[str, ...],
              x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray,
              weights: np.ndarray | None, out_dir: Path) -> FittedModel:
    from ..runtimes import import_lightgbm

    lgb = import_lightgbm()
    params: dict[str, Any] = {
        "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 50, "feature_fraction": 0.9,
        "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0, "num_threads": 2,
        "deterministic": True, "force_row_wise": True, "seed": config.seed, "verbose": -1,
    }
    user = dict(config.params)
    rounds = int(user.pop("n_estimators", user.pop("num_boost_round", 200)))
    params.update(user)
    if task is Task.BINARY:
        params.update(objective="binary", metric="binary_logloss")
    elif task is Task.MULTICLASS:
        params.update(objective="multiclass", num_class=len(classes), metric="multi_logloss")
    else:
        params.update(objective="regression", metric="l2")
    train_set = lgb.Dataset(x_train, label=y_train, weight=weights, feature_name=list(names),
                            free_raw_data=True, params={"verbose": -1})
    callbacks = []
    valid_sets = []
    if x_valid.shape[0] and config.early_stopping_rounds:
        valid_sets = [lgb.Dataset(x_valid, label=y_valid, reference=train_set, free_raw_data=True)]
        callbacks.append(lgb.early_stopping(stopping_rounds=config.early_stopping_rounds, verbose=False))
    booster = lgb.train(params, train_set, num_boost_round=rounds, valid_sets=valid_sets or None,
                        callbacks=callbacks)
    best = int(booster.best_iteration or booster.current_iteration())
    path = out_dir / "model.txt"
    booster.save_model(str(path), num_iteration=best)
    importance = np.asarray(booster.feature_importance(importance_type="gain", iteration=best), dtype=np.float64)

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(booster.predict(x, num_iteration=best), dtype=np.float64)

    return FittedModel(path, "lightgbm", predict, importance, {**params, "num_boost_round": rounds}, best)


def _xgboost(config: ModelConfig, task: Task, classes: tuple[str, ...], names: tuple[str, ...],
             x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray,
             weights: np.ndarray | None, out_dir: Path) -> FittedModel:
    try:
        import xgboost as xgb
    except ImportError as exc:
        raise missing_extra("xgboost", "xgboost") from exc
    params: dict[str, Any] = {"eta": 0.05, "max_depth": 4, "subsample": 0.8, "min_child_weight": 5,
                              "nthread": 2, "seed": config.seed, "tree_method": "hist"}
    user = dict(config.params)
    rounds = int(user.pop("n_estimators", user.pop("num_boost_round", 200)))
    if "learning_rate" in user:
        params["eta"] = user.pop("learning_rate")
    params.update(user)
    if task is Task.BINARY:
        params.update(objective="binary:logistic", eval_metric="logloss")
    elif task is Task.MULTICLASS:
        params.update(objective="multi:softprob", num_class=len(classes), eval_metric="mlogloss")
    else:
        params.update(objective="reg:squarederror", eval_metric="rmse")
    train = xgb.DMatrix(x_train, label=y_train, weight=weights, feature_names=list(names))
    evals = []
    kwargs: dict[str, Any] = {}
    if x_valid.shape[0] and config.early_stopping_rounds:
        evals = [(xgb.DMatrix(x_valid, label=y_valid, feature_names=list(names)), "valid")]
        kwargs["early_stopping_rounds"] = config.early_stopping_rounds
    booster = xgb.train(params, train, num_boost_round=rounds, evals=evals, verbose_eval=False, **kwargs)
    best = getattr(booster, "best_iteration", None)
    if best is not None and evals:
        booster = booster[: int(best) + 1]
    path = out_dir / "model.json"
    booster.save_model(str(path))
    gains: dict[str, Any] = dict(booster.get_score(importance_type="gain"))
    importance = np.array([float(gains.get(n, 0.0)) for n in names])

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(booster.predict(xgb.DMatrix(x, feature_names=list(names))), dtype=np.float64)

    return FittedModel(path, "xgboost", predict, importance, {**params, "num_boost_round": rounds},
                       None if best is None else int(best) + 1)


def _random_forest(config: ModelConfig, task: Task, classes: tuple[str, ...], names: tuple[str, ...],
                   x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray,
                   weights: np.ndarray | None, out_dir: Path) -> FittedModel:
    try:
        from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    except ImportError as exc:
        raise missing_extra("scikit-learn", "sklearn") from exc
    params: dict[str, Any] = {"n_estimators": 200, "min_samples_leaf": 20, "max_features": "sqrt",
                              "n_jobs": 2, "random_state": config.seed}
    params.update(config.params)
    model: Any
    if task is Task.REGRESSION:
        model = RandomForestRegressor(**params)
        model.fit(x_train, y_train)
    else:
        model = RandomForestClassifier(**params)
        model.fit(x_train, y_train.astype(np.int64), sample_weight=weights)
        if len(model.classes_) != len(classes):
            raise ValidationError(f"the training part holds {len(model.classes_)} of the {len(classes)}"
                                  " classes: more data, or another split", details={"classes": list(classes)})
    try:
        import skops.io as sio
    except ImportError as exc:
        raise missing_extra("skops", "sklearn") from exc
    path = out_dir / "model.skops"
    sio.dump(model, path)
    importance = np.asarray(model.feature_importances_, dtype=np.float64)

    def predict(x: np.ndarray) -> np.ndarray:
        if task is Task.REGRESSION:
            return np.asarray(model.predict(x), dtype=np.float64)
        proba = np.asarray(model.predict_proba(x), dtype=np.float64)
        return proba[:, 1] if task is Task.BINARY else proba

    return FittedModel(path, "random_forest", predict, importance, params)
