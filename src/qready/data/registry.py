"""Dataset registry, the :class:`DatasetSplits` container, and deterministic data loaders."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from qready.registry import Registry

from ..checks import check_int

T = TypeVar("T")


@dataclass(frozen=True)
class DatasetSplits:
    """A train/test pair of datasets plus the metadata a model needs.

    Each item of ``train``/``test`` is ``(x, y)``: ``x`` a float32 tensor of shape ``input_shape``
    (no batch dim), ``y`` an int64 scalar class index in ``[0, num_classes)``. Unlabeled datasets
    (``images``, ``text``) have ``num_classes == 0`` and items holding the inputs only.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str


DATASETS: Registry[DatasetSplits] = Registry("dataset")
"""Dataset factories. Each is called as ``fn(*, root, seed, **options)`` and returns :class:`DatasetSplits`."""

# Keyword arguments every factory receives from ``load_dataset``; everything else is an option.
_COMMON = ("root", "seed")


def _allowed_options(name: str) -> list[str] | None:
    """Option names the factory for ``name`` accepts (``None``: it takes ``**kwargs``, anything goes)."""
    params = inspect.signature(DATASETS.get(name)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and p.name not in _COMMON
    ]


def split_seeded(items: Sequence[T], test_fraction: float, seed: int, what: str) -> tuple[list[T], list[T]]:
    """``(train, test)``: ``round(test_fraction * n)`` of ``items`` (at least 1, at most ``n - 1``) held
    out at random (seeded), each side in the original order. ``what`` names the items in errors."""
    if len(items) < 2:
        raise ValueError(f"a train/test split needs at least 2 {what}; found {len(items)}")
    n_test = min(len(items) - 1, max(1, round(test_fraction * len(items))))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in sorted(order[n_test:])], [items[i] for i in sorted(order[:n_test])]


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return DATASETS.names()


def load_dataset(
    name: str, *, root: str | os.PathLike[str] | None = None, seed: int = 0, **options: object
) -> DatasetSplits:
    """Build dataset ``name`` with its ``options``.

    ``root`` is the data directory (only datasets read from disk use it); ``seed`` (``0 <= seed < 2**32``)
    fixes every random choice (splits, generated samples). An unknown ``name`` raises the registry's
    ``KeyError`` listing valid names; an unknown or invalid option raises ``ValueError`` naming it.
    """
    allowed = _allowed_options(name)  # raises UnknownNameError for bad names
    if allowed is not None:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for dataset {name!r}; "
                f"allowed options: {', '.join(allowed) if allowed else '(none)'}"
            )
    seed = check_int("seed", seed, minimum=0)
    if seed >= 2**32:
        raise ValueError(f"option 'seed' must be < 2**32, got {seed}")
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"option 'root' must be a path or None, got {root!r}")
    return DATASETS.build(name, root=None if root is None else os.fspath(root), seed=seed, **options)


def _process_group_size() -> int:
    """Processes in the initialised ``torch.distributed`` group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def make_loaders(
    splits: DatasetSplits,
    batch_size: int,
    *,
    seed: int = 0,
    num_workers: int = 0,
    distributed: bool | None = None,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` yielding ``(x [B, *input_shape] float32, y [B] int64)``.

    The train loader reshuffles every epoch from a ``torch.Generator`` seeded with ``seed``, so the
    sequence of batches is the same for the same seed; the test loader keeps dataset order.

    ``distributed`` (default: whether a ``torch.distributed`` process group of more than one process
    is initialised, e.g. under ``torchrun``): the train loader draws from a ``DistributedSampler``
    (shuffled with ``seed`` and the epoch set by ``sampler.set_epoch``, which ``qready.train.fit``
    calls), so each of the W processes sees its own 1/W of every epoch. ``batch_size`` stays the
    *global* batch: each process loads ``batch_size / W`` samples per step (W must divide it). The
    test loader is not sharded.
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed)
    num_workers = check_int("num_workers", num_workers, minimum=0)
    if distributed is None:
        distributed = _process_group_size() > 1
    if not isinstance(distributed, bool):
        raise ValueError(f"option 'distributed' must be True, False or None; got {distributed!r}")
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        world = _process_group_size()
        if batch_size % world:
            raise ValueError(f"option 'batch_size' ({batch_size}, the global batch) must be divisible by the "
                             f"number of processes ({world})")
        sampler = DistributedSampler(splits.train, num_replicas=world, rank=dist.get_rank(), shuffle=True, seed=seed)
        train = DataLoader(splits.train, batch_size=batch_size // world, sampler=sampler, num_workers=num_workers)
    else:
        generator = torch.Generator()
        generator.manual_seed(seed)
        train = DataLoader(
            splits.train, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers
        )
    test = DataLoader(splits.test, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train, test
