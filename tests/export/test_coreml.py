"""Core ML export: the .mlpackage holds qready's LUTs/indices and codes/scales, read back bit for bit.

An .mlpackage cannot run on Linux; these tests reopen the written package, decode every compressed
weight with Core ML's op semantics and compare it with the model and with qready's own encoding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'qready[coreml]')")

from qready.export.coreml import export_coreml  # noqa: E402
from qready.export.decode import read_coreml, verify_coreml  # noqa: E402
from qready.models import create_model  # noqa: E402
from qready.quant.palettize import palettize  # noqa: E402
from qready.quant.ptq import ptq  # noqa: E402
from qready.quant.spec import QuantSpec  # noqa: E402

LUT_WIDTHS = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 6, 8: 8}  # qready's palette bits -> stored index bits


def _palettize_layers(model: nn.Module, plan: dict[str, tuple[int, int | None]]) -> nn.Module:
    """Palettize (k-means) each named layer at its own (bits, group_size)."""
    for name, (bits, group) in plan.items():
        model = palettize(model, bits=bits, method="kmeans", select={"include": (rf"^{name}$",)},
                          granularity="tensor" if group is None else "group", group_size=group)
    return model


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return create_model("dwcnn", width=8, num_classes=10).eval(), torch.randn(1, 1, 8, 8)


def test_every_lut_width_per_tensor_and_grouped(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(*[nn.Linear(48, 48) for _ in LUT_WIDTHS]).eval()
    plan = {str(i): (bits, None if i % 2 else 8) for i, bits in enumerate(LUT_WIDTHS)}
    pmodel = _palettize_layers(model, plan)
    path = export_coreml(pmodel, torch.randn(2, 48), tmp_path / "m.mlpackage")
    checked = verify_coreml(pmodel, path)
    assert {k: v["bits"] for k, v in checked.items()} == {f"{i}.weight": LUT_WIDTHS[b] for i, b in enumerate(LUT_WIDTHS)}
    meta, stored = read_coreml(path)
    assert meta["target"] == "iOS18" and meta["precision"] == "float32"
    assert stored["0.weight"].arrays["lut"].shape == (6, 2)  # 48 channels, 8 per LUT, 2 entries
    assert stored["1.weight"].arrays["lut"].shape == (1, 4)
    with torch.no_grad():  # one ulp off in one weight: the check fails, naming the layer
        pmodel[3].weight[0, 0] = torch.nextafter(pmodel[3].weight[0, 0], torch.tensor(9.0))
    with pytest.raises(ValueError, match="'3.weight'"):
        verify_coreml(pmodel, path)


def test_zoo_cnn_grouped_palette_and_ios16_per_tensor(cnn, tmp_path):
    model, x = cnn
    grouped = palettize(model, bits=2, method="kmeans", granularity="group", group_size=4)
    verify_coreml(grouped, export_coreml(grouped, x, tmp_path / "g.mlpackage"))
    per_tensor = palettize(model, bits=4, method="kmeans")
    path = export_coreml(per_tensor, x, tmp_path / "t.mlpackage", minimum_deployment_target="iOS16")
    checked = verify_coreml(per_tensor, path)
    assert checked and all(v == {"kind": "lut", "bits": 4} for v in checked.values())


EDGES_8 = {"first_last": 8}  # first and last layers at 8 bits, the others at the spec's 4: both widths per file


@pytest.mark.parametrize("granularity, symmetric, target", [
    ("channel", True, "iOS18"), ("channel", False, "iOS18"), ("tensor", True, "iOS18"), ("tensor", False, "iOS18"),
    ("group", True, "iOS18"), ("group", False, "iOS18"), ("channel", False, "iOS17"),
])
def test_linear_codes_every_width_and_granularity(cnn, granularity, symmetric, target, tmp_path):
    if granularity == "group":  # blocks of 32 input features (a conv's 3x3 kernels do not tile 32)
        torch.manual_seed(4)
        model, x = create_model("mlp", in_features=64, hidden=(96, 64), num_classes=32).eval(), torch.randn(1, 64)
    else:
        model, x = cnn
    spec = QuantSpec(bits=8 if target == "iOS17" else 4, granularity=granularity, symmetric=symmetric,
                     group_size=32 if granularity == "group" else None)
    select = None if target == "iOS17" else EDGES_8
    qmodel = ptq(model, spec, select=select)
    path = export_coreml(qmodel, x, tmp_path / "q.mlpackage", spec=spec, select=select,
                         minimum_deployment_target=target)
    checked = verify_coreml(qmodel, path, spec=spec, select=select)
    bits = [v["bits"] for v in checked.values()]
    assert {v["kind"] for v in checked.values()} == {"linear"}
    assert bits == [8] * len(bits) if target == "iOS17" else (bits[0], bits[-1], set(bits[1:-1])) == (8, 8, {4})


def test_per_block_codes_and_float16(tmp_path):
    torch.manual_seed(2)
    model = create_model("mlp", in_features=64, hidden=(96, 64), num_classes=32).eval()
    spec = QuantSpec(bits=4, granularity="group", group_size=32, symmetric=False)
    qmodel = ptq(model, spec)
    x = torch.randn(1, 64)
    path = export_coreml(qmodel, x, tmp_path / "b.mlpackage", spec=spec, precision="float16")
    verify_coreml(qmodel, path, spec=spec)
    stored = read_coreml(path)[1]["net.1.weight"]
    assert stored.arrays["scale"].shape == (96, 2) and stored.arrays["scale"].dtype == np.float16
    pmodel = palettize(model, bits=3, method="kmeans")
    path = export_coreml(pmodel, x, tmp_path / "p16.mlpackage", precision="float16")
    verify_coreml(pmodel, path)
    assert read_coreml(path)[1]["net.1.weight"].arrays["lut"].dtype == np.float16


def test_hugging_face_bert_layer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertLayer

    config = transformers.BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128)
    config._attn_implementation = "eager"
    torch.manual_seed(3)
    layer = BertLayer(config).eval()
    x = torch.randn(1, 6, 64)
    pmodel = palettize(layer, bits=2, method="kmeans", granularity="group", group_size=16)
    checked = verify_coreml(pmodel, export_coreml(pmodel, x, tmp_path / "p.mlpackage"))
    assert len(checked) == 6  # q, k, v, attention output, intermediate, output
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    qmodel = ptq(layer, spec)
    assert len(verify_coreml(qmodel, export_coreml(qmodel, x, tmp_path / "q.mlpackage", spec=spec), spec=spec)) == 6


def test_what_core_ml_cannot_hold_is_refused(cnn, tmp_path):
    model, x = cnn
    out = tmp_path / "r.mlpackage"
    spec3 = QuantSpec(bits=3)
    with pytest.raises(ValueError, match=r"'features\.0\.0'.*4 or 8-bit codes, not 3: quantize it at bits=4, or "
                                         r"export with spec=None"):
        export_coreml(ptq(model, spec3), x, out, spec=spec3)
    spec4 = QuantSpec(bits=4)
    with pytest.raises(ValueError, match=r"iOS17.*8-bit codes, not 4: quantize it at bits=8"):
        export_coreml(ptq(model, spec4), x, out, spec=spec4, minimum_deployment_target="iOS17")
    blocks = QuantSpec(bits=4, granularity="group", group_size=4)
    with pytest.raises(ValueError, match=r"'features\.0\.0'.*group_size=4 does not tile.*group_size=3"):
        export_coreml(ptq(model, blocks), x, out, spec=blocks)
    wide = nn.Sequential(nn.Linear(64, 64)).eval()
    grouped = palettize(wide, bits=4, method="kmeans", granularity="group", group_size=1)
    with pytest.raises(ValueError, match=r"'0'.*one LUT per 1 output channel.*minimum_deployment_target='iOS18'"):
        export_coreml(grouped, torch.randn(1, 64), out, minimum_deployment_target="iOS16")
    with pytest.raises(ValueError, match=r"'0' is not palettized"):
        export_coreml(wide, torch.randn(1, 64), out)
    with pytest.raises(ValueError, match="not on the grid"):
        export_coreml(wide, torch.randn(1, 64), out, spec=spec4)
    act = ptq(model, spec4, calib=[x], act_spec=QuantSpec(bits=8, granularity="tensor", symmetric=False))
    with pytest.raises(ValueError, match="activation quantizer"):
        export_coreml(act, x, out, spec=spec4)
    dkm = palettize(wide, bits=2, method="dkm")
    with pytest.raises(ValueError, match="finalize the model first"):
        export_coreml(dkm, torch.randn(1, 64), out)
    with pytest.raises(ValueError, match=r"minimum_deployment_target must be one of \['iOS16'"):
        export_coreml(wide, torch.randn(1, 64), out, minimum_deployment_target="iOS15")
    with pytest.raises(ValueError, match=r"precision must be one of \['float32', 'float16'\]"):
        export_coreml(wide, torch.randn(1, 64), out, precision="int8")
    assert not out.exists()


def test_cli_coreml(tmp_path):
    import yaml

    from qready.app.cli import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"name": "tiny", "seed": 0, "model": {"name": "dwcnn", "args": {"width": 8}},
                                      "data": {"name": "digits"}, "train": {"epochs": 1, "batch_size": 64}}))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--no-progress"]) == 0
    for bits, kind in ((4, "linear"), (2, "lut")):
        assert main(["export", str(run / "checkpoint"), "--format", "coreml", "--bits", str(bits)]) == 0
        meta, stored = read_coreml(run / f"model_w{bits}.mlpackage")
        assert stored and {w.kind for w in stored.values()} == {kind}
        # a b-bit per-channel grid: at most 2^b values per output channel, whatever LUT grouping was cheapest
        assert max(len(np.unique(channel)) for w in stored.values() for channel in w.values) <= 1 << bits
