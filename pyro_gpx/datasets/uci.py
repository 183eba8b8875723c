"""Loaders for the two UCI regression benchmark layouts.

``uci-gal``: the splits of Hernández-Lobato & Adams (2015) (``data.txt`` plus index files for
20 splits). ``uci-large``: the Yang et al. (2016) / GPyTorch-paper sets (``data.csv.gz`` with the
target last, ``test_mask.csv.gz`` with one 0/1 column per split). The caller gives the directory;
the package ships no data.

Inputs and targets are standardised with training-split statistics; the returned
:class:`RegressionSplit` keeps those statistics so metrics can be reported in original units.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._validation import is_integer
from .standardize import Standardizer

__all__ = ["LAYOUTS", "RegressionSplit", "list_uci", "load_uci", "num_splits", "resolve_dataset"]

LAYOUTS = ("uci-gal", "uci-large")


@dataclass(frozen=True)
class RegressionSplit:
    """One train/test split, standardised with the training statistics.

    :ivar X_train, y_train, X_test, y_test: standardised tensors (``y`` is 1-d).
    :ivar x_scaler, y_scaler: the training statistics.
    """

    name: str
    layout: str
    split: int
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    x_scaler: Standardizer
    y_scaler: Standardizer

    @property
    def n_train(self) -> int:
        return self.X_train.shape[0]

    @property
    def n_test(self) -> int:
        return self.X_test.shape[0]

    @property
    def dim(self) -> int:
        return self.X_train.shape[1]

    @property
    def y_test_original(self) -> torch.Tensor:
        return self.y_scaler.inverse(self.y_test)

    @property
    def y_train_original(self) -> torch.Tensor:
        return self.y_scaler.inverse(self.y_train)


_LAYOUT_FILES = {"uci-gal": ("data.txt", "index_target.txt"), "uci-large": ("data.csv.gz", "test_mask.csv.gz")}


def _layout_of(path: Path, partial: bool = False) -> str | None:
    """The layout whose files ``path`` holds; with ``partial``, also one of which it holds only some: its data
    set then fails to load naming the missing file, where skipping it let the same name load the other
    layout's data set, or called it unknown."""
    present = {layout: [(path / f).is_file() for f in files] for layout, files in _LAYOUT_FILES.items()}
    for layout, found in present.items():
        if all(found):
            return layout
    return next((layout for layout, found in present.items() if partial and any(found)), None)


