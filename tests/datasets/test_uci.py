"""UCI loaders on tiny data sets written in both layouts (and on the real data when present)."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_gpx.datasets import Standardizer, list_uci, load_uci, num_splits

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _write_gal(root: Path, name="toy", n=12, n_splits=2):
    d = root / "uci-gal" / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = np.column_stack([rng.normal(size=(n, 3)), np.ones(n), rng.normal(size=n)])  # one constant column
    np.savetxt(d / "data.txt", data)
    with open(d / "data.txt", "a") as f:
        f.write("\n")  # a trailing blank line, as some real files have
    np.savetxt(d / "index_features.txt", [0, 1, 2, 3], fmt="%d")
    np.savetxt(d / "index_target.txt", [4], fmt="%d")
    np.savetxt(d / "n_splits.txt", [n_splits], fmt="%d")
    for k in range(n_splits):
        perm = np.random.default_rng(k).permutation(n)
        np.savetxt(d / f"index_train_{k}.txt", perm[:9], fmt="%d")
        np.savetxt(d / f"index_test_{k}.txt", perm[9:], fmt="%d")
    return data


def _write_large(root: Path, name="toy", n=20):
    d = root / "uci-large" / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = rng.normal(size=(n, 4)) * [1, 10, 100, 5] + [0, 1, 2, 3]
    mask = np.zeros((n, 10), dtype=int)
    for k in range(10):
        mask[rng.choice(n, 2, replace=False), k] = 1
    with gzip.open(d / "data.csv.gz", "wt") as f:
        np.savetxt(f, data, delimiter=",")
    with gzip.open(d / "test_mask.csv.gz", "wt") as f:
        np.savetxt(f, mask, delimiter=",", fmt="%d")
    return data, mask


def test_gal_layout(tmp_path):
    data = _write_gal(tmp_path)
    split = load_uci("toy", 1, tmp_path)
    assert split.layout == "uci-gal" and split.n_train == 9 and split.n_test == 3 and split.dim == 4
    train = np.loadtxt(tmp_path / "uci-gal/toy/index_train_1.txt").astype(int)
    test = np.loadtxt(tmp_path / "uci-gal/toy/index_test_1.txt").astype(int)
    torch.testing.assert_close(split.y_train_original, torch.as_tensor(data[train, 4]))
    torch.testing.assert_close(split.y_test_original, torch.as_tensor(data[test, 4]))
    # standardised with training statistics; the constant column maps to 0, not NaN
    torch.testing.assert_close(split.X_train[:, :3].mean(0), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(split.X_train[:, :3].std(0), torch.ones(3, dtype=torch.float64))
    assert (split.X_train[:, 3] == 0).all() and torch.isfinite(split.X_test).all()
    assert num_splits("toy", tmp_path) == 2


def test_large_layout_and_qualified_names(tmp_path):
    data, mask = _write_large(tmp_path)
    _write_gal(tmp_path)
    split = load_uci("uci-large/toy", 3, tmp_path, dtype=torch.float32)
    assert split.layout == "uci-large" and split.X_train.dtype == torch.float32
    assert split.n_test == mask[:, 3].sum() and split.n_train == len(data) - mask[:, 3].sum()
    np.testing.assert_allclose(split.y_test_original.numpy(), data[mask[:, 3] == 1, -1], rtol=1e-5)
    assert load_uci("uci-gal/toy", 0, tmp_path).layout == "uci-gal"
    assert set(list_uci(tmp_path)) == {"toy", "uci-gal/toy", "uci-large/toy"}
    # a layout directory or a data set directory works too
    assert load_uci("toy", 0, tmp_path / "uci-large").layout == "uci-large"
    assert load_uci("toy", 0, tmp_path / "uci-large" / "toy").layout == "uci-large"


def test_max_train_subsample_is_seeded(tmp_path):
    _write_large(tmp_path, n=40)
    a = load_uci("toy", 0, tmp_path, max_train=10, seed=3)
    b = load_uci("toy", 0, tmp_path, max_train=10, seed=3)
    assert a.n_train == 10
    torch.testing.assert_close(a.X_train, b.X_train)


def test_errors(tmp_path):
    _write_gal(tmp_path)
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_uci("toy", 0, tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*toy"):
        load_uci("nope", 0, tmp_path)
    with pytest.raises(ValueError, match="split 2 out of range"):
        load_uci("toy", 2, tmp_path)
    with pytest.raises(ValueError, match="data_dir is required"):
        load_uci("toy", 0)
    for bad in (1, 2.5):
        with pytest.raises(ValueError, match="max_train must be an integer >= 2"):
            load_uci("toy", 0, tmp_path, max_train=bad)
    for bad in (True, 1.0, "1"):  # True would read index_train_True.txt
        with pytest.raises(ValueError, match="split must be an integer"):
            load_uci("toy", bad, tmp_path)
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        load_uci("toy", 0, tmp_path, dtype=torch.int64)


def test_data_with_nan_is_refused_naming_the_rows(tmp_path):
    data = _write_gal(tmp_path)
    data[4, 1] = np.nan
    np.savetxt(tmp_path / "uci-gal/toy/data.txt", data)
    with pytest.raises(ValueError, match=r"'toy': the features of 1 rows contain NaN or inf \(first rows: \[4\]\)"):
        load_uci("toy", 0, tmp_path)


def test_standardizer_round_trip():
    x = torch.randn(50, 3, dtype=torch.float64) * 4 + 2
    s = Standardizer.fit(x)
    torch.testing.assert_close(s.inverse(s.transform(x)), x)
    torch.testing.assert_close(s.inverse_variance(torch.ones(3, dtype=torch.float64)), x.var(0))
    with pytest.raises(ValueError, match="n >= 2"):
        Standardizer.fit(torch.randn(1, 3))
    with pytest.raises(ValueError, match="x contains NaN"):
        Standardizer.fit(torch.tensor([1.0, float("nan"), 3.0]))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        Standardizer.fit(torch.arange(4))


@pytest.mark.parametrize(
    "mean, std, match",
    [
        (torch.tensor([float("nan")]), torch.ones(1), "mean"),
        (torch.zeros(1), torch.tensor([float("inf")]), "std"),
        (torch.zeros(1), torch.zeros(1), "std must be positive"),
        (torch.zeros(1), -torch.ones(1), "std must be positive"),
    ],
)
def test_standardizer_refuses_bad_statistics(mean, std, match):
    with pytest.raises(ValueError, match=match):
        Standardizer(mean, std)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_constant_column_with_a_rounding_spread_maps_to_zero(dtype):
    """0.1 is not a binary fraction: the computed std of a column of 0.1s is rounding noise (7.5e-9 in
    float32), which divided a test value 1e-4 away into 13 414 instead of about 1e-4."""
    x = torch.stack([torch.full((1000,), 0.1, dtype=dtype), torch.linspace(0, 1, 1000, dtype=dtype)], -1)
    s = Standardizer.fit(x)
    assert s.std[0] == 1
    torch.testing.assert_close(s.std[1], x[:, 1].std())
    assert s.transform(x)[:, 0].abs().max() < 1e-7
    assert abs(float(s.transform(torch.tensor([[0.1001, 0.5]], dtype=dtype))[0, 0]) - 1e-4) < 1e-6


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared UCI data not present")
@pytest.mark.parametrize("name, n_train, n_test, dim", [("concrete", 927, 103, 8), ("elevators", 14940, 1659, 18)])
def test_real_data(name, n_train, n_test, dim):
    split = load_uci(name, 0, SHARED)
    assert (split.n_train, split.n_test, split.dim) == (n_train, n_test, dim)
    assert torch.isfinite(split.X_train).all()


def test_a_data_file_rewritten_on_disk_is_read_again(tmp_path):
    """The reads were cached by directory alone: a data set fixed or regenerated in the same session kept
    returning the old values."""
    data = _write_gal(tmp_path)
    before = load_uci("toy", 0, tmp_path).y_train_original
    data[:, 4] += 100.0
    np.savetxt(tmp_path / "uci-gal/toy/data.txt", data)
    torch.testing.assert_close(load_uci("toy", 0, tmp_path).y_train_original, before + 100.0)
    data, mask = _write_large(tmp_path)
    before = load_uci("uci-large/toy", 0, tmp_path).y_train_original
    with gzip.open(tmp_path / "uci-large/toy/data.csv.gz", "wt") as f:
        np.savetxt(f, data + [0, 0, 0, 100], delimiter=",")
    torch.testing.assert_close(load_uci("uci-large/toy", 0, tmp_path).y_train_original, before + 100.0)


def _rewrite(path: Path, text: str) -> None:
    path.write_text(text)


@pytest.mark.parametrize(
    "file, text, match",
    [
        ("data.txt", "1 2 abc\n", "data.txt: not a readable table of numbers"),
        ("data.txt", "1 2 3\n4 5\n", "data.txt: not a readable table of numbers"),
        ("index_train_0.txt", "0\n1\n100\n", r"index_train_0.txt: training rows must lie in \[0, 12\), got \[100\]"),
        ("index_train_0.txt", "-1\n2\n3\n", r"index_train_0.txt: training rows must lie in \[0, 12\), got \[-1\]"),
        ("index_test_0.txt", "1.5\n2\n", "index_test_0.txt: test rows must be a column of integer indices"),
        ("index_features.txt", "0\n1\n9\n", r"index_features.txt: feature columns must lie in \[0, 5\)"),
        ("index_features.txt", "0\n1\n4\n", "index_target.txt: expected one target column, not among the features"),
        ("index_target.txt", "3\n4\n", "index_target.txt: expected one target column"),
        ("n_splits.txt", "abc\n", "n_splits.txt: not a readable table of numbers"),
    ],
)
def test_corrupt_gal_files_are_refused_naming_the_file(tmp_path, file, text, match):
    """They failed with NumPy's or Python's own errors naming neither the file nor the data set, or (a
    negative or fractional index, overlapping splits, the target among the features) loaded other rows
    or leaked the target, silently."""
    _write_gal(tmp_path)
    _rewrite(tmp_path / "uci-gal/toy" / file, text)
    with pytest.raises(ValueError, match=match):
        load_uci("toy", 0, tmp_path)


def test_overlapping_training_and_test_rows_are_refused(tmp_path):
    _write_gal(tmp_path)
    d = tmp_path / "uci-gal/toy"
    _rewrite(d / "index_test_0.txt", (d / "index_train_0.txt").read_text())
    with pytest.raises(ValueError, match="split 0's training and test rows overlap"):
        load_uci("toy", 0, tmp_path)


def test_corrupt_large_files_are_refused_naming_the_file(tmp_path):
    _, mask = _write_large(tmp_path)
    d = tmp_path / "uci-large/toy"
    (d / "data.csv.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="data.csv.gz: not a readable table of numbers"):
        load_uci("toy", 0, tmp_path)
    _write_large(tmp_path / "other")
    with gzip.open(tmp_path / "other/uci-large/toy/test_mask.csv.gz", "wt") as f:
        np.savetxt(f, 2 * mask, delimiter=",", fmt="%d")  # every row a test row, and no training rows left
    with pytest.raises(ValueError, match="test_mask.csv.gz: entries must be 0 or 1"):
        load_uci("toy", 0, tmp_path / "other")


def test_an_incomplete_data_set_fails_naming_the_missing_file(tmp_path):
    """A data set directory missing one of its layout's files was skipped: its name then loaded the other
    layout's data set of that name, silently, or was called unknown."""
    _write_gal(tmp_path)
    _write_large(tmp_path)
    (tmp_path / "uci-gal/toy/index_target.txt").unlink()
    with pytest.raises(FileNotFoundError, match="uci-gal/toy/index_target.txt"):
        load_uci("toy", 0, tmp_path)
    assert load_uci("uci-large/toy", 0, tmp_path).layout == "uci-large"
    (tmp_path / "uci-large/toy/data.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="uci-large/toy/data.csv.gz"):
        load_uci("uci-large/toy", 0, tmp_path)
