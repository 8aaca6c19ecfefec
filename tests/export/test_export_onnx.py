"""ONNX QDQ export: onnxruntime reproduces the fake-quantized PyTorch model, and the files are small."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qready.data import load_dataset  # noqa: E402
from qready.export.onnx import export_onnx, weight_encodings  # noqa: E402
from qready.models import create_model  # noqa: E402
from qready.quant.activations import ActivationQuantizer, attach_input_quantizer  # noqa: E402
from qready.quant.grid import round_to_grid  # noqa: E402
from qready.quant.palettize import palettize  # noqa: E402
from qready.quant.ptq import ptq  # noqa: E402
from qready.quant.qat import prepare_qat  # noqa: E402
from qready.quant.spec import QuantSpec  # noqa: E402

# Tolerance: |onnxruntime - PyTorch| <= REL_TOL * max|PyTorch output| for every output of weight-only
# models. With quantized activations an activation that the two runtimes' float convolutions put on
# opposite sides of a rounding boundary (within an ulp or so of it) gets codes one step apart; then
# at least 99% of the samples must meet REL_TOL, all within FLIP_TOL, and the activation codes must agree
# except for at most FLIP_FRACTION of them, which differ by exactly one step.
REL_TOL = 1e-4
FLIP_TOL = 2e-2
FLIP_FRACTION = 1e-3
ACT8 = QuantSpec(bits=8, granularity="tensor", symmetric=False)


@pytest.fixture(scope="module")
def digits():
    """Digits splits and a dwcnn (width 8) trained for two epochs with plain SGD (BatchNorm stats real)."""
    splits = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = create_model("dwcnn", width=8, num_classes=10)
    order = torch.Generator().manual_seed(0)
    for _ in range(2):
        for x, y in DataLoader(splits.train, batch_size=32, shuffle=True, generator=order):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.3 * p.grad
    model.eval()
    x_test = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    return splits, model, x_test


def _run(path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _assert_parity(model: nn.Module, path, x: torch.Tensor, *, flips: bool = False) -> None:
    with torch.no_grad():
        ref = model(x).numpy()
    out = _run(path, x)
    assert out.shape == ref.shape
    per_sample = np.abs(out - ref).reshape(len(x), -1).max(axis=1) / np.abs(ref).max()
    agree = out.argmax(1) == ref.argmax(1)
    if flips:
        assert (per_sample <= REL_TOL).mean() >= 0.99 and per_sample.max() <= FLIP_TOL and agree.mean() >= 0.99
    else:
        assert per_sample.max() <= REL_TOL and agree.all()


def _activation_codes(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{module name: integer codes of its input quantizer}`` as PyTorch computes them."""
    codes: dict[str, torch.Tensor] = {}

    def capture(name: str, quantizer: ActivationQuantizer):
        def hook(module: nn.Module, args: tuple) -> None:  # runs before the quantizing hook
            scale, zp = quantizer.scale.reshape(1, 1), quantizer.zero_point.reshape(1, 1).float()
            codes[name] = round_to_grid(args[0].reshape(1, -1), scale, zp, quantizer.spec.qmin,
                                        quantizer.spec.qmax).reshape(args[0].shape)
        return hook

    handles = [m.register_forward_pre_hook(capture(n, m.input_quantizer), prepend=True)
               for n, m in model.named_modules() if isinstance(getattr(m, "input_quantizer", None), ActivationQuantizer)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return codes


def _onnx_codes(path, x: torch.Tensor) -> list[np.ndarray]:
    """The outputs of every QuantizeLinear node, in graph (= execution) order, run in onnxruntime."""
    proto = onnx.load(str(path))
    outputs = [n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    for name in outputs:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, {"input": x.numpy()})


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _initializer(path, name: str):
    return next(i for i in onnx.load(str(path)).graph.initializer if i.name == name)


def test_w8a8_dwcnn_matches_fake_quant_model(digits, tmp_path) -> None:
    splits, model, x = digits
    calib = DataLoader(splits.train, batch_size=128)
    q = ptq(model, QuantSpec(bits=8), calib=calib, act_spec=ACT8).eval()
    path = export_onnx(q, x[:4], tmp_path / "w8a8.onnx")
    _assert_parity(q, path, x, flips=True)
    expected = _activation_codes(q, x)  # in execution order
    got = _onnx_codes(path, x)
    assert len(got) == len(expected) == 8
    for (name, want), codes in zip(expected.items(), got, strict=True):
        diff = np.abs(codes.astype(np.int64) - want.numpy().astype(np.int64))
        assert diff.max() <= 1 and (diff > 0).mean() <= FLIP_FRACTION, name
    encodings = weight_encodings(path)
    assert len(encodings) == 8 and set(encodings.values()) == {"int8 (W8)"}
    ops = _ops(path)
    n_act = sum(isinstance(m, ActivationQuantizer) for m in q.modules())
    assert ops.count("QuantizeLinear") == n_act == 8
    assert ops.count("DequantizeLinear") == n_act + 8
    codes = _initializer(path, "classifier.weight_quantized")
    assert codes.data_type == onnx.TensorProto.INT8 and list(codes.dims) == [10, 16]
    assert list(_initializer(path, "classifier.weight_scale").dims) == [10]  # per channel, axis 0
    # the exported quantized model still classifies the digits as well as the PyTorch one
    labels = np.array([splits.test[i][1] for i in range(len(splits.test))])
    acc_onnx = (_run(path, x).argmax(1) == labels).mean()
    assert abs(acc_onnx - (q(x).argmax(1).numpy() == labels).mean()) <= 0.01 and acc_onnx > 0.5


def test_w4_weights_are_int4_at_opset_21_and_int8_below(digits, tmp_path) -> None:
    _, model, x = digits
    q = ptq(model, QuantSpec(bits=4)).eval()
    p21 = export_onnx(q, x[:4], tmp_path / "w4.onnx", w_bits=4)
    p17 = export_onnx(q, x[:4], tmp_path / "w4_17.onnx", w_bits=4, opset=17)
    p8 = export_onnx(ptq(model, QuantSpec(bits=8)).eval(), x[:4], tmp_path / "w8.onnx")
    for path in (p21, p17):
        _assert_parity(q, path, x)
    assert set(weight_encodings(p21).values()) == {"int4 (W4)"}
    assert set(weight_encodings(p17).values()) == {"int8 (W4)"}
    codes = _initializer(p21, "classifier.weight_quantized")
    assert codes.data_type == onnx.TensorProto.INT4 and len(codes.raw_data) == 10 * 16 // 2  # packed
    assert onnx.load(str(p21)).opset_import[0].version == 21
    assert p21.stat().st_size < p8.stat().st_size


def test_sub_8_bit_activations_are_clipped_to_the_grid_ends(digits, tmp_path) -> None:
    splits, model, x = digits
    act4 = QuantSpec(bits=4, granularity="tensor", symmetric=False)
    q = ptq(model, QuantSpec(bits=4), calib=DataLoader(splits.train, batch_size=128), act_spec=act4).eval()
    path = export_onnx(q, x[:4], tmp_path / "w4a4.onnx", w_bits=4)
    _assert_parity(q, path, x, flips=True)
    assert _ops(path).count("Clip") == _ops(path).count("QuantizeLinear") == 8


def test_int8_file_is_about_4x_smaller_than_fp32(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("mlp", hidden=(256, 256), num_classes=10).eval()
    x = torch.randn(8, 64)
    fp32 = export_onnx(model, x[:2], tmp_path / "fp32.onnx")  # float weights stay float
    assert set(weight_encodings(fp32).values()) == {"float"}
    q = ptq(model, QuantSpec(bits=8)).eval()
    int8 = export_onnx(q, x[:2], tmp_path / "int8.onnx")
    _assert_parity(q, int8, x)
    ratio = fp32.stat().st_size / int8.stat().st_size
    assert 3.5 < ratio <= 4.0


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=8, symmetric=False),
    QuantSpec(bits=6, granularity="tensor"),
    QuantSpec(bits=3),
    QuantSpec(bits=2, symmetric=False, granularity="tensor"),
    QuantSpec(bits=1),
])
def test_weight_grids_round_trip_exactly(spec: QuantSpec, tmp_path) -> None:
    torch.manual_seed(1)
    model = create_model("mlp", hidden=(48,), num_classes=10).eval()
    q = ptq(model, spec).eval()
    x = torch.randn(16, 64)
    path = export_onnx(q, x[:2], tmp_path / "m.onnx", spec=spec)
    _assert_parity(q, path, x)
    assert all(label.endswith(f"(W{spec.bits})") for label in weight_encodings(path).values())


