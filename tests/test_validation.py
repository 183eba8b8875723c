"""The shared input checks."""

import numpy as np
import pytest
import torch

from pyro_gpx._validation import check_positive_int, check_positive_or_none, is_finite_at_least, is_integer


@pytest.mark.parametrize("value, expected", [(3, 3), (2.0, 2), (np.int64(4), 4), (torch.tensor(5), 5)])
def test_positive_integers_pass(value, expected):
    assert check_positive_int("n", value) == expected


@pytest.mark.parametrize("value", [0, -2, 2.5, float("nan"), float("inf"), True, "3", None, torch.tensor(1.5)])
def test_other_values_name_the_argument(value):
    with pytest.raises(ValueError, match="num_data must be a positive integer"):
        check_positive_int("num_data", value)


def test_finite_bounds():
    assert is_finite_at_least(0.5, 0.0, strict=True) and is_finite_at_least(0, 0.0)
    assert not any(is_finite_at_least(v, 0.0, strict=True) for v in (0.0, float("nan"), float("inf"), True, "x", None))


@pytest.mark.parametrize("value", [np.bool_(True), torch.tensor(True)])
def test_numpy_and_torch_booleans_are_not_counts(value):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        check_positive_int("n", value)
    assert not is_integer(value) and not is_finite_at_least(value, 0.0)


@pytest.mark.parametrize("value", [True, "1", float("nan"), 0.0])
def test_positive_or_none_names_the_argument(value):
    with pytest.raises(ValueError, match="jitter must be a positive number or None"):
        check_positive_or_none("jitter", value)
    check_positive_or_none("jitter", None)
    check_positive_or_none("jitter", 1e-6)
