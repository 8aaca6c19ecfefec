"""Weight-only ONNX export: Linear weights as MatMulNBits, read back bit for bit and run in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qready.export.decode import read_onnx, verify_onnx  # noqa: E402
from qready.export.onnx import export_onnx, weight_encodings  # noqa: E402
from qready.export.onnx_weights import pack_rows, unpack_rows  # noqa: E402
from qready.models import create_model  # noqa: E402
from qready.quant.palettize import palettize  # noqa: E402
from qready.quant.ptq import ptq  # noqa: E402
from qready.quant.spec import QuantSpec  # noqa: E402

# Parity: the stored weights decode to the PyTorch model's weights bit for bit, so the outputs differ
# only by the order of float32 accumulation (ONNX Runtime's blocked kernels vs PyTorch's GEMM):
# a relative error of a few K·2^-24 at most. REL_TOL = 1e-4 of the largest output leaves room for
# K up to ~10^3 while catching any wrong code, scale or zero point (one code step moves the output
# by ~1e-2 relative).
REL_TOL = 1e-4

SPECS = [QuantSpec(bits=b, granularity=g, symmetric=s, group_size=32 if g == "group" else None)
         for b in (2, 4, 8) for g in ("tensor", "channel", "group") for s in (True, False)]


def _ids(spec: QuantSpec) -> str:
    return f"W{spec.bits}-{spec.granularity}-{'sym' if spec.symmetric else 'asym'}"


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return create_model("mlp", in_features=64, hidden=(96, 64), num_classes=10).eval(), torch.randn(5, 64)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_mlp_round_trip_every_bit_width_and_granularity(mlp, spec, tmp_path):
    model, x = mlp
    qmodel = ptq(model, spec)
    path = export_onnx(qmodel, x, tmp_path / "m.onnx", spec=spec, weights_only=True, block_size=32)
    result = verify_onnx(qmodel, path, x, spec=spec)
    assert set(result["layers"].values()) == {"matmul_nbits"}
    assert result["max_rel_error"] <= REL_TOL
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == 3 and "Gemm" not in ops and "MatMul" not in ops


def test_zoo_cnn_conv_int8_qdq_and_linear_nbits(tmp_path):
    torch.manual_seed(1)
    model = create_model("dwcnn", width=8, num_classes=10).eval()
    spec = QuantSpec(bits=4, granularity="channel")
    qmodel = ptq(model, spec)
    x = torch.randn(3, 1, 8, 8)
    path = export_onnx(qmodel, x, tmp_path / "cnn.onnx", spec=spec, weights_only=True)
    labels = weight_encodings(path)
    assert labels["classifier.weight"].startswith("matmul_nbits4")
    conv = {k: v for k, v in labels.items() if k != "classifier.weight"}
    assert conv and all(v == "int8 (W4)" for v in conv.values())
    result = verify_onnx(qmodel, path, x, spec=spec)
    assert result["max_rel_error"] <= REL_TOL


def test_hugging_face_bert_layer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertLayer

    config = transformers.BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128)
    config._attn_implementation = "eager"
    torch.manual_seed(2)
    layer = BertLayer(config).eval()
    spec = QuantSpec(bits=4, granularity="group", group_size=64, symmetric=False)
    qlayer = ptq(layer, spec)
    x = torch.randn(2, 7, 64)
    path = export_onnx(qlayer, x, tmp_path / "bert.onnx", spec=spec, weights_only=True, block_size=32)
    result = verify_onnx(qlayer, path, x, spec=spec)
    assert list(result["layers"].values()) == ["matmul_nbits"] * 6  # q, k, v, attention out, intermediate, out
    assert result["max_rel_error"] <= REL_TOL
    stored = read_onnx(path)["intermediate.dense.weight"]
    assert stored.block_size == 32 and stored.arrays["raw"]["scales"].shape == (128, 2)


class _Block(nn.Module):
    """A Hugging Face block returning its hidden states (the first output when it returns a tuple)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out[0] if isinstance(out, tuple) else out


