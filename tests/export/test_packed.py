"""Packed export: bit packing, exact round trips, integrity checks and file size."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from qready.export import load_packed, pack_bits, read_packed_meta, save_packed, unpack_bits
from qready.models import create_model
from qready.quant import QuantSpec, finalize_palettized, palettize, ptq


@settings(max_examples=120, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 301), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits: int, n: int, seed: int) -> None:
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_lsb_first() -> None:
    assert pack_bits(torch.tensor([1, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0b1101]
    assert pack_bits(torch.tensor([5, 3], dtype=torch.uint8), 3).tolist() == [5 | (3 << 3)]
    assert pack_bits(torch.tensor([1, 2, 3, 0, 1], dtype=torch.uint8), 2).tolist() == [0b00111001, 0b01]


def test_pack_refuses_bad_codes() -> None:
    with pytest.raises(ValueError, match="codes must be < 2\\^bits = 4"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="uint8"):
        pack_bits(torch.tensor([1]), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_bits(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="take 1 bytes"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 2)


META = {"model": "dwcnn", "model_kwargs": {"num_classes": 10, "in_channels": 1}}


def digits_model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("dwcnn", num_classes=10, in_channels=1)
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_kmeans_palettized_round_trip(tmp_path, bits: int) -> None:
    model = palettize(digits_model(), bits, "kmeans").eval()
    info = save_packed(model, tmp_path / "m.qready", meta=META)
    assert set(info["layers"].values()) == {"lut"}
    assert_same_model(model, load_packed(tmp_path / "m.qready"))


def test_dkm_group_palettized_round_trip(tmp_path) -> None:
    model = palettize(digits_model(), 2, "dkm", granularity="group", group_size=8)
    model.train()
    model(torch.randn(4, 1, 8, 8))
    finalize_palettized(model)
    save_packed(model, tmp_path / "m.qready", spec_or_bits=2, meta=META)
    layers = read_packed_meta(tmp_path / "m.qready")["layers"]
    assert all(v["kind"] == "lut" and v["bits"] == 2 for v in layers.values())
    assert layers["features.0.0.weight"]["group_size"] == 8
    assert_same_model(model, load_packed(tmp_path / "m.qready", model_factory=lambda: create_model("dwcnn")))


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(bits=4), QuantSpec(bits=3, symmetric=False), QuantSpec(bits=1), QuantSpec(bits=2, range="mse"),
     QuantSpec(bits=5, granularity="tensor")],
)
def test_ptq_round_trip_detected_and_with_spec(tmp_path, spec: QuantSpec) -> None:
    model = ptq(digits_model(), spec)
    save_packed(model, tmp_path / "auto.qready", meta=META)
    assert_same_model(model, load_packed(tmp_path / "auto.qready"))
    info = save_packed(model, tmp_path / "spec.qready", spec_or_bits=spec, meta=META)
    assert set(info["layers"].values()) == {"uniform"}
    assert_same_model(model, load_packed(tmp_path / "spec.qready"))


def test_detection_prefers_uniform_codes_for_per_channel_ptq(tmp_path) -> None:
    model = ptq(digits_model(), QuantSpec(bits=4))
    info = save_packed(model, tmp_path / "m.qready", meta=META)
    assert set(info["layers"].values()) == {"uniform"}


def test_first_last_float_layers_stay_float(tmp_path) -> None:
    select = {"first_last": "float"}
    model = palettize(digits_model(), 2, "kmeans", select=select)
    info = save_packed(model, tmp_path / "m.qready", select=select, meta=META)
    assert "features.0.0" not in info["layers"] and info["layers"]["features.1.0.0"] == "lut"
    assert_same_model(model, load_packed(tmp_path / "m.qready"))


def test_unquantized_layers_are_stored_as_float(tmp_path) -> None:
    model = digits_model()
    info = save_packed(model, tmp_path / "m.qready", spec_or_bits=2, meta=META)
    assert set(info["layers"].values()) == {"float"}
    assert_same_model(model, load_packed(tmp_path / "m.qready"))


def test_a_spec_the_weights_are_not_on_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="'features.0.0' is not on the grid"):
        save_packed(digits_model(), tmp_path / "m.qready", spec_or_bits=QuantSpec(bits=4))


def test_unfinalized_model_is_refused(tmp_path) -> None:
    model = palettize(digits_model(), 2, "dkm")
    with pytest.raises(ValueError, match="finalize"):
        save_packed(model, tmp_path / "m.qready")


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.qready"
    save_packed(palettize(digits_model(), 2, "kmeans"), path, meta=META)
    return path


def test_truncated_file_is_refused(saved) -> None:
    data = saved.read_bytes()
    for cut in (len(data) - 7, len(data) // 2, 20, 3):
        saved.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"{saved.name}.*(truncated|cut short)"):
            load_packed(saved)


@pytest.mark.parametrize("where", ["payload", "metadata"])
def test_tampered_file_is_refused(saved, where: str) -> None:
    data = bytearray(saved.read_bytes())
    if where == "payload":
        data[-100] ^= 0x01
    else:
        at = data.index(b'\\"bits\\": 2')
        data[at + 10] = ord("3")
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{saved.name}.*SHA-256 mismatch"):
        load_packed(saved)


def test_non_qready_file_is_refused(tmp_path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="plain.safetensors.*no qready metadata"):
        load_packed(path)


def test_missing_model_name_needs_a_factory(tmp_path) -> None:
    save_packed(palettize(digits_model(), 2, "kmeans"), tmp_path / "m.qready")
    with pytest.raises(ValueError, match="model_factory"):
        load_packed(tmp_path / "m.qready")


def conv_net() -> nn.Module:
    """A small VGG-like conv net (weights dominate, as in real conv nets)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    ).eval()


def test_two_bit_file_is_about_a_sixteenth_of_fp32(tmp_path) -> None:
    model = conv_net()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "fp32.safetensors")
    pal = palettize(model, 2, "kmeans")
    save_packed(pal, tmp_path / "m.qready", spec_or_bits=2)
    ratio = os.path.getsize(tmp_path / "m.qready") / os.path.getsize(tmp_path / "fp32.safetensors")
    assert ratio <= 1 / 14
    assert_close = load_packed(tmp_path / "m.qready", model_factory=conv_net)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(assert_close(x), pal(x))


def test_save_packed_refuses_non_finite_tensors(tmp_path) -> None:
    model = ptq(create_model("mlp", hidden=(16,), num_classes=4), QuantSpec(bits=4))
    with torch.no_grad():
        model.net[-1].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*net\.\d+\.bias"):
        save_packed(model, tmp_path / "nan.qready")
    assert not (tmp_path / "nan.qready").exists()


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_signed_grid_recovers_a_learned_step(bits: int, seed: int) -> None:
    from qready.export.packed import signed_grid
    from qready.quant import dequantize

    g = torch.Generator().manual_seed(seed)
    half = 2 ** (bits - 1)
    step = torch.rand(6, 1, generator=g) * 0.1 + 1e-3  # arbitrary learned steps, not min-max ones
    codes = torch.randint(-half, half, (6, 20), generator=g)
    weight = codes.float() * step  # LSQ: round(clip(w / s)) * s
    found = signed_grid(weight, max_bits=bits)
    assert found is not None
    assert torch.equal(dequantize(*found), weight) and found[1].bits <= bits
    off = weight.clone()
    off[0, 0] += step[0, 0] / 3
    found_off = signed_grid(off, max_bits=bits)  # never an inexact encoding
    assert found_off is None or torch.equal(dequantize(*found_off), off)
