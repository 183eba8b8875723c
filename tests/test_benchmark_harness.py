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


def test_a_method_missing_splits_is_marked_and_never_best_and_duplicates_are_refused():
    """A [0.50, 0.60] was bold over B [0.55, 0.65, 2.0], which also ran the hard split; a repeated
    record counted as one more split."""
    records = [dict(dataset="d", split=s, method="A", role="ours", nll=v) for s, v in enumerate([0.5, 0.6])]
    records += [dict(dataset="d", split=s, method="B", role="peer", nll=v) for s, v in enumerate([0.55, 0.65, 2.0])]
    records += [dict(dataset="d", split=s, method="C", role="peer", nll=v) for s, v in enumerate([0.9, 0.9, 0.9])]
    lines = harness.markdown_table(records, ["nll"]).splitlines()
    assert lines[2] == "| d | A (ours) | 2 | 0.550 ± 0.050 (2 of 3 splits run) |"
    assert lines[4] == "| d | C (peer) | 3 | **0.900 ± 0.000** |"
    with pytest.raises(ValueError, match="two records of dataset 'd', split 1, method 'A'"):
        harness.markdown_table(records + [records[1]], ["nll"])


def test_records_name_the_cpu():
    # hosts differ (e.g. the cost of float32 subnormals): the records say which CPU ran them
    cpu = harness.versions()["cpu"]
    assert isinstance(cpu, str) and cpu.strip()
