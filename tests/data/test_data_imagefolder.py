"""The ImageNet-layout folder reader, on tiny PNGs the test writes itself."""

import pytest
import torch
from PIL import Image

from qready.data import load_dataset, make_loaders


def _write_tree(root, classes=("cat", "dog"), per_class=3, size=(40, 30)):
    for split in ("train", "val"):
        for i, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                color = (200 * i, 10 * j, 255 - 100 * i)
                Image.new("RGB", size, color).save(folder / f"{j}.png")


def test_reads_folders_and_normalizes(tmp_path):
    _write_tree(tmp_path)
    splits = load_dataset("imagefolder", root=str(tmp_path), image_size=16)
    assert splits.num_classes == 2 and splits.input_shape == (3, 16, 16)
    assert len(splits.train) == 6 and len(splits.test) == 6
    x, y = splits.test[4]
    assert x.shape == (3, 16, 16) and int(y) == 1
    # a flat colour image normalizes to constant channels: (c/255 - mean) / std
    expected_red = (200 / 255 - 0.485) / 0.229  # class 1 ("dog") images are red=200
    assert torch.allclose(x[0], torch.full((16, 16), expected_red), atol=1e-5)
    train_loader, _ = make_loaders(splits, batch_size=4, seed=0)
    xb, yb = next(iter(train_loader))
    assert xb.shape == (4, 3, 16, 16) and yb.dtype == torch.long


def test_imagenet_defaults_and_limit(tmp_path):
    _write_tree(tmp_path, size=(300, 260))
    splits = load_dataset("imagenet", root=str(tmp_path), limit=2)
    assert splits.input_shape == (3, 224, 224) and len(splits.train) == 2
    assert splits.train[0][0].shape == (3, 224, 224)


def test_missing_layout_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="root=DIR"):
        load_dataset("imagenet")
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("imagenet", root=str(tmp_path))
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagefolder", root=str(tmp_path), image_size=2)
