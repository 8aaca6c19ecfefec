"""CIFAR readers on small fake batch files, root layouts, error messages and the safe unpickler."""

from __future__ import annotations

import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qready.data import load_dataset
from qready.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    load_batch,
    random_crop_flip,
)

PER_BATCH = 10


def _write(path: Path, obj: object, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def make_cifar10(folder: Path, protocol: int = 2) -> dict[str, dict]:
    """Write fake cifar-10 batches (bytes keys, like the originals) into ``folder``; return them."""
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"data": _images(rng, PER_BATCH),
            b"labels": rng.integers(0, 10, PER_BATCH).tolist(),
            b"filenames": [f"img{i}.png".encode() for i in range(PER_BATCH)],
        }
        _write(folder / name, batch, protocol)
        batches[name] = batch
    return batches


def make_cifar100(folder: Path, protocol: int = 2) -> dict[str, dict]:
    rng = np.random.default_rng(1)
    batches = {}
    for name in ("train", "test"):
        batch = {
            b"data": _images(rng, PER_BATCH),
            b"fine_labels": rng.integers(0, 100, PER_BATCH).tolist(),
            b"coarse_labels": rng.integers(0, 20, PER_BATCH).tolist(),
        }
        _write(folder / name, batch, protocol)
        batches[name] = batch
    return batches


def _expected(raw: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    x = torch.from_numpy(raw.reshape(3, 32, 32)).float() / 255
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ----------------------------------------------------------------------------- cifar10


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("layout", ["folder", "parent"])
def test_cifar10_reads_both_layouts(tmp_path: Path, layout: str, protocol: int) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    batches = make_cifar10(folder, protocol)
    root = folder if layout == "folder" else tmp_path
    splits = load_dataset("cifar10", root=root)
    assert splits.name == "cifar10" and splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    assert len(splits.train) == 5 * PER_BATCH and len(splits.test) == PER_BATCH

    x, y = splits.train[PER_BATCH + 3]  # 4th image of data_batch_2
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, _expected(batches["data_batch_2"][b"data"][3], CIFAR10_MEAN, CIFAR10_STD))
    assert y.item() == batches["data_batch_2"][b"labels"][3]
    x, y = splits.test[7]
    torch.testing.assert_close(x, _expected(batches["test_batch"][b"data"][7], CIFAR10_MEAN, CIFAR10_STD))
    assert y.item() == batches["test_batch"][b"labels"][7]


