"""Registry, option checking and deterministic loaders (uses the dependency-free ``synthetic`` set)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qready.data import DATASETS, DatasetSplits, list_datasets, load_dataset, make_loaders


def test_all_loaders_registered() -> None:
    assert {"digits", "mnist1d", "cifar10", "cifar100", "synthetic"} <= set(list_datasets())
    assert list_datasets() == DATASETS.names()


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(KeyError) as info:
        load_dataset("imagenet-9000")
    msg = str(info.value)
    assert "imagenet-9000" in msg
    for name in ("cifar10", "cifar100", "digits", "mnist1d", "synthetic"):
        assert name in msg


def test_unknown_option_names_option_and_allowed() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("synthetic", bogus=3)
    msg = str(info.value)
    assert "bogus" in msg
    for allowed in ("num_samples", "input_shape", "num_classes", "noise"):
        assert allowed in msg


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"num_samples": -1}, "num_samples"),
        ({"num_samples": 1.5}, "num_samples"),
        ({"num_classes": 1}, "num_classes"),
        ({"noise": -0.1}, "noise"),
        ({"input_shape": (1, 0, 8)}, "input_shape"),
        ({"input_shape": "1x8x8"}, "input_shape"),
    ],
)
def test_invalid_option_values(options: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        load_dataset("synthetic", **options)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.0, True])
def test_invalid_seed(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        load_dataset("synthetic", seed=seed)


def test_splits_are_frozen() -> None:
    splits = load_dataset("synthetic", num_samples=20)
    assert isinstance(splits, DatasetSplits)
    with pytest.raises(dataclasses.FrozenInstanceError):
        splits.num_classes = 3  # type: ignore[misc]


def _epoch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_make_loaders_deterministic_order() -> None:
    splits = load_dataset("synthetic", num_samples=200, seed=1)
    train_a, test_a = make_loaders(splits, batch_size=16, seed=7)
    train_b, _ = make_loaders(splits, batch_size=16, seed=7)
    train_c, _ = make_loaders(splits, batch_size=16, seed=8)

    xa1, ya1 = _epoch(train_a)
    xa2, _ = _epoch(train_a)
    xb1, yb1 = _epoch(train_b)
    xb2, _ = _epoch(train_b)
    xc1, _ = _epoch(train_c)
    assert torch.equal(xa1, xb1) and torch.equal(ya1, yb1)  # same seed -> same order
    assert torch.equal(xa2, xb2)  # ... also for the second epoch
    assert not torch.equal(xa1, xa2)  # reshuffled each epoch
    assert not torch.equal(xa1, xc1)  # different seed -> different order
    x_full, _ = splits.train.tensors
    assert not torch.equal(xa1, x_full)  # actually shuffled
    assert torch.equal(xa1.sort(0).values, x_full.sort(0).values)  # a permutation

    x_test, y_test = _epoch(test_a)  # test loader keeps dataset order
    assert torch.equal(x_test, splits.test.tensors[0]) and torch.equal(y_test, splits.test.tensors[1])
    batch_x, batch_y = next(iter(train_a))
    assert batch_x.shape == (16, 1, 8, 8) and batch_x.dtype == torch.float32
    assert batch_y.shape == (16,) and batch_y.dtype == torch.int64


@pytest.mark.parametrize("bad", [0, -4, 2.0])
def test_make_loaders_rejects_bad_batch_size(bad: object) -> None:
    splits = load_dataset("synthetic", num_samples=20)
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders(splits, batch_size=bad)  # type: ignore[arg-type]
