"""Empirical bias correction: the quantized layer's mean output equals the float layer's."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qready.quant import QuantSpec, ptq
from qready.quant.ptq.bias_correction import output_shift
from qready.quant.ptq.passes import capture_stats


def _calib(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(16, *shape, generator=g) + 0.5 for _ in range(n)]  # non-zero mean inputs


@pytest.mark.parametrize("layer,shape,dims", [
    (nn.Linear(12, 5), (12,), (0,)),
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), (4, 7, 7), (0, 2, 3)),
    (nn.Conv1d(6, 6, 3, stride=2, groups=3), (6, 11), (0, 2)),
])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_mean_output_matches_the_float_layer(layer, shape, dims, method):
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    calib = _calib(shape)
    x = torch.cat(calib)
    plain = ptq(model, QuantSpec(bits=2), calib=calib, method=method)
    fixed = ptq(model, QuantSpec(bits=2), calib=calib, method=method, bias_correction=True)
    assert torch.equal(plain[0].weight, fixed[0].weight)
    assert fixed[0].bias is not None
    with torch.no_grad():
        want = model(x).mean(dim=dims)
        before = (plain(x).mean(dim=dims) - want).abs().max()
        after = (fixed(x).mean(dim=dims) - want).abs().max()
    assert after < 1e-5
    assert before > 100 * after


def test_output_shift_equals_a_convolution_by_the_weight_change():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2)
    x = torch.randn(8, 4, 9, 9) + 1
    stats = capture_stats(nn.Sequential(conv), [("0", conv)], [x], with_hessian=False)["0"]
    original = conv.weight.detach().clone()
    with torch.no_grad():
        conv.weight.add_(0.1 * torch.randn_like(conv.weight))
    expected = F.conv2d(x, conv.weight - original, None, 2, 1, 2).mean(dim=(0, 2, 3))
    torch.testing.assert_close(output_shift(conv, original, stats).float(), expected, rtol=1e-5, atol=1e-6)


def _two_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_model_target_matches_the_float_models_mean_output(method):
    model = _two_layers()
    calib = _calib((12,))
    x = torch.cat(calib)
    with torch.no_grad():
        want = model(x).mean(0)
        gaps = {}
        for target in ("layer", "model"):
            qmodel = ptq(model, QuantSpec(bits=2), calib=calib, method=method, bias_correction=target)
            gaps[target] = (qmodel(x).mean(0) - want).abs().max()
    # "layer" leaves the shift the quantized first layer causes after the ReLU; "model" removes it
    assert gaps["model"] < 1e-5
    assert gaps["layer"] > 100 * gaps["model"]


def test_targets_coincide_when_the_inputs_are_the_float_models():
    model = _two_layers()
    calib = _calib((12,))
    layer = ptq(model, QuantSpec(bits=3), calib=calib, bias_correction=True, sequential=False)
    whole = ptq(model, QuantSpec(bits=3), calib=calib, bias_correction="model", sequential=False)
    for a, b in zip(layer.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)
    # sequentially, the first layer's inputs are the float model's too: same correction there
    first = ptq(model, QuantSpec(bits=3), calib=calib, bias_correction="model")
    torch.testing.assert_close(first[0].bias, layer[0].bias, rtol=0, atol=1e-6)
    assert not torch.allclose(first[2].bias, layer[2].bias, atol=1e-4)


@pytest.mark.parametrize("value", ["float", 1, "Layer"])
def test_an_unknown_target_is_refused(value):
    with pytest.raises(ValueError, match=r"bias_correction must be a bool or one of \['layer', 'model'\]"):
        ptq(_two_layers(), 4, calib=_calib((12,)), bias_correction=value)
