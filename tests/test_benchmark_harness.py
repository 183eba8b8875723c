"""The benchmark harness's tables, arguments and measurements (the scripts themselves run outside CI)."""

import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "harness", Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"
)
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


def test_a_method_with_failed_splits_is_marked_and_never_best():
    """A's NLL [0.10, NaN, NaN] showed as '3 splits, **0.100**', the best, over B's complete 0.50."""
    records = [dict(dataset="d", split=s, method="A", role="ours", nll=v) for s, v in enumerate([0.1, math.nan, None])]
    records += [dict(dataset="d", split=s, method="B", role="peer", nll=v) for s, v in enumerate([0.5, 0.52, 0.48])]
    records += [dict(dataset="d", split=s, method="C", role="peer", nll=v) for s, v in enumerate([0.6, 0.6, 0.6])]
    lines = harness.markdown_table(records, ["nll"]).splitlines()
    assert lines[2] == "| d | A (ours) | 3 | 0.100 (1 of 3 splits finite) |"
    assert lines[3].endswith("| **0.500 ± 0.012** |")


def test_dataset_names_are_stripped_and_an_empty_list_refused():
    args = harness.parse_args("t", ["x"], [0], argv=["--out", "o.json", "--datasets", "a, b ,", "--splits", "0"])
    assert args.datasets == ["a", "b"]
    with pytest.raises(SystemExit):
        harness.parse_args("t", ["x"], [0], argv=["--out", "o.json", "--datasets", ","])


def test_a_measurement_can_be_entered_again():
    m = harness.Measurement(interval=0.001)
    for _ in range(2):
        with m:
            assert not m._stop.is_set()
        assert m.seconds >= 0 and m.peak_rss_mb > 0
