"""Tiny learnable data and models for the training-loop tests (imported by the test modules)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int = 128, seed: int = 0) -> TensorDataset:
    """``n`` 4x4 inputs labelled by a fixed random linear map into 4 classes."""
    x = torch.randn(n, 4, 4, generator=torch.Generator().manual_seed(seed))
    w = torch.randn(16, 4, generator=torch.Generator().manual_seed(999))
    y = (x.flatten(1) @ w).argmax(dim=1)
    return TensorDataset(x, y)


def make_model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(16, 4)]
    if dropout:
        layers.insert(1, nn.Dropout(dropout))
    return nn.Sequential(*layers)


def make_loader(batch_size: int = 32, shuffle: bool = True, generator_seed: int | None = 123) -> DataLoader:
    g = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    return DataLoader(make_data(), batch_size=batch_size, shuffle=shuffle, generator=g)


class single_thread:  # noqa: N801 - used like a function
    """Context manager running torch on one CPU thread (tiny models; avoids oversubscription)."""

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)
