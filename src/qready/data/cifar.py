"""``cifar10`` / ``cifar100``: read the CIFAR "python version" pickle batches from a local directory.

Nothing is downloaded. The batches are pickles, so they are read with :class:`SafeUnpickler`, which only
resolves the few globals that numpy-array pickles need and refuses everything else.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..checks import check_bool, check_choice, check_int
from .registry import DATASETS, DatasetSplits

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

# Per-channel (R, G, B) mean / std of the train images scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

IMAGE_SHAPE = (3, 32, 32)


# ----------------------------------------------------------------------------- restricted unpickling


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` (how Python 3 writes ``bytes`` at pickle protocol <= 2), latin-1 only."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r} (only latin1)")
    return text.encode("latin-1", errors)


def _np_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _np_frombuffer() -> Callable[..., Any]:
    try:
        from numpy._core.numeric import _frombuffer  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _builtin_bytes() -> Callable[..., Any]:
    return bytes


# (module, name) -> resolver. ``__builtin__`` is the Python 2 spelling (fix_imports happens in the
# default ``find_class``, which we replace). ``_frombuffer`` is what numpy writes at pickle protocol 5.
_SAFE_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
    ("builtins", "bytes"): _builtin_bytes,
    ("__builtin__", "bytes"): _builtin_bytes,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed to rebuild dicts/lists of numpy arrays.

    Any other global (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError`` naming it,
    before it can be called.
    """

    def find_class(self, module: str, name: str) -> Any:
        resolver = _SAFE_GLOBALS.get((module, name))
        if resolver is None:
            raise pickle.UnpicklingError(
                f"refusing to load forbidden global '{module}.{name}' from a CIFAR batch file; only numpy "
                "array reconstruction is allowed (is this really a CIFAR 'python version' batch?)"
            )
        return resolver()


def load_batch(path: str | Path) -> dict[Any, Any]:
    """Read one CIFAR batch pickle with :class:`SafeUnpickler` (``encoding="bytes"``); returns its dict."""
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{path}: not a readable CIFAR batch pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict in a CIFAR batch file, got {type(obj).__name__}")
    return obj


def _field(batch: dict[Any, Any], key: str, path: Path) -> Any:
    for k in (key.encode(), key):  # original files have bytes keys; tolerate re-pickled str keys
        if k in batch:
            return batch[k]
    raise ValueError(f"{path}: CIFAR batch has no {key!r} entry (keys: {sorted(map(repr, batch))})")


def _read_images_labels(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 3, 32, 32], labels int64 [N])`` from one batch file."""
    batch = load_batch(path)
    data = _field(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape [N, 3072], got {desc}")
    labels = np.asarray(_field(batch, label_key, path), dtype=np.int64).reshape(-1)
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} {label_key!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: {label_key!r} outside [0, {num_classes})")
    return data.reshape(-1, *IMAGE_SHAPE), labels


# ----------------------------------------------------------------------------- locating files


def _find_dir(root: str | None, subdir: str, files: Sequence[str], archive: str, dataset: str) -> Path:
    """The directory holding all ``files``: ``root`` itself or ``root/subdir``; else a helpful error."""
    if root is None:
        raise FileNotFoundError(
            f"dataset {dataset!r} is read from local files and needs root=DIR: download {archive} from "
            f"{CIFAR_URL} and extract it into DIR so that DIR/{subdir}/{files[0]} exists "
            f"(expected files: {', '.join(files)}), then pass root=DIR"
        )
    base = Path(root).expanduser()
    for cand in (base, base / subdir):
        if all((cand / f).is_file() for f in files):
            return cand
    where = base / subdir if (base / subdir).is_dir() else base
    missing = [f for f in files if not (where / f).is_file()]
    state = "" if base.is_dir() else f" (directory {base} does not exist)"
    raise FileNotFoundError(
        f"dataset {dataset!r}: missing {', '.join(missing)} in {where}{state}. Expected "
        f"{', '.join(files)} in {base / subdir} (or directly in {base}). Download {archive} from "
        f"{CIFAR_URL} and extract it into {base} so that {base / subdir / files[0]} exists."
    )


# ----------------------------------------------------------------------------- dataset + augmentation


def random_crop_flip(
    x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random ``H x W`` crop of ``x`` ``[C, H, W]`` zero-padded by ``padding`` px, then a 50% horizontal flip."""
    _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    out = padded[:, top : top + h, left : left + w]
    if torch.rand((), generator=generator).item() < 0.5:
        out = out.flip(-1)
    return out.contiguous()


