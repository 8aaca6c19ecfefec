"""``synthetic``: Gaussian-cluster classification data for tests and smoke runs (no files, no deps)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from ..checks import check_float, check_int, check_shape
from .registry import DATASETS, DatasetSplits


@DATASETS.register("synthetic")
def load_synthetic(
    *,
    root: str | None,
    seed: int,
    num_samples: int = 512,
    input_shape: tuple[int, ...] = (1, 8, 8),
    num_classes: int = 4,
    noise: float = 0.5,
) -> DatasetSplits:
    """Gaussian clusters as ``TensorDataset``s of ``x`` float32 ``input_shape`` and ``y`` int64.

    Each class ``c`` has a mean ``mu_c ~ N(0, I)`` over the flattened input; a sample is
    ``mu_y + noise * N(0, I)`` (``noise`` is the per-feature std, unitless), so the classes are linearly
    separable for small ``noise``. Labels are balanced (``i % num_classes``, shuffled). ``num_samples``
    is the total; the last ``num_samples // 5`` go to test. Everything is fixed by ``seed``; ``root`` is unused.
    """
    del root
    num_samples = check_int("num_samples", num_samples, minimum=5)
    input_shape = check_shape("input_shape", input_shape)
    num_classes = check_int("num_classes", num_classes, minimum=2)
    noise = check_float("noise", noise, minimum=0.0)

    gen = torch.Generator()
    gen.manual_seed(seed)
    dim = math.prod(input_shape)
    means = torch.randn(num_classes, dim, generator=gen)
    y = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=gen)]
    x = means[y] + noise * torch.randn(num_samples, dim, generator=gen)
    x = x.reshape(num_samples, *input_shape).float()

    n_train = num_samples - num_samples // 5
    return DatasetSplits(
        train=TensorDataset(x[:n_train].clone(), y[:n_train].clone()),
        test=TensorDataset(x[n_train:].clone(), y[n_train:].clone()),
        num_classes=num_classes,
        input_shape=input_shape,
        name="synthetic",
    )