def list_uci(data_dir: str | Path) -> dict[str, tuple[str, Path]]:
    """Data sets found under ``data_dir``: ``{name: (layout, path)}``.

    ``data_dir`` may be the root holding ``uci-gal/`` and ``uci-large/``, one layout directory,
    or a single data set's directory. Every data set is also listed qualified, as
    ``"uci-gal/<name>"`` or ``"uci-large/<name>"``.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {str(root)!r} is not a directory")
    found: dict[str, tuple[str, Path]] = {}
    layout = _layout_of(root)
    if layout:
        return {root.name: (layout, root)}
    candidates = [root] + [root / name for name in LAYOUTS if (root / name).is_dir()]
    for parent in candidates:
        for child in sorted(p for p in parent.iterdir() if p.is_dir()):
            layout = _layout_of(child, partial=True)
            if layout is None:
                continue
            found[f"{layout}/{child.name}"] = (layout, child)
            found.setdefault(child.name, (layout, child))
    return found


def resolve_dataset(name: str, data_dir: str | Path) -> tuple[str, Path]:
    """``(layout, path)`` of data set ``name`` under ``data_dir``; raises if unknown."""
    available = list_uci(data_dir)
    if name not in available:
        names = sorted(n for n in available if "/" not in n)
        raise ValueError(f"unknown dataset {name!r} under {str(data_dir)!r}; available: {names}")
    return available[name]


def _signature(path: Path, names: tuple[str, ...]) -> tuple:
    """Modification time and size of each of ``path``'s files ``names`` (``None`` where missing): a read
    is cached for these, so a file rewritten on disk is read again, not served from the cache."""
    out: list[tuple[int, int] | None] = []
    for name in names:
        try:
            stat = (path / name).stat()
        except OSError:
            out.append(None)
            continue
        out.append((stat.st_mtime_ns, stat.st_size))
    return tuple(out)


def _read_gal(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    names = ("data.txt", "index_features.txt", "index_target.txt", "n_splits.txt")
    return _read_gal_cached(path, _signature(path, names))


def _read_large(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _read_large_cached(path, _signature(path, ("data.csv.gz", "test_mask.csv.gz")))


def _read_numbers(file: Path, **kwargs) -> np.ndarray:
    """``np.loadtxt(file, **kwargs)``; a file that is not a table of numbers (or not gzip where its name says
    so) is refused naming it, where NumPy's and gzip's errors name neither the file nor the data set."""
    try:
        return np.loadtxt(file, **kwargs)
    except FileNotFoundError:  # NumPy's message names the file
        raise
    except (ValueError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{file}: not a readable table of numbers ({type(e).__name__}: {e})") from None


def _read_indices(file: Path, size: int, what: str) -> np.ndarray:
    """Row or column indices read from ``file``: integers in ``[0, size)`` (a negative index would count
    from the end and a fractional one be truncated, silently picking other rows)."""
    values = _read_numbers(file, ndmin=1)
    if values.ndim != 1 or not np.isfinite(values).all() or (values != np.round(values)).any():
        raise ValueError(f"{file}: {what} must be a column of integer indices")
    if ((values < 0) | (values >= size)).any():
        bad = values[(values < 0) | (values >= size)][:5].astype(int).tolist()
        raise ValueError(f"{file}: {what} must lie in [0, {size}), got {bad}")
    return values.astype(int)


@functools.lru_cache(maxsize=4)
def _read_gal_cached(path: Path, signature: tuple) -> tuple[np.ndarray, np.ndarray, int]:
    data = _read_numbers(path / "data.txt", ndmin=2)
    if data.shape[0] < 2 or data.shape[1] < 2:
        raise ValueError(f"{path / 'data.txt'}: expected rows of features and a target, got shape {data.shape}")
    features = _read_indices(path / "index_features.txt", data.shape[1], "feature columns")
    target = _read_indices(path / "index_target.txt", data.shape[1], "the target column")
    if target.shape != (1,) or target[0] in features:
        raise ValueError(
            f"{path / 'index_target.txt'}: expected one target column, not among the features, got {target.tolist()}"
        )
    n_splits = 20
    if (path / "n_splits.txt").is_file():
        value = _read_numbers(path / "n_splits.txt", ndmin=1)
        if value.shape != (1,) or not value[0] >= 1 or value[0] != int(value[0]):
            raise ValueError(f"{path / 'n_splits.txt'}: expected one positive integer, got {value.tolist()}")
        n_splits = int(value[0])
    return data[:, features], data[:, int(target[0])], n_splits


@functools.lru_cache(maxsize=4)
def _read_large_cached(path: Path, signature: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = _read_numbers(path / "data.csv.gz", delimiter=",", ndmin=2)
    if data.shape[0] < 2 or data.shape[1] < 2:
        raise ValueError(f"{path / 'data.csv.gz'}: expected rows of features and a target, got shape {data.shape}")
    mask = _read_numbers(path / "test_mask.csv.gz", delimiter=",", ndmin=2)
    if mask.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: test_mask has {mask.shape[0]} rows, data has {data.shape[0]}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{path / 'test_mask.csv.gz'}: entries must be 0 or 1 (1 marks a split's test rows)")
    return data[:, :-1], data[:, -1], mask.astype(bool)


def num_splits(name: str, data_dir: str | Path) -> int:
    """Number of train/test splits of a data set."""
    layout, path = resolve_dataset(name, data_dir)
    if layout == "uci-gal":
        return _read_gal(path)[2]
    return _read_large(path)[2].shape[1]


def load_uci(
    name: str,
    split: int = 0,
    data_dir: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    max_train: int | None = None,
    seed: int = 0,
) -> RegressionSplit:
    """Load split ``split`` of data set ``name`` from ``data_dir``, standardised.

    :param name: a data set directory name (``"concrete"``, ``"elevators"``), optionally qualified
        with its layout (``"uci-large/protein"``).
    :param split: the split index (0-based; :func:`num_splits` gives how many a data set has).
    :param data_dir: directory in either layout (see :func:`list_uci`).
    :param dtype: dtype of the returned tensors.
    :param max_train: if given, keep a random subset of at most this many training points.
    :param seed: seed of that subset.
    :raises FileNotFoundError: if ``data_dir`` or a file of the data set does not exist.
    :raises ValueError: for an unknown data set, a split out of range, data with NaN or inf, or a file
        that is not what its layout says (not numbers, indices out of range or not integers, training and
        test rows that overlap, a test mask that is not 0/1), naming the file.

    Example::

        >>> split = load_uci("concrete", split=0, data_dir="../shared/data")  # doctest: +SKIP
        >>> split.X_train.shape, split.y_test_original.mean()  # doctest: +SKIP
    """
    if data_dir is None:
        raise ValueError("data_dir is required: the directory holding the UCI data (e.g. ../shared/data)")
    if max_train is not None and (not is_integer(max_train) or max_train < 2):
        raise ValueError(
            f"max_train must be an integer >= 2 (standardising needs two points) or None, got {max_train!r}"
        )
    if not is_integer(split):
        raise ValueError(f"split must be an integer split index, got {split!r}")
    if not is_integer(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    split = int(split)
    layout, path = resolve_dataset(name, data_dir)
    if layout == "uci-gal":
        X, y, n_splits = _read_gal(path)
        if not 0 <= split < n_splits:
            raise ValueError(f"split {split} out of range for {name!r}: it has {n_splits} splits (0..{n_splits - 1})")
        train = _read_indices(path / f"index_train_{split}.txt", len(X), "training rows")
        test = _read_indices(path / f"index_test_{split}.txt", len(X), "test rows")
        shared = np.intersect1d(train, test)
        if shared.size:
            raise ValueError(
                f"{path}: split {split}'s training and test rows overlap (index_train_{split}.txt, "
                f"index_test_{split}.txt), e.g. row {int(shared[0])}"
            )
    else:
        X, y, mask = _read_large(path)
        if not 0 <= split < mask.shape[1]:
            raise ValueError(
                f"split {split} out of range for {name!r}: it has {mask.shape[1]} splits (0..{mask.shape[1] - 1})"
            )
        test = np.flatnonzero(mask[:, split])
        train = np.flatnonzero(~mask[:, split])
    for what, values in (("features", X), ("targets", y)):
        bad = ~np.isfinite(values).reshape(len(values), -1).all(-1)
        if bad.any():
            rows = np.flatnonzero(bad)
            first = rows[:5].tolist()
            raise ValueError(f"{name!r}: the {what} of {len(rows)} rows contain NaN or inf (first rows: {first})")
    if len(train) < 2:
        raise ValueError(f"{path}: split {split} has {len(train)} training rows; standardising needs two")
    if max_train is not None and len(train) > max_train:
        train = np.sort(np.random.default_rng(seed).choice(train, size=max_train, replace=False))
    X_train = torch.as_tensor(X[train], dtype=dtype)
    y_train = torch.as_tensor(y[train], dtype=dtype)
    X_test = torch.as_tensor(X[test], dtype=dtype)
    y_test = torch.as_tensor(y[test], dtype=dtype)
    x_scaler = Standardizer.fit(X_train)
    y_scaler = Standardizer.fit(y_train)
    return RegressionSplit(
        name=path.name,
        layout=layout,
        split=split,
        X_train=x_scaler.transform(X_train),
        y_train=y_scaler.transform(y_train),
        X_test=x_scaler.transform(X_test),
        y_test=y_scaler.transform(y_test),
        x_scaler=x_scaler,
        y_scaler=y_scaler,
    )