def test_palettized_and_off_grid_weights_use_an_exact_lut(tmp_path) -> None:
    torch.manual_seed(2)
    model = create_model("mlp", hidden=(128,), num_classes=10).eval()
    x = torch.randn(16, 64)
    pal = palettize(model, bits=2, method="kmeans", granularity="group", group_size=4).eval()
    path = export_onnx(pal, x[:2], tmp_path / "pal.onnx")
    with torch.no_grad():
        assert np.abs(_run(path, x) - pal(x).numpy()).max() <= 1e-5
    assert set(weight_encodings(path).values()) == {"lut2 (uint8 indices)"}
    assert path.stat().st_size < export_onnx(model, x[:2], tmp_path / "fp.onnx").stat().st_size / 2.5
    # symmetric grids that min-max re-derivation cannot reproduce (wrong w_bits, MSE clipping): their own
    # steps are recovered, so they are still stored exactly as 4-bit codes
    for name, spec, w_bits in (("w4", QuantSpec(bits=4), 8), ("mse", QuantSpec(bits=4, range="mse"), 4)):
        q = ptq(model, spec).eval()
        path = export_onnx(q, x[:2], tmp_path / f"{name}.onnx", w_bits=w_bits)
        assert set(weight_encodings(path).values()) == {"int4 (W4)"}
        _assert_parity(q, path, x)


