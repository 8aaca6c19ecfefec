"""``mnist1d``: the MNIST-1D procedurally generated 1-D digit signals (Greydanus, 2020).

The data are generated locally with ``mnist1d.data.make_dataset``; ``get_dataset`` (which downloads)
is never called.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..checks import check_int
from .registry import DATASETS, DatasetSplits

NUM_CLASSES = 10


@DATASETS.register("mnist1d")
def load_mnist1d(*, root: str | None, seed: int, num_samples: int = 5000) -> DatasetSplits:
    """MNIST-1D as ``TensorDataset``s of ``x`` float32 ``[1, 40]`` and ``y`` int64 in ``0..9``.

    ``num_samples`` (>= 10; rounded down to a multiple of 10, equal per class) signals are generated from
    ``seed`` and split 80/20 by the package's own train/test split. Inputs are standardized with the
    scalar mean/std of the train split. ``root`` is unused. The global ``random``/``numpy`` RNG states,
    which the generator reseeds, are restored afterwards.
    """
    del root
    num_samples = check_int("num_samples", num_samples, minimum=NUM_CLASSES)
    try:
        import mnist1d.data as m1d
    except ImportError as err:
        raise ImportError(
            f"the 'mnist1d' dataset needs the mnist1d package ({err}); install it with: pip install 'qready[data]'"
        ) from err

    args = m1d.get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = m1d.make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    x_train = np.asarray(data["x"], dtype=np.float32)
    x_test = np.asarray(data["x_test"], dtype=np.float32)
    mean, std = float(x_train.mean()), float(x_train.std())
    x_train = ((x_train - mean) / std)[:, None, :]
    x_test = ((x_test - mean) / std)[:, None, :]
    y_train = np.asarray(data["y"], dtype=np.int64)
    y_test = np.asarray(data["y_test"], dtype=np.int64)
    return DatasetSplits(
        train=TensorDataset(torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(y_train)),
        test=TensorDataset(torch.from_numpy(np.ascontiguousarray(x_test)), torch.from_numpy(y_test)),
        num_classes=NUM_CLASSES,
        input_shape=tuple(x_train.shape[1:]),
        name="mnist1d",
    )
