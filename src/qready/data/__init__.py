"""Datasets for qready: a name -> loader registry plus deterministic train/test loaders.

>>> from qready.data import load_dataset, make_loaders
>>> splits = load_dataset("synthetic", seed=0)
>>> train_loader, test_loader = make_loaders(splits, batch_size=64, seed=0)
"""

from . import cifar, digits, imagefolder, images, mnist1d, synthetic, text  # noqa: F401  (import registers the loaders)
from .registry import DATASETS, DatasetSplits, list_datasets, load_dataset, make_loaders

__all__ = ["DATASETS", "DatasetSplits", "list_datasets", "load_dataset", "make_loaders"]
