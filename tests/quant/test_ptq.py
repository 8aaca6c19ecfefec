"""PTQ, activation calibration and module selection."""

import copy

import pytest
import torch
from torch import nn

from qready.quant import QuantSpec, Selector, input_quantizers, ptq


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def test_ptq_returns_new_model_and_leaves_input_untouched():
    model = _net()
    before = copy.deepcopy(model.state_dict())
    qmodel = ptq(model, QuantSpec(bits=2))
    assert qmodel is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for name in ("0", "3", "6"):
        w = dict(qmodel.named_modules())[name].weight
        for row in w.reshape(w.shape[0], -1):
            assert row.unique().numel() <= 4


def test_first_last_policies():
    model = _net()
    q_float = ptq(model, QuantSpec(bits=2), select=Selector(first_last="float"))
    assert torch.equal(q_float[0].weight, model[0].weight)
    assert torch.equal(q_float[6].weight, model[6].weight)
    assert not torch.equal(q_float[3].weight, model[3].weight)
    q8 = ptq(model, QuantSpec(bits=2), select={"first_last": 8})
    assert q8[0].weight.reshape(8, -1)[0].unique().numel() > 4  # 8-bit keeps more levels
    assert q8[3].weight.reshape(8, -1)[0].unique().numel() <= 4


def test_selector_filters():
    model = _net()
    sel = Selector(types=(nn.Conv2d,), skip_depthwise=True)
    assert [s.name for s in sel.select(model)] == ["0"]
    sel = Selector(exclude=(r"^6$",))
    assert [s.name for s in sel.select(model)] == ["0", "3"]
    with pytest.raises(ValueError, match="regex"):
        Selector(include=("(",))
    with pytest.raises(ValueError, match="first_last"):
        Selector(first_last="half")


def test_activation_quantization_calibrates_and_quantizes_inputs():
    model = _net().eval()
    data = _batches()
    qmodel = ptq(model, QuantSpec(bits=8), calib=data,
                 act_spec=QuantSpec(bits=4, symmetric=False, granularity="tensor", range="mse"))
    quantizers = input_quantizers(qmodel)
    assert len(quantizers) == 3
    assert all(not q.observing and float(q.scale) != 1.0 for q in quantizers)
    seen = {}
    qmodel[6].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    qmodel(data[0][0])
    # the hook registered after the quantizer sees the raw input; the quantizer's output is on its grid
    q = quantizers[-1]
    out = q(seen["x"])
    assert out.unique().numel() <= 16
    # deepcopy and state_dict keep the calibrated quantizers
    clone = copy.deepcopy(qmodel)
    torch.testing.assert_close(clone(data[1][0]), qmodel(data[1][0]))
    assert any(k.endswith("input_quantizer.scale") for k in qmodel.state_dict())


def test_w8a8_close_to_float():
    model = _net().eval()
    data = _batches()
    qmodel = ptq(model, QuantSpec(bits=8), calib=data, act_spec=QuantSpec(bits=8, symmetric=False, granularity="tensor"))
    x = data[0][0]
    ref, out = model(x), qmodel(x)
    assert (ref - out).abs().max() < 0.05 * ref.abs().max()


def test_bn_recalibration_changes_running_stats():
    model = _net().eval()
    q = ptq(model, QuantSpec(bits=2), calib=_batches(), bn_recalibrate=True)
    assert not torch.equal(q[1].running_mean, model[1].running_mean)
    assert int(q[1].num_batches_tracked) == 3


def test_bad_inputs_are_clear():
    model = _net()
    with pytest.raises(ValueError, match="calib"):
        ptq(model, QuantSpec(bits=4), act_spec=QuantSpec(bits=8, granularity="tensor"))
    per_channel = ptq(model, QuantSpec(bits=4), calib=_batches(), act_spec=QuantSpec(bits=8))
    assert {q.spec.granularity for q in input_quantizers(per_channel)} == {"tensor"}  # activations: per tensor
    with pytest.raises(TypeError, match="QuantSpec"):
        ptq(model, "4")  # an int bit width is shorthand, a string is not
    with pytest.raises(ValueError, match="nothing to quantize"):
        ptq(nn.Sequential(nn.ReLU()), QuantSpec(bits=4))
    broken = _net()
    with torch.no_grad():
        broken[3].weight[0, 0, 0, 0] = float("nan")
    snapshot = copy.deepcopy(broken.state_dict())
    with pytest.raises(ValueError, match=r"'3\.weight'"):
        ptq(broken, QuantSpec(bits=4))
    assert all(torch.equal(v, snapshot[k]) or torch.isnan(v).any() for k, v in broken.state_dict().items())