class CifarDataset(Dataset):
    """CIFAR images kept as uint8; items are ``(x float32 [3, 32, 32], y int64 scalar)``.

    ``x`` is scaled to ``[0, 1]``, optionally augmented (:func:`random_crop_flip`, padding in the raw
    image, i.e. black), then normalized per channel: ``(x - mean) / std``. Augmentation draws from torch's
    global RNG (per-worker seeded by ``DataLoader`` when ``num_workers > 0``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"images must be uint8 [N, 3, 32, 32], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index].float().div_(255.0)
        if self.augment:
            x = random_crop_flip(x)
        return (x - self.mean) / self.std, self.labels[index]


def _check_limit(limit: object) -> int | None:
    return None if limit is None else check_int("limit", limit, minimum=1)


def _load_files(
    folder: Path, files: Sequence[str], label_key: str, num_classes: int, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate batches in order, reading only as many files as ``limit`` needs."""
    images, labels, count = [], [], 0
    for name in files:
        x, y = _read_images_labels(folder / name, label_key, num_classes)
        images.append(x)
        labels.append(y)
        count += len(y)
        if limit is not None and count >= limit:
            break
    x_all = np.concatenate(images)[:limit]
    y_all = np.concatenate(labels)[:limit]
    return torch.from_numpy(np.ascontiguousarray(x_all)), torch.from_numpy(np.ascontiguousarray(y_all))


def _build(
    folder: Path,
    train_files: Sequence[str],
    test_files: Sequence[str],
    label_key: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
    limit: int | None,
    name: str,
) -> DatasetSplits:
    x_tr, y_tr = _load_files(folder, train_files, label_key, num_classes, limit)
    x_te, y_te = _load_files(folder, test_files, label_key, num_classes, limit)
    return DatasetSplits(
        train=CifarDataset(x_tr, y_tr, mean, std, augment=augment),
        test=CifarDataset(x_te, y_te, mean, std, augment=False),
        num_classes=num_classes,
        input_shape=IMAGE_SHAPE,
        name=name,
    )


CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)


@DATASETS.register("cifar10")
def load_cifar10(
    *, root: str | None, seed: int, augment: bool = False, limit: int | None = None
) -> DatasetSplits:
    """CIFAR-10 (50,000 train / 10,000 test, 10 classes) from ``root`` or ``root/cifar-10-batches-py``.

    Items are ``(x float32 [3, 32, 32], y int64)``, normalized with the standard CIFAR-10 per-channel
    mean/std. ``augment`` adds random crop (4 px padding) + horizontal flip to the train split only;
    ``limit`` keeps the first N samples of each split. ``seed`` is unused (file order is fixed).
    """
    del seed
    augment = check_bool("augment", augment)
    limit = _check_limit(limit)
    files = CIFAR10_TRAIN + CIFAR10_TEST
    folder = _find_dir(root, "cifar-10-batches-py", files, "cifar-10-python.tar.gz", "cifar10")
    return _build(
        folder,
        CIFAR10_TRAIN,
        CIFAR10_TEST,
        "labels",
        10,
        CIFAR10_MEAN,
        CIFAR10_STD,
        augment,
        limit,
        "cifar10",
    )


@DATASETS.register("cifar100")
def load_cifar100(
    *,
    root: str | None,
    seed: int,
    label: str = "fine",
    augment: bool = False,
    limit: int | None = None,
) -> DatasetSplits:
    """CIFAR-100 (50,000 train / 10,000 test) from ``root`` or ``root/cifar-100-python``.

    ``label="fine"`` gives 100 classes, ``"coarse"`` the 20 superclasses. Items are
    ``(x float32 [3, 32, 32], y int64)``, normalized with the standard CIFAR-100 per-channel mean/std.
    ``augment`` / ``limit`` as for ``cifar10``; ``seed`` is unused.
    """
    del seed
    label = check_choice("label", label, ("fine", "coarse"))
    augment = check_bool("augment", augment)
    limit = _check_limit(limit)
    num_classes = 100 if label == "fine" else 20
    folder = _find_dir(root, "cifar-100-python", ("train", "test"), "cifar-100-python.tar.gz", "cifar100")
    return _build(
        folder,
        ("train",),
        ("test",),
        f"{label}_labels",
        num_classes,
        CIFAR100_MEAN,
        CIFAR100_STD,
        augment,
        limit,
        "cifar100",
    )
