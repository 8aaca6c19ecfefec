"""The unlabeled ``images`` dataset and its crop helpers, on small PNG/JPEG files written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qready.data import load_dataset, make_loaders
from qready.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from qready.data.images import center_box, crop, image_tensor, random_box
from qready.data.registry import split_seeded

Image = pytest.importorskip("PIL.Image", reason="the images dataset decodes files with Pillow")

SIZE = 16


def write_photos(folder, n: int = 10) -> list[str]:
    """``n`` small images of different sizes and modes (RGB PNG, grey PNG, RGBA PNG, JPEG), two in a
    sub-folder, plus a non-image file that must be ignored."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    names = []
    for i in range(n):
        h, w = 20 + 3 * i, 40 - 2 * i
        mode, ext = [("RGB", "png"), ("L", "png"), ("RGBA", "png"), ("RGB", "jpg")][i % 4]
        shape = (h, w) if mode == "L" else (h, w, len(mode))
        name = f"{'sub/' if i < 2 else ''}photo{i:02d}.{ext}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / name)
        names.append(name)
    (folder / "notes.txt").write_text("not an image")
    return names


@pytest.fixture()
def photo_dir(tmp_path):
    write_photos(tmp_path / "photos")
    return tmp_path / "photos"


def test_splits_by_file_seeded_and_disjoint(photo_dir):
    a = load_dataset("images", root=photo_dir, seed=3, image_size=SIZE, test_fraction=0.3)
    b = load_dataset("images", root=photo_dir, seed=3, image_size=SIZE, test_fraction=0.3)
    c = load_dataset("images", root=photo_dir, seed=4, image_size=SIZE, test_fraction=0.3)
    assert a.train.files == b.train.files and a.test.files == b.test.files
    assert (a.train.files, a.test.files) != (c.train.files, c.test.files)
    assert len(a.test.files) == 3 and len(a.train.files) == 7
    assert not set(a.train.files) & set(a.test.files)
    assert len(set(a.train.files) | set(a.test.files)) == 10  # sub-folder included, notes.txt ignored
    assert a.num_classes == 0 and a.input_shape == (3, SIZE, SIZE) and a.name == "images"


def test_items_are_normalized_crops(photo_dir):
    splits = load_dataset("images", root=photo_dir, image_size=SIZE, crops_per_file=3, eval_crops_per_file=2)
    assert len(splits.train) == 3 * len(splits.train.files) and len(splits.test) == 2 * len(splits.test.files)
    x = splits.train[0]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    assert lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5


def test_train_crops_are_random_and_eval_crops_fixed(photo_dir):
    splits = load_dataset("images", root=photo_dir, image_size=SIZE, eval_crops_per_file=3)
    torch.manual_seed(0)
    first = splits.train[0]
    assert not torch.equal(first, splits.train[0])  # a fresh random crop on each access
    torch.manual_seed(0)
    assert torch.equal(first, splits.train[0])  # ... from torch's global RNG, so seeded runs repeat
    e0, e1 = splits.test[0], splits.test[1]
    assert torch.equal(e0, splits.test[0]) and torch.equal(e1, splits.test[1])
    assert not torch.equal(e0, e1)
    # crop 0 of a held-out file is its centre crop
    image = image_tensor(Image.open(splits.test.files[0]))
    torch.testing.assert_close(e0, crop(image, center_box(*image.shape[1:]), SIZE))


def test_loader_yields_tensor_batches(photo_dir):
    splits = load_dataset("images", root=photo_dir, image_size=SIZE, crops_per_file=2)
    train, test = make_loaders(splits, batch_size=4, seed=0)
    batch = next(iter(train))
    assert isinstance(batch, torch.Tensor) and batch.shape == (4, 3, SIZE, SIZE)
    assert next(iter(test)).shape[1:] == (3, SIZE, SIZE)


def test_image_tensor_modes():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    t = image_tensor(grey)
    assert t.shape == (3, 3, 4) and torch.equal(t[0], t[2]) and torch.equal(t[1], torch.from_numpy(grey))
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    assert image_tensor(rgba).shape == (3, 3, 4) and image_tensor(rgba).max() == 0
    assert torch.equal(image_tensor(Image.fromarray(grey)), t)
    with pytest.raises(ValueError, match="uint8"):
        image_tensor(grey.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        image_tensor(np.zeros((2, 3, 5), dtype=np.uint8))


@pytest.mark.parametrize(("h", "w", "min_scale"), [(30, 50, 0.25), (64, 64, 0.08), (10, 300, 0.5)])
def test_random_box_area_and_ratio(h, w, min_scale):
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, bh, bw = random_box(h, w, min_scale, g)
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w and bh > 0 and bw > 0
        if (bh, bw) != (h, w):
            assert 3 / 4 - 0.1 <= bw / bh <= 4 / 3 + 0.1
        if h / w == 1.0:  # every draw fits a square image, so the area fraction is as drawn
            assert min_scale - 0.05 <= bh * bw / (h * w) <= 1.0 + 1e-9


def test_random_box_falls_back_to_a_centred_box_for_extreme_shapes():
    top, left, bh, bw = random_box(4, 400, 0.9, torch.Generator().manual_seed(0))
    assert (bh, bw) == (4, 5) and left == (400 - 5) // 2 and top == 0


def test_center_box_and_identity_crop():
    assert center_box(100, 200) == (6, 56, 88, 88)
    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(crop(img, (0, 0, 8, 8), 8), (img.float() / 255 - mean) / std)
    flat = torch.full((3, 9, 9), 51, dtype=torch.uint8)
    torch.testing.assert_close(crop(flat, (1, 2, 5, 6), 4), ((0.2 - mean) / std).expand(3, 4, 4))


def test_split_files_bounds(tmp_path):
    files = [tmp_path / f"{i}.png" for i in range(3)]
    train, test = split_seeded(files, 0.99, seed=0, what="image files")
    assert len(test) == 2 and len(train) == 1
    train, test = split_seeded(files, 0.01, seed=0, what="image files")
    assert len(test) == 1 and len(train) == 2 and sorted(train + test) == files
    with pytest.raises(ValueError, match="at least 2 image files"):
        split_seeded(files[:1], 0.5, seed=0, what="image files")


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"image_size": 4}, "image_size"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"crops_per_file": 0}, "crops_per_file"),
        ({"eval_crops_per_file": 0}, "eval_crops_per_file"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"min_scale": 1.5}, "min_scale"),
        ({"labels": True}, "labels"),
    ],
)
def test_bad_options(photo_dir, options, needle):
    with pytest.raises(ValueError, match=needle):
        load_dataset("images", root=photo_dir, **options)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="root=DIR"):
        load_dataset("images")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_dataset("images", root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no files with extensions"):
        load_dataset("images", root=tmp_path / "empty")
