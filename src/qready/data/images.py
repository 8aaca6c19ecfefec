"""``images``: any folder of image files, no labels, with ImageNet preprocessing.

For label-free fine-tuning and calibration of a pretrained image model (e.g. distillation to its
float self): point ``root`` at a folder of photos (sub-folders are searched too; no class folders
needed). The files are split **by file** (seeded) into a fine-tuning set and a held-out evaluation set,
so crops of one photo never land on both sides. Items are input tensors ``[3, S, S]`` only (no
targets), normalized with the ImageNet mean/std:

* fine-tuning items are fresh **random-resized crops** on every access (area fraction uniform in
  ``[min_scale, 1]``, aspect ratio log-uniform in ``[3/4, 4/3]``; torch's global RNG, so seeded runs
  repeat), ``crops_per_file`` of them per file and epoch;
* evaluation items are **fixed**: crop 0 of each file is the centre crop (the central square of side
  ``0.875 * min(H, W)``, i.e. resize to ``S / 0.875`` and centre-crop ``S``), crops 1, 2, ... are random-resized
  crops drawn once from ``seed`` and the item's index.

Pillow is imported only when an image is read. The helpers :func:`image_tensor`, :func:`random_box`,
:func:`center_box` and :func:`crop` work on any ``[3, H, W]`` ``uint8`` image (e.g. from NumPy).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..checks import check_float, check_int
from .imagefolder import EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, _pil_image
from .registry import DATASETS, DatasetSplits, split_seeded

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels
CENTER_FRACTION = 0.875  # the usual 224/256 evaluation crop
RATIO = (3 / 4, 4 / 3)


def image_tensor(image: object) -> torch.Tensor:
    """An RGB ``uint8`` tensor ``[3, H, W]`` from a Pillow image or a NumPy array ``[H, W]`` (grey),
    ``[H, W, 3]`` or ``[H, W, 4]`` (alpha dropped). Grey images are repeated on the three channels."""
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB"))  # Pillow image
    if image.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8; got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image arrays must be [H, W], [H, W, 3] or [H, W, 4]; got shape {image.shape}")
    return torch.from_numpy(np.array(image[:, :, :3])).permute(2, 0, 1)  # a writable copy


def random_box(height: int, width: int, min_scale: float, generator: torch.Generator | None = None) -> Box:
    """A random-resized-crop box: area fraction ``U[min_scale, 1]``, aspect ratio log-uniform in
    ``[3/4, 4/3]``; after 10 rejected draws, the centred largest box of ratio within those bounds."""
    area = height * width
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (min_scale + (1.0 - min_scale) * u[0])
        ratio = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    ratio = min(max(width / height, RATIO[0]), RATIO[1])
    w, h = (width, round(width / ratio)) if width / height <= ratio else (round(height * ratio), height)
    return (height - h) // 2, (width - w) // 2, h, w


def center_box(height: int, width: int, fraction: float = CENTER_FRACTION) -> Box:
    """The centred square of side ``fraction * min(height, width)``."""
    side = max(1, round(fraction * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side


def crop(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """Cut ``box`` out of a ``uint8`` ``[3, H, W]`` image, resize it to ``[3, size, size]`` (bilinear,
    antialiased) and normalize with the ImageNet mean/std; float32."""
    top, left, h, w = box
    patch = image[:, top:top + h, left:left + w].float().div(255.0).unsqueeze(0)
    patch = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (patch[0].clamp(0.0, 1.0) - mean) / std


def read_image(path: Path) -> torch.Tensor:
    """The image file at ``path`` as an RGB ``uint8`` tensor ``[3, H, W]`` (decoded with Pillow)."""
    with _pil_image().open(path) as image:
        return image_tensor(image)


class UnlabeledImages(Dataset):
    """Crops of image files: ``len(files) * crops_per_file`` items, each a float32 ``[3, size, size]``.

    ``train=True``: random-resized crops drawn afresh on each access. ``train=False``: fixed crops
    (centre crop first, then random-resized crops seeded by ``seed`` and the item index).
    """

    def __init__(self, files: list[Path], size: int, crops_per_file: int, min_scale: float, train: bool,
                 seed: int = 0) -> None:
        self.files = files
        self.size = size
        self.crops_per_file = crops_per_file
        self.min_scale = min_scale
        self.train = train
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files) * self.crops_per_file

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} crops")
        file_index, crop_index = divmod(index, self.crops_per_file)
        image = read_image(self.files[file_index])
        _, h, w = image.shape
        if self.train:
            box = random_box(h, w, self.min_scale)
        elif crop_index == 0:
            box = center_box(h, w)
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            box = random_box(h, w, self.min_scale, generator)
        return crop(image, box, self.size)


def image_files(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively), sorted by path."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


@DATASETS.register("images")
def images(*, root: str | None = None, seed: int = 0, image_size: int = 224, test_fraction: float = 0.2,
           crops_per_file: int = 1, eval_crops_per_file: int = 1, min_scale: float = 0.25) -> DatasetSplits:
    """Unlabeled images from any folder (``root``), split by file; items are ``[3, S, S]`` tensors.

    Options: ``image_size`` (S, pixels), ``test_fraction`` (share of files held out, in (0, 1)),
    ``crops_per_file`` (random crops per file and epoch for fine-tuning), ``eval_crops_per_file`` (fixed
    crops per held-out file), ``min_scale`` (smallest crop area fraction, in (0, 1]).
    ``num_classes`` is 0: there are no labels.
    """
    if root is None:
        raise FileNotFoundError("dataset 'images' reads image files from disk: pass root=DIR (a folder of "
                                f"{', '.join(EXTENSIONS)} files; sub-folders are searched too)")
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"images: {folder} is not a folder")
    image_size = check_int("image_size", image_size, minimum=8)
    test_fraction = check_float("test_fraction", test_fraction, minimum=0.0, maximum=1.0, exclusive=True)
    crops_per_file = check_int("crops_per_file", crops_per_file, minimum=1)
    eval_crops_per_file = check_int("eval_crops_per_file", eval_crops_per_file, minimum=1)
    min_scale = check_float("min_scale", min_scale, minimum=0.0, maximum=1.0)
    if min_scale == 0.0:
        raise ValueError("option 'min_scale' must be in (0, 1], got 0.0")
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"images: no files with extensions {', '.join(EXTENSIONS)} under {folder}")
    train, test = split_seeded(files, test_fraction, seed, what="image files")
    return DatasetSplits(
        train=UnlabeledImages(train, image_size, crops_per_file, min_scale, train=True, seed=seed),
        test=UnlabeledImages(test, image_size, eval_crops_per_file, min_scale, train=False, seed=seed),
        num_classes=0, input_shape=(3, image_size, image_size), name="images",
    )
