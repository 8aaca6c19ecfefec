"""Checkpoint directories: round trip, error messages naming the bad file, atomic writes, NaN guards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from train_testkit import make_model, single_thread

import qready.train.checkpoint as ckpt_mod
from qready.train import (
    CheckpointError,
    check_finite,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield



class Tied(nn.Module):
    """Shared weight plus a non-contiguous buffer: both trip a naive safetensors save."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.register_buffer("t", torch.arange(12.0).reshape(3, 4).t())


def _opt(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4, 4)).sum().backward()
    opt.step()
    return opt


def test_round_trip(tmp_path: Path) -> None:
    model = make_model()
    opt = _opt(model)
    path = save_checkpoint(tmp_path / "ck", model, meta={"model": "mlp", "kwargs": {"w": 2}}, optimizer=opt,
                           extra_state={"rng": torch.get_rng_state(), "n": [1, 2.5, "x", None]})
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "train_state.pt"]
    ck = load_checkpoint(path)
    assert ck.meta["model"] == "mlp" and ck.meta["kwargs"] == {"w": 2} and "qready_version" in ck.meta
    for k, v in model.state_dict().items():
        assert torch.equal(ck.state_dict[k], v)
    assert ck.train_state is not None
    assert ck.train_state["optimizer"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert ck.train_state["extra"]["n"] == [1, 2.5, "x", None]
    fresh = make_model(seed=5)
    load_model_weights(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))


def test_weights_only_checkpoint_and_shared_tensors(tmp_path: Path) -> None:
    model = Tied()
    save_checkpoint(tmp_path / "ck", model, meta={})
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.train_state is None
    other = Tied()
    load_model_weights(tmp_path / "ck", other)
    assert torch.equal(other.a.weight, model.a.weight) and torch.equal(other.t, model.t)
    assert other.b.weight is other.a.weight


def test_strict_mismatch(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ck", make_model(), meta={})
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model_weights(tmp_path / "ck", nn.Sequential(nn.Flatten(), nn.Linear(16, 5)))


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_safetensors(tmp_path: Path, verify: bool) -> None:
    path = save_checkpoint(tmp_path / "ck", make_model(), meta={})
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path, verify=verify)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model_weights(path, make_model(), verify=verify)


def test_bit_flip_detected_by_checksum(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ck", make_model(), meta={})
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*sha256"):
        load_checkpoint(path)


def test_bad_or_missing_meta(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ck", make_model(), meta={})
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(path)


def test_missing_directory_and_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    path = save_checkpoint(tmp_path / "ck", make_model(), meta={})
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)


def test_train_state_is_loaded_weights_only(tmp_path: Path) -> None:
    # An arbitrary object in train_state.pt must not be unpickled.
    path = save_checkpoint(tmp_path / "ck", make_model(), meta={}, extra_state={"x": 1})
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]["train_state.pt"]  # skip the checksum so torch.load itself is exercised
    (path / "meta.json").write_text(json.dumps(meta))
    torch.save({"evil": Path("/")}, path / "train_state.pt")
    with pytest.raises(CheckpointError, match="train_state.pt"):
        load_checkpoint(path)
    (path / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="train_state.pt"):
        load_checkpoint(path)


def test_nan_weights_refused(tmp_path: Path) -> None:
    model = make_model()
    with torch.no_grad():
        model[1].weight[1, 2] = float("nan")
    with pytest.raises(CheckpointError, match=r"'1\.weight'"):
        save_checkpoint(tmp_path / "ck", model, meta={})
    assert not (tmp_path / "ck").exists()
    with pytest.raises(ValueError, match=r"parameter '1\.weight' holds 1 NaN"):
        check_finite(model)


def test_check_finite_buffers_and_clean_model() -> None:
    bn = nn.BatchNorm1d(3)
    check_finite(bn)
    bn.running_var[0] = float("inf")
    with pytest.raises(ValueError, match="buffer 'running_var' holds 0 NaN and 1 Inf"):
        check_finite(bn)


def test_atomic_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    path = save_checkpoint(tmp_path / "ck", model, meta={"v": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[1].weight.add_(1.0)

    def broken_save(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")  # half-written file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, meta={"v": 2})
    ck = load_checkpoint(path)
    assert ck.meta["v"] == 1
    assert all(torch.equal(ck.state_dict[k], v) for k, v in before.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # temp dir cleaned up
    monkeypatch.undo()
    save_checkpoint(path, model, meta={"v": 3})
    assert load_checkpoint(path).meta["v"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_interrupted_swap_falls_back_to_previous(tmp_path: Path) -> None:
    # Death between "move old aside" and "move new in": the old complete checkpoint is used.
    path = save_checkpoint(tmp_path / "ck", make_model(), meta={"v": 1})
    path.rename(tmp_path / ".ck.old")
    assert load_checkpoint(path).meta["v"] == 1
    save_checkpoint(path, make_model(), meta={"v": 2})
    assert load_checkpoint(path).meta["v"] == 2
    assert not (tmp_path / ".ck.old").exists()
