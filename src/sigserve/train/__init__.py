"""The training pipeline (``sigserve train``): config, labelled dataset, split, models, metrics,
plots, MLflow tracking and registration. Heavy libraries are imported where they are used."""

from .config import MODEL_TYPES, PipelineConfig, load_config, parse_config

__all__ = ["MODEL_TYPES", "PipelineConfig", "load_config", "parse_config"]
