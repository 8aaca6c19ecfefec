"""The PTQ method registry and how ``ptq`` resolves methods, options and calibration."""

import pytest
import torch
from torch import nn

from qready.quant import QuantSpec, fake_quantize, ptq
from qready.quant.ptq import GPTQ, PTQ_METHODS, RTN
from qready.quant.ptq.passes import execution_blocks
from qready.registry import UnknownNameError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(32, 8, generator=g) for _ in range(2)]


def test_registry_lists_the_methods():
    assert PTQ_METHODS.names() == ["gptq", "rtn"]
    assert isinstance(PTQ_METHODS.build("gptq", act_order=True), GPTQ)
    with pytest.raises(UnknownNameError, match="valid names: gptq, rtn"):
        ptq(_model(), 4, method="adaround")


def test_int_spec_is_per_channel_symmetric_minmax():
    model = _model()
    a, b = ptq(model, 3), ptq(model, QuantSpec(bits=3, granularity="channel"))
    assert torch.equal(a[0].weight, b[0].weight)
    assert torch.equal(a[0].weight, fake_quantize(model[0].weight, QuantSpec(bits=3)))
    with pytest.raises(ValueError, match="weight bits"):
        ptq(model, 9)
    with pytest.raises(TypeError, match="QuantSpec or an int"):
        ptq(model, "4")


def test_options_and_calibration_are_checked():
    model = _model()
    with pytest.raises(ValueError, match="calib"):
        ptq(model, 4, method="gptq")
    with pytest.raises(ValueError, match="calib"):
        ptq(model, 4, bias_correction=True)
    with pytest.raises(ValueError, match=r"its options: \['block_size', 'damp', 'act_order'\]"):
        ptq(model, 4, calib=_calib(), method="gptq", blocksize=64)
    with pytest.raises(ValueError, match="damp"):
        ptq(model, 4, calib=_calib(), method="gptq", damp=2.0)
    with pytest.raises(ValueError, match="only accepted with a method name"):
        ptq(model, 4, calib=_calib(), method=GPTQ(), damp=0.1)


def test_method_objects_and_names_agree():
    model, calib = _model(), _calib()
    by_name = ptq(model, 3, calib=calib, method="gptq", damp=0.05)
    by_object = ptq(model, 3, calib=calib, method=GPTQ(damp=0.05))
    assert torch.equal(by_name[2].weight, by_object[2].weight)
    assert torch.equal(ptq(model, 3, method=RTN())[0].weight, ptq(model, 3)[0].weight)


def test_first_last_bits_override_applies_to_gptq():
    q = ptq(_model(), 2, calib=_calib(), method="gptq", select={"first_last": 8})
    assert q[0].weight[0].unique().numel() > 4


def test_layers_reading_the_same_tensor_share_a_block():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
            return self.o(att @ self.v(x))

    model = Attention()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    blocks, calls = execution_blocks(model, layers, torch.randn(2, 5, 8))
    assert blocks == [["q", "k", "v"], ["o"]]
    assert calls == {"q": 1, "k": 1, "v": 1, "o": 1}
    q = ptq(model, 3, calib=[torch.randn(4, 5, 8)], method="gptq")
    assert q.o.weight.unique().numel() > 1


def test_sweep_recipe_and_cli_take_the_method():
    from qready.app.cli import build_parser
    from qready.evaluate import sweep
    from qready.recipe import RecipeError, SweepConfig

    model, calib = _model(), _calib()
    data = [(x, torch.randint(0, 4, (32,))) for x in calib]
    rtn = sweep(model, data, bits=[2], calib=calib, include_fp=False)
    gptq = sweep(model, data, bits=[2], calib=calib, include_fp=False, method="gptq", bias_correction=True,
                 method_options={"act_order": True})
    assert rtn[0]["method"] == "rtn" and gptq[0]["method"] == "gptq"
    assert gptq[0]["kl"] != rtn[0]["kl"]
    assert SweepConfig(method="gptq", method_options={"damp": 0.05}).method == "gptq"
    with pytest.raises(RecipeError, match=r"sweep.method must be one of \['gptq', 'rtn'\]"):
        SweepConfig(method="adaround")
    with pytest.raises(RecipeError, match="sweep.method_options"):
        SweepConfig(method="gptq", method_options={"blocks": 3})
    assert SweepConfig(bias_correction="model").bias_correction == "model"
    with pytest.raises(RecipeError, match=r"sweep.bias_correction must be a bool or one of \['layer', 'model'\]"):
        SweepConfig(bias_correction="float")
    assert build_parser().parse_args(["sweep", "ckpt", "--method", "gptq"]).method == "gptq"
    assert build_parser().parse_args(["sweep", "ckpt", "--bias-correction", "model"]).bias_correction == "model"
    assert build_parser().parse_args(["sweep", "ckpt"]).bias_correction is None
