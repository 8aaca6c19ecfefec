"""``digits``: scikit-learn's 1,797 real 8x8 handwritten digit images (UCI optical digits test set)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..checks import check_float
from .registry import DATASETS, DatasetSplits

NUM_SAMPLES = 1797
NUM_CLASSES = 10


@DATASETS.register("digits")
def load_digits(*, root: str | None, seed: int, test_fraction: float = 0.2) -> DatasetSplits:
    """Digits as ``TensorDataset``s of ``x`` float32 ``[1, 8, 8]`` and ``y`` int64 in ``0..9``.

    Pixel counts (0..16) are divided by 16 to ``[0, 1]``, then standardized with the scalar mean/std of
    the train split. The split is stratified by class and fixed by ``seed``; ``test_fraction`` (in
    ``(0, 1)``) of the 1,797 images go to test. ``root`` is unused (the data ships with scikit-learn).
    """
    del root
    test_fraction = check_float("test_fraction", test_fraction, minimum=0.0, maximum=1.0, exclusive=True)
    n_test = math.ceil(test_fraction * NUM_SAMPLES)  # scikit-learn's rounding for a float test_size
    if n_test < NUM_CLASSES or NUM_SAMPLES - n_test < NUM_CLASSES:
        raise ValueError(
            f"option 'test_fraction'={test_fraction} leaves fewer than {NUM_CLASSES} samples in a split; "
            f"use a value in [{NUM_CLASSES / NUM_SAMPLES:.4f}, {1 - NUM_CLASSES / NUM_SAMPLES:.4f}]"
        )
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(
            f"the 'digits' dataset needs scikit-learn ({err}); install it with: pip install 'qready[data]'"
        ) from err

    bunch = sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    mean, std = float(x_train.mean()), float(x_train.std())
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return DatasetSplits(
        train=TensorDataset(torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(y_train)),
        test=TensorDataset(torch.from_numpy(np.ascontiguousarray(x_test)), torch.from_numpy(y_test)),
        num_classes=NUM_CLASSES,
        input_shape=(1, 8, 8),
        name="digits",
    )
