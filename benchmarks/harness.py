"""Shared benchmark plumbing: the command-line contract, timing, peak memory, records and tables.

Every script in ``benchmarks/`` runs as::

    python benchmarks/<name>.py --data-dir DIR --datasets a,b --splits 0,1 --out results.json [--quick]

and writes a JSON list of flat records, one per (dataset, split, method); see ``../shared/DESIGN.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"

# metric key -> (column title, lower is better?, format)
METRICS = {
    "rmse": ("RMSE", True, "{:.3f}"),
    "nll": ("NLL", True, "{:.3f}"),
    "coverage95": ("95% cov.", None, "{:.3f}"),
    "accuracy": ("accuracy", False, "{:.3f}"),
    "ece": ("ECE", True, "{:.3f}"),
    "ood_auroc": ("OOD AUROC", False, "{:.3f}"),
    "elbo": ("ELBO", False, "{:.3f}"),
    "logz_error": ("log Z error", None, "{:.3f}"),
    "logz_abs_error": ("abs. log Z error", True, "{:.3f}"),
    "mmd": ("MMD to reference", True, "{:.3f}"),
    "modes_recovered": ("modes >= 1%", False, "{:.0f}"),
    "mean_rel_error": ("max mean err. / sd", True, "{:.3f}"),
    "std_rel_error": ("max sd rel. err.", True, "{:.3f}"),
    "ess_bulk_min": ("min bulk ESS", False, "{:.0f}"),
    "ess_per_grad_min": ("min ESS / grad (weights)", False, "{:.2e}"),
    "ess_proj_per_grad_min": ("min ESS / grad (predictions)", False, "{:.2e}"),
    "ess_per_second_min": ("min ESS / s", False, "{:.3g}"),
    "rhat_max": ("max R-hat", True, "{:.3f}"),
    "rhat_weights_max": ("max R-hat (weights)", True, "{:.3f}"),
    "rhat_weights_chance_max": ("max R-hat of matched ideal chains (weights)", True, "{:.3f}"),
    "rhat_proj_max": ("max R-hat (predictions)", True, "{:.3f}"),
    "train_seconds": ("train s", True, "{:.1f}"),
    "seconds_per_step": ("s / step", True, "{:.4f}"),
    "seconds_per_epoch": ("s / epoch", True, "{:.3f}"),
    "peak_rss_mb": ("peak RSS MB", True, "{:.0f}"),
}


def parse_args(
    description: str,
    default_datasets: Sequence[str],
    default_splits: Sequence[int],
    quick_datasets: Sequence[str] | None = None,
    quick_splits: Sequence[int] | None = None,
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Parse the benchmark contract's arguments (plus any ``extra`` ones).

    ``--datasets`` and ``--splits`` default to the full run, or to the quick run with ``--quick``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR) if DEFAULT_DATA_DIR.is_dir() else None,
        help="directory in the layout of ../shared/data (default: ../shared/data when present)",
    )
    parser.add_argument("--datasets", default=None, help="comma-separated data set names")
    parser.add_argument("--splits", default=None, help="comma-separated split indices")
    parser.add_argument("--out", required=True, help="JSON file for the records")
    parser.add_argument("--quick", action="store_true", help="a run of a few minutes on 2 CPU cores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="also write a Markdown table here")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    # without ../shared/data, --data-dir stays None: runs on synthetic targets need none, and
    # load_uci names the missing directory when a UCI set is asked for
    datasets = quick_datasets if args.quick and quick_datasets is not None else default_datasets
    splits = quick_splits if args.quick and quick_splits is not None else default_splits
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else list(datasets)
    if not args.datasets:
        parser.error("--datasets names no data set")
    try:
        args.splits = [int(s) for s in args.splits.split(",") if s] if args.splits else list(splits)
    except ValueError:
        parser.error(f"--splits must be comma-separated integers, got {args.splits!r}")
    return args


def versions() -> dict[str, str]:
    import arviz
    import gpytorch
    import numpy
    import pyro
    import torch

    import pyro_gpx

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "gpytorch": gpytorch.__version__,
        "arviz": arviz.__version__,
        "numpy": numpy.__version__,
        "pyro_gpx": pyro_gpx.__version__,
        "threads": str(torch.get_num_threads()),
        "machine": f"{platform.machine()} x {os.cpu_count()} cores",
        "cpu": _cpu_model(),
    }


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux): timings, and e.g. the cost of float32 subnormals,
    differ between the hosts these machines land on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: fall back to the process-wide peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Measurement:
    """Wall time and peak resident memory of a block (RSS sampled every ``interval`` seconds)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.seconds = math.nan
        self.peak_rss_mb = math.nan
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss_mb = max(self.peak_rss_mb, _current_rss_mb())

    def __enter__(self) -> Measurement:
        self._stop = threading.Event()  # a fresh one: the object may be entered again
        self.peak_rss_mb = _current_rss_mb()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, _current_rss_mb())