def test_cifar10_limit_and_str_keys(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    splits = load_dataset("cifar10", root=str(tmp_path), limit=13)
    assert len(splits.train) == 13 and len(splits.test) == PER_BATCH
    splits = load_dataset("cifar10", root=tmp_path, limit=4)
    assert len(splits.train) == 4 and len(splits.test) == 4

    # a batch re-pickled in Python 3 with str keys is accepted too
    rng = np.random.default_rng(5)
    _write(tmp_path / "test_batch", {"data": _images(rng, 3), "labels": [1, 2, 3]}, protocol=4)
    assert load_dataset("cifar10", root=tmp_path).test[2][1].item() == 3


def test_cifar10_augment_train_only(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    plain = load_dataset("cifar10", root=tmp_path)
    aug = load_dataset("cifar10", root=tmp_path, augment=True)
    torch.manual_seed(0)
    xs = torch.stack([aug.train[0][0] for _ in range(20)])
    assert xs.shape == (20, 3, 32, 32)
    assert not all(torch.equal(xs[0], x) for x in xs[1:])  # random
    assert torch.equal(aug.test[0][0], plain.test[0][0])  # test split never augmented
    assert not torch.equal(xs[0], plain.train[0][0]) or not torch.equal(xs[1], plain.train[0][0])


@pytest.mark.parametrize(
    ("options", "word"),
    [({"label": "fine"}, "label"), ({"limit": 0}, "limit"), ({"augment": "yes"}, "augment")],
)
def test_cifar10_bad_options(tmp_path: Path, options: dict, word: str) -> None:
    make_cifar10(tmp_path)
    with pytest.raises(ValueError, match=word) as info:
        load_dataset("cifar10", root=tmp_path, **options)
    if word == "label":
        assert "augment" in str(info.value) and "limit" in str(info.value)


def test_cifar10_rejects_malformed_batch(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    _write(tmp_path / "data_batch_1", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match="3072"):
        load_dataset("cifar10", root=tmp_path)
    _write(tmp_path / "data_batch_1", [1, 2, 3])
    with pytest.raises(ValueError, match="dict"):
        load_dataset("cifar10", root=tmp_path)
    _write(tmp_path / "data_batch_1", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(ValueError, match="labels"):
        load_dataset("cifar10", root=tmp_path)


# ----------------------------------------------------------------------------- cifar100


@pytest.mark.parametrize("layout", ["folder", "parent"])
@pytest.mark.parametrize(("label", "num_classes"), [("fine", 100), ("coarse", 20)])
def test_cifar100(tmp_path: Path, layout: str, label: str, num_classes: int) -> None:
    folder = tmp_path / "cifar-100-python"
    batches = make_cifar100(folder)
    splits = load_dataset("cifar100", root=folder if layout == "folder" else tmp_path, label=label)
    assert splits.num_classes == num_classes and splits.name == "cifar100"
    assert len(splits.train) == PER_BATCH and len(splits.test) == PER_BATCH
    key = f"{label}_labels".encode()
    for split, name in ((splits.train, "train"), (splits.test, "test")):
        x, y = split[5]
        torch.testing.assert_close(x, _expected(batches[name][b"data"][5], CIFAR100_MEAN, CIFAR100_STD))
        assert y.item() == batches[name][key][5]


def test_cifar100_bad_label(tmp_path: Path) -> None:
    make_cifar100(tmp_path)
    with pytest.raises(ValueError, match="label.*'fine', 'coarse'"):
        load_dataset("cifar100", root=tmp_path, label="medium")


# ----------------------------------------------------------------------------- missing files


def test_missing_root_none() -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10")
    msg = str(info.value)
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py/data_batch_1" in msg and "root" in msg


def test_missing_directory_message(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", root=root)
    msg = str(info.value)
    assert "data_batch_1" in msg and "test_batch" in msg and str(root) in msg
    assert str(root / "cifar-10-batches-py" / "data_batch_1") in msg

    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar100", root=root)
    msg = str(info.value)
    assert "cifar-100-python.tar.gz" in msg and str(root / "cifar-100-python" / "train") in msg


def test_partially_missing_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3 in") as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(folder) in str(info.value)


# ----------------------------------------------------------------------------- safe unpickling


class _SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class _EvalCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_SystemCall, _EvalCall])
@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_refused(tmp_path: Path, payload: type, nested: bool) -> None:
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = payload(marker)
    obj = {b"data": evil, b"labels": [0]} if nested else evil
    _write(tmp_path / "data_batch_1", obj)
    with pytest.raises(pickle.UnpicklingError, match="forbidden global .*(system|eval)"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        load_batch(tmp_path / "data_batch_1")
    assert not marker.exists()


def test_codecs_encode_only_latin1(tmp_path: Path) -> None:
    import _codecs

    class Rot13:
        def __reduce__(self) -> tuple:
            return (_codecs.encode, ("abc", "rot13"))

    _write(tmp_path / "evil", {b"x": Rot13()})
    with pytest.raises(pickle.UnpicklingError, match="latin1"):
        load_batch(tmp_path / "evil")


# ----------------------------------------------------------------------------- augmentation


@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    pad=st.integers(0, 5),
    seed=st.integers(0, 1000),
)
def test_random_crop_flip_is_a_shifted_window(c: int, h: int, w: int, pad: int, seed: int) -> None:
    x = torch.arange(1, c * h * w + 1, dtype=torch.float32).view(c, h, w)
    gen = torch.Generator().manual_seed(seed)
    out = random_crop_flip(x, padding=pad, generator=gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    windows = [padded[:, i : i + h, j : j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    assert any(torch.equal(out, win) or torch.equal(out, win.flip(-1)) for win in windows)


def test_random_crop_flip_covers_flip_and_shift() -> None:
    x = torch.arange(3 * 32 * 32, dtype=torch.float32).view(3, 32, 32) + 1
    gen = torch.Generator().manual_seed(0)
    outs = [random_crop_flip(x, generator=gen) for _ in range(50)]
    assert any((o == 0).any() for o in outs)  # some crops include padding
    flipped = [o for o in outs if o[0, 16, 17] < o[0, 16, 15]]
    assert 0 < len(flipped) < 50


def _python2_style_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """Hand-assembled protocol-2 pickle as Python 2's cPickle wrote the original CIFAR files:
    ``numpy.core.multiarray._reconstruct`` and ``str`` (BINSTRING) payloads instead of bytes objects."""

    def short(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    n, m = data.shape
    p = b"\x80\x02}" + short(b"data")
    p += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R"
    p += b"(K\x01J" + struct.pack("<i", n) + b"J" + struct.pack("<i", m) + b"\x86"
    p += b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R"
    p += b"(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    p += b"\x89T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb"
    p += b"s" + short(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"es."
    return p


def test_reads_python2_style_pickles(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    rng = np.random.default_rng(9)
    data = _images(rng, 4)
    (tmp_path / "test_batch").write_bytes(_python2_style_batch(data, [3, 1, 4, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no numpy.core DeprecationWarning under numpy 2
        batch = load_batch(tmp_path / "test_batch")
        splits = load_dataset("cifar10", root=tmp_path)
    assert np.array_equal(batch[b"data"], data) and batch[b"labels"] == [3, 1, 4, 1]
    assert len(splits.test) == 4 and splits.test[2][1].item() == 4
    torch.testing.assert_close(splits.test[3][0], _expected(data[3], CIFAR10_MEAN, CIFAR10_STD))
