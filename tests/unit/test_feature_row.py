"""``fill_feature_row``: a caller's feature values in the model's order. Plain floats and ints take
a one-pass path; every other value goes through the checks; both must give the same row."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sigserve.engine import fill_feature_row
from sigserve.errors import FeatureValueMissing, ValidationError


@pytest.mark.parametrize("names", [(), ("a",), ("a", "b", "c")])
def test_plain_numbers_in_the_model_order(names: tuple[str, ...]) -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        values = {n: (float(rng.normal()) if rng.random() < 0.7 else int(rng.integers(-9, 9))) for n in names}
        values["ignored"] = "not read"
        out = np.full(len(names), -1.0)
        fill_feature_row(names, dict(reversed(list(values.items()))), out, "m:1")
        assert out.tolist() == [float(values[n]) for n in names]


def test_other_values_take_the_checked_path() -> None:
    out = np.empty(4)
    fill_feature_row(("a", "b", "c", "d"), {"a": np.float32(1.5), "b": np.int64(3), "c": None, "d": 2.0},
                     out, "m:1")
    assert out[0] == 1.5 and out[1] == 3.0 and math.isnan(out[2]) and out[3] == 2.0
    with pytest.raises(ValidationError):  # a bool is an int to Python, not a feature value here
        fill_feature_row(("a", "b"), {"a": 1.0, "b": False}, np.empty(2), "m:1")
    with pytest.raises(FeatureValueMissing) as missing:
        fill_feature_row(("a", "b"), {"a": 1.0}, np.empty(2), "m:1")
    assert missing.value.details["missing"] == ["b"]
    with pytest.raises(ValidationError) as bad:
        fill_feature_row(("a",), {"a": "1.0"}, np.empty(1), "m:1")  # text is refused, not parsed
    assert bad.value.details["not_numeric"] == {"a": "str"}