def test_hugging_face_gpt2_block_conv1d(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    config = transformers.GPT2Config(n_embd=64, n_head=4, n_inner=128)
    config._attn_implementation = "eager"
    torch.manual_seed(5)
    block = _Block(GPT2Block(config)).eval()
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    qblock = ptq(block, spec)
    x = torch.randn(2, 5, 64)
    path = export_onnx(qblock, x, tmp_path / "gpt2.onnx", spec=spec, weights_only=True)
    result = verify_onnx(qblock, path, x, spec=spec)  # Conv1D weights are [K, N]: stored transposed as [N, K]
    assert list(result["layers"].values()) == ["matmul_nbits"] * 4  # c_attn, attention c_proj, c_fc, mlp c_proj
    assert result["max_rel_error"] <= REL_TOL


def test_square_weights_stored_transposed_are_read_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertLayer

    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    config._attn_implementation = "eager"
    torch.manual_seed(6)
    qlayer = ptq(BertLayer(config).eval(), QuantSpec(bits=8))
    x = torch.randn(1, 4, 32)
    path = export_onnx(qlayer, x, tmp_path / "qdq.onnx")  # Q/DQ: MatMul reads W^T, 32 x 32 for q, k, v, output
    stored = read_onnx(path)["attention.self.query.weight"]
    assert stored.outputs_first is False and stored.values.shape == (32, 32)
    assert set(verify_onnx(qlayer, path)["layers"].values()) == {"qdq"}  # bit for bit, in the torch layout


def test_palettized_linear_keeps_the_exact_lut(mlp, tmp_path):
    model, x = mlp
    pmodel = palettize(model, bits=3, method="kmeans")
    path = export_onnx(pmodel, x, tmp_path / "p.onnx", spec=QuantSpec(bits=4), weights_only=True)
    result = verify_onnx(pmodel, path, x)
    assert set(result["layers"].values()) == {"lut"}
    assert result["max_rel_error"] <= REL_TOL


def test_four_bit_file_is_six_times_smaller_than_fp32(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    x = torch.randn(1, 512)
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    fp32 = export_onnx(model, x, tmp_path / "fp32.onnx", select={"include": ("^$",)})
    int4 = export_onnx(ptq(model, spec), x, tmp_path / "int4.onnx", spec=spec, weights_only=True)
    assert int4.stat().st_size * 6 <= fp32.stat().st_size


def test_a_changed_weight_is_caught(mlp, tmp_path):
    model, x = mlp
    spec = QuantSpec(bits=4)
    qmodel = ptq(model, spec)
    path = export_onnx(qmodel, x, tmp_path / "m.onnx", spec=spec, weights_only=True)
    with torch.no_grad():
        qmodel.net[1].weight[3, 5] = torch.nextafter(qmodel.net[1].weight[3, 5], torch.tensor(1.0))
    with pytest.raises(ValueError, match="decoded values of 'net.1.weight'"):
        verify_onnx(qmodel, path)


@pytest.mark.parametrize("bits, nearest", [(3, 4), (5, 4), (6, 8), (1, 2)])
def test_bit_widths_matmulnbits_lacks_are_refused(mlp, bits, nearest, tmp_path):
    model, x = mlp
    spec = QuantSpec(bits=bits)
    with pytest.raises(ValueError, match=rf"'net\.1'.*MatMulNBits holds 2, 4, 8-bit.*bits={nearest}"):
        export_onnx(ptq(model, spec), x, tmp_path / "m.onnx", spec=spec, weights_only=True)


def test_refused_block_layouts_and_inputs(mlp, tmp_path):
    model, x = mlp
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    qmodel = ptq(model, spec)
    with pytest.raises(ValueError, match=r"group_size=32 is not a multiple of block_size=64.*block_size=32"):
        export_onnx(qmodel, x, tmp_path / "m.onnx", spec=spec, weights_only=True, block_size=64)
    with pytest.raises(ValueError, match=r"block_size must be one of \[16, 32, 64, 128, 256\]"):
        export_onnx(qmodel, x, tmp_path / "m.onnx", spec=spec, weights_only=True, block_size=48)
    with pytest.raises(ValueError, match="also 'group' with weights_only=True"):
        export_onnx(qmodel, x, tmp_path / "m.onnx", spec=spec)
    act = ptq(model, QuantSpec(bits=4), calib=[x], act_spec=QuantSpec(bits=8, granularity="tensor", symmetric=False))
    with pytest.raises(ValueError, match="quantizes its input; weights_only=True"):
        export_onnx(act, x, tmp_path / "m.onnx", spec=QuantSpec(bits=4), weights_only=True)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_row_packing_round_trip_and_layout(bits):
    rng = np.random.default_rng(bits)
    u = rng.integers(0, 1 << bits, size=(3, 64)).astype(np.uint8)
    packed = pack_rows(u, bits)
    assert packed.shape == (3, 64 * bits // 8)
    assert np.array_equal(unpack_rows(packed, bits, 64), u)
    if bits == 4:  # ORT's layout: element 2j in the low nibble of byte j
        assert np.array_equal(packed[:, 0], u[:, 0] | (u[:, 1] << 4))


def test_cli_weights_only(tmp_path, capsys):
    import yaml

    from qready.app.cli import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"name": "tiny", "seed": 0, "model": {"name": "dwcnn", "args": {"width": 8}},
                                      "data": {"name": "digits"}, "train": {"epochs": 1, "batch_size": 64}}))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--no-progress"]) == 0
    assert main(["export", str(run / "checkpoint"), "--format", "onnx", "--weights-only", "--bits", "4",
                 "--out", str(tmp_path / "w4.onnx")]) == 0
    labels = weight_encodings(tmp_path / "w4.onnx")
    assert labels["classifier.weight"].startswith("matmul_nbits4") and "int8 (W4)" in labels.values()
    assert main(["export", str(run / "checkpoint"), "--weights-only"]) == 2
    assert "--weights-only applies to --format onnx" in capsys.readouterr().err
    assert main(["export", str(run / "checkpoint"), "--format", "onnx", "--weights-only", "--a-bits", "8"]) == 2
    assert "weights only" in capsys.readouterr().err
