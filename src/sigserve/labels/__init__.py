"""Labels for training: forward-return targets, human annotations (windowed or BIO encodings),
programmatic candlestick-pattern labels, their merging, and dataset statistics."""

from .annotations import (
    MERGE_STRATEGIES,
    OUTSIDE,
    BioTags,
    Span,
    agreement_rate,
    bio_encode,
    bio_sequences,
    dataset_stats,
    load_annotations,
    merge_spans,
    parse_spans,
    windowed_examples,
)
from .targets import classify, forward_logret, target_name

__all__ = [
    "MERGE_STRATEGIES", "OUTSIDE", "BioTags", "Span", "agreement_rate", "bio_encode", "bio_sequences",
    "classify", "dataset_stats", "forward_logret", "load_annotations", "merge_spans", "parse_spans",
    "target_name", "windowed_examples",
]
