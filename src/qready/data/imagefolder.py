"""``imagenet`` / ``imagefolder``: images on disk in one folder per class (the ImageNet layout).

Layout: ``ROOT/train/<class>/*.{jpg,jpeg,png,...}`` and ``ROOT/val/<class>/*``; classes are the sorted
folder names of ``train``. Images are decoded with Pillow (imported lazily), resized so the shorter side
is ``resize`` pixels, then cropped to ``image_size`` (random crop + horizontal flip in training with
``augment``, centre crop otherwise) and normalized with the ImageNet mean/std. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..checks import check_bool, check_int
from .registry import DATASETS, DatasetSplits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


def _pil_image():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow ships with matplotlib
        raise ImportError("image folders need Pillow: pip install pillow") from err
    return Image


def scan_folder(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """``(path, class index)`` for every image under ``split_dir/<class>/``, in sorted order."""
    samples = []
    for index, name in enumerate(classes):
        folder = split_dir / name
        if folder.is_dir():
            samples += [(p, index) for p in sorted(folder.iterdir()) if p.suffix.lower() in EXTENSIONS]
    return samples


class ImageFolderDataset(Dataset):
    """Decoded, resized, cropped, normalized images: items ``(x [3, S, S] float32, y int64)``."""

    def __init__(self, samples: list[tuple[Path, int]], image_size: int, resize: int, augment: bool) -> None:
        self.samples = samples
        self.image_size = image_size
        self.resize = resize
        self.augment = augment
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: Path) -> torch.Tensor:
        image = _pil_image().open(path).convert("RGB")
        w, h = image.size
        scale = self.resize / min(w, h)
        image = image.resize((max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return data.view(image.size[1], image.size[0], 3).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        img = self._load(path)
        _, h, w = img.shape
        s = self.image_size
        if self.augment:
            top = int(torch.randint(0, h - s + 1, ()))
            left = int(torch.randint(0, w - s + 1, ()))
        else:
            top, left = (h - s) // 2, (w - s) // 2
        img = img[:, top:top + s, left:left + s]
        if self.augment and bool(torch.rand(()) < 0.5):
            img = img.flip(-1)
        x = (img.float() / 255.0 - self.mean) / self.std
        return x, torch.tensor(label, dtype=torch.long)


def _load_folders(root: str | None, name: str, image_size: int, resize: int, augment: bool,
                  limit: int | None) -> DatasetSplits:
    if root is None:
        raise FileNotFoundError(f"dataset {name!r} reads images from disk: pass root=DIR holding train/ and val/ "
                                "with one sub-folder of images per class (the ImageNet layout)")
    base = Path(root)
    train_dir, val_dir = base / "train", base / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{name}: expected the folder {d} (layout: {base}/train/<class>/*.JPEG and "
                                    f"{base}/val/<class>/*.JPEG)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{name}: {train_dir} has no class sub-folders")
    train, test = scan_folder(train_dir, classes), scan_folder(val_dir, classes)
    if not train or not test:
        raise FileNotFoundError(f"{name}: no images with extensions {EXTENSIONS} under {train_dir} or {val_dir}")
    if limit is not None:
        train, test = train[:limit], test[:limit]
    return DatasetSplits(
        train=ImageFolderDataset(train, image_size, resize, augment),
        test=ImageFolderDataset(test, image_size, resize, False),
        num_classes=len(classes), input_shape=(3, image_size, image_size), name=name,
    )


def _options(image_size: int, resize: int | None, augment: bool, limit: int | None) -> tuple[int, int, bool, int | None]:
    image_size = check_int("image_size", image_size, minimum=8)
    resize = image_size * 8 // 7 if resize is None else check_int("resize", resize, minimum=image_size)
    augment = check_bool("augment", augment)
    limit = None if limit is None else check_int("limit", limit, minimum=1)
    return image_size, resize, augment, limit


@DATASETS.register("imagenet")
def imagenet(*, root: str | None = None, seed: int = 0, image_size: int = 224, resize: int | None = 256,
             augment: bool = True, limit: int | None = None) -> DatasetSplits:
    """ImageNet (ILSVRC-2012) from ``root/train`` and ``root/val`` class folders; 224×224 crops."""
    return _load_folders(root, "imagenet", *_options(image_size, resize, augment, limit))


@DATASETS.register("imagefolder")
def imagefolder(*, root: str | None = None, seed: int = 0, image_size: int = 224, resize: int | None = None,
                augment: bool = False, limit: int | None = None) -> DatasetSplits:
    """Any image-classification folder in the ImageNet layout (``resize`` defaults to 8/7 of ``image_size``)."""
    return _load_folders(root, "imagefolder", *_options(image_size, resize, augment, limit))