@contextmanager
def measure():
    m = Measurement()
    with m:
        yield m


def record(benchmark: str, dataset: str, split: int, method: str, role: str, **metrics) -> dict:
    """One flat result record (the DESIGN.md benchmark contract)."""
    if role not in ("ours", "peer"):
        raise ValueError(f"role must be 'ours' or 'peer', got {role!r}")
    out = {"benchmark": benchmark, "dataset": dataset, "split": split, "method": method, "role": role}
    for key, value in metrics.items():
        out[key] = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    out.setdefault("versions", versions())
    return out


def _shown(metric: str, time_metric: str, rows: list[dict]) -> float:
    """The statistic a table cell shows: the median for times and peak memory, else the mean."""
    if metric in (time_metric, "peak_rss_mb"):
        values = _finite(r.get(metric) for r in rows)
        return statistics.median(values) if values else math.nan
    return mean_se(r.get(metric) for r in rows)[0]


def _json_safe(value):
    """Non-finite floats as ``null`` (``NaN`` is not JSON), recursively; other values unchanged."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(records: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(json.loads(json.dumps(records, default=float))), indent=1, allow_nan=False)
    path.write_text(text + "\n")


def _finite(values: Iterable) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_se(values: Iterable) -> tuple[float, float]:
    vals = _finite(values)
    if not vals:
        return math.nan, math.nan
    if len(vals) == 1:
        return vals[0], math.nan
    return statistics.fmean(vals), statistics.stdev(vals) / math.sqrt(len(vals))


def markdown_table(records: Sequence[dict], metrics: Sequence[str], time_metric: str = "train_seconds") -> str:
    """Mean ± standard error over splits per (dataset, method); the time and peak-memory columns show
    the median.

    The best value shown per data set (for metrics with a direction, time excepted) is bold. A cell
    with failed splits (NaN, or ``null`` in a reloaded file) shows the mean of the finite ones, says how
    many those are, and is never bold; so is a method that did not run on every split another method of
    its data set ran on (a crashed or partial run), which says how many it ran on.

    :raises ValueError: for two records of one (dataset, split, method).
    """
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    order: list[str] = []
    seen: set[tuple] = set()
    splits_of: dict[str, set] = defaultdict(set)
    for r in records:
        key = (r["dataset"], r["split"], r["method"])
        if key in seen:
            raise ValueError(f"two records of dataset {key[0]!r}, split {key[1]}, method {key[2]!r}")
        seen.add(key)
        splits_of[r["dataset"]].add(r["split"])
        groups[(r["dataset"], r["method"])].append(r)
        if r["dataset"] not in order:
            order.append(r["dataset"])
    header = ["dataset", "method", "splits"] + [METRICS.get(m, (m,))[0] for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset in order:
        methods = [m for (d, m) in groups if d == dataset]
        best = {}
        for metric in metrics:
            lower = METRICS.get(metric, (None, None))[1]
            # a method with a failed split (NaN / null) shows the mean of the rest, marked, and is never best
            complete = [
                m
                for m in methods
                if len(_finite(r.get(metric) for r in groups[(dataset, m)])) == len(splits_of[dataset])
            ]
            means = {m: _shown(metric, time_metric, groups[(dataset, m)]) for m in complete}
            means = {m: v for m, v in means.items() if math.isfinite(v)}
            if lower is not None and len(means) > 1 and metric != time_metric:
                best[metric] = (min if lower else max)(means, key=means.get)
        for method in methods:
            rows = groups[(dataset, method)]
            cells = [dataset, f"{method} ({rows[0]['role']})", str(len(rows))]
            for metric in metrics:
                fmt = METRICS.get(metric, (metric, None, "{:.3g}"))[2]
                values = _finite(r.get(metric) for r in rows)
                if not values:
                    cells.append("–")
                    continue
                if metric in (time_metric, "peak_rss_mb"):
                    text = fmt.format(statistics.median(values))
                else:
                    mean, se = mean_se(values)
                    text = fmt.format(mean) + ("" if math.isnan(se) else " ± " + fmt.format(se))
                if len(values) < len(rows):
                    text += f" ({len(values)} of {len(rows)} splits finite)"
                if len(rows) < len(splits_of[dataset]):
                    text += f" ({len(rows)} of {len(splits_of[dataset])} splits run)"
                cells.append(f"**{text}**" if best.get(metric) == method else text)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(records: Sequence[dict], metrics: Sequence[str], markdown: str | Path | None = None) -> str:
    """Print the Markdown table of ``records`` (and write it to ``markdown`` if given)."""
    table = markdown_table(records, metrics)
    print(table)
    if markdown:
        Path(markdown).write_text(table)
    return table