def test_embedding_and_matmul_weights(tmp_path) -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.proj = nn.Linear(16, 8)  # on [B, T, 16]: exported as MatMul with a transposed weight

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.proj(self.emb(idx))

    torch.manual_seed(3)
    q = ptq(Tokens().eval(), QuantSpec(bits=8))
    idx = torch.randint(0, 50, (4, 7))
    path = export_onnx(q, idx, tmp_path / "tok.onnx")
    with torch.no_grad():
        ref = q(idx).numpy()
    assert np.abs(_run(path, idx) - ref).max() <= REL_TOL * np.abs(ref).max()
    assert set(weight_encodings(path).values()) == {"int8 (W8)"} and "MatMul" in _ops(path)


def test_export_leaves_the_model_untouched(digits, tmp_path) -> None:
    splits, model, x = digits
    q = ptq(model, QuantSpec(bits=8), calib=DataLoader(splits.train, batch_size=128), act_spec=ACT8).train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    export_onnx(q, x[:4], tmp_path / "m.onnx")
    assert q.training and all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    assert sum(isinstance(m, ActivationQuantizer) for m in q.modules()) == 8


def test_errors_name_the_problem(digits, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, model, x = digits
    q = ptq(model, QuantSpec(bits=8)).eval()
    with pytest.raises(ValueError, match="w_bits must be one of"):
        export_onnx(q, x[:2], tmp_path / "m.onnx", w_bits=9)
    with pytest.raises(ValueError, match=r"opset must be None or an int in \[13, "):
        export_onnx(q, x[:2], tmp_path / "m.onnx", opset=11)
    with pytest.raises(ValueError, match="granularity 'tensor' or 'channel'"):
        export_onnx(q, x[:2], tmp_path / "m.onnx", spec=QuantSpec(bits=4, granularity="group", group_size=4))
    with pytest.raises(ValueError, match="finalize the model first"):
        export_onnx(prepare_qat(model, method="ste", w_bits=4), x[:2], tmp_path / "m.onnx")
    uncalibrated = ptq(model, QuantSpec(bits=8)).eval()
    attach_input_quantizer(uncalibrated.classifier, ACT8)
    with pytest.raises(ValueError, match="'classifier' is still calibrating"):
        export_onnx(uncalibrated, x[:2], tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'qready\[export\]'"):
        export_onnx(q, x[:2], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
