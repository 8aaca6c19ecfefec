"""``digits`` (scikit-learn's real 8x8 digits)."""

from __future__ import annotations

import sys

import pytest
import torch

from qready.data import DatasetSplits, load_dataset

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits0() -> DatasetSplits:
    return load_dataset("digits", seed=0)


def test_sizes_shapes_labels(digits0: DatasetSplits) -> None:
    assert len(digits0.train) + len(digits0.test) == 1797
    assert len(digits0.test) == 360  # ceil(0.2 * 1797)
    assert digits0.input_shape == (1, 8, 8) and digits0.num_classes == 10 and digits0.name == "digits"
    for split in (digits0.train, digits0.test):
        x, y = split.tensors
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert set(y.tolist()) == set(range(10))  # stratified: every class in both splits
    x, y = digits0.train[0]
    assert x.shape == (1, 8, 8) and y.shape == ()


def test_standardized_with_train_stats(digits0: DatasetSplits) -> None:
    x = digits0.train.tensors[0]
    assert abs(x.mean().item()) < 1e-4
    assert abs(x.std(unbiased=False).item() - 1.0) < 1e-4


def test_deterministic_split(digits0: DatasetSplits) -> None:
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    assert torch.equal(digits0.train.tensors[0], again.train.tensors[0])
    assert torch.equal(digits0.test.tensors[1], again.test.tensors[1])
    assert not torch.equal(digits0.train.tensors[1], other.train.tensors[1])


def test_test_fraction_option() -> None:
    splits = load_dataset("digits", test_fraction=0.5)
    assert len(splits.test) == 899 and len(splits.train) == 898


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 0.001, "0.2"])
def test_bad_test_fraction(bad: object) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=bad)


def test_missing_sklearn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'qready\[data\]'"):
        load_dataset("digits")
