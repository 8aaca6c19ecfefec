"""``mnist1d`` generated locally with ``make_dataset`` (never the downloading ``get_dataset``)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from qready.data import load_dataset

m1d = pytest.importorskip("mnist1d.data")


def _no_download(*args: object, **kwargs: object) -> None:
    raise AssertionError("mnist1d.data.get_dataset must not be called (it downloads)")


def test_shapes_and_no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m1d, "get_dataset", _no_download)
    splits = load_dataset("mnist1d", num_samples=600, seed=0)
    assert splits.input_shape == (1, 40) and splits.num_classes == 10 and splits.name == "mnist1d"
    assert len(splits.train) == 480 and len(splits.test) == 120
    x, y = splits.train.tensors
    assert x.shape == (480, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) <= set(range(10))
    assert abs(x.mean().item()) < 1e-4 and abs(x.std(unbiased=False).item() - 1) < 1e-4


def test_deterministic_and_keeps_global_rng(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m1d, "get_dataset", _no_download)
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    a = load_dataset("mnist1d", num_samples=100, seed=5)
    assert np.random.random() == expected  # global numpy RNG untouched
    b = load_dataset("mnist1d", num_samples=100, seed=5)
    c = load_dataset("mnist1d", num_samples=100, seed=6)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


@pytest.mark.parametrize("bad", [5, 0, 100.0])
def test_bad_num_samples(bad: object) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        load_dataset("mnist1d", num_samples=bad)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'qready\[data\]'"):
        load_dataset("mnist1d", num_samples=100)
