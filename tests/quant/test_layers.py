"""The layer table: output-channel axes, user registration, the default Selector and per-axis methods."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from qready.quant import (
    QuantSpec,
    Selector,
    fake_quantize,
    finalize,
    finalize_palettized,
    palettize,
    prepare_qat,
    ptq,
)
from qready.quant.layers import (
    _BY_CLASS,
    _BY_NAME,
    _INDEX_INPUTS,
    layer_spec,
    out_axis,
    register_layer,
    takes_index_inputs,
)
from qready.quant.ptq.params import recorded_params


class Transposed(nn.Module):
    """A Linear storing its weight as ``[in, out]`` (like Hugging Face ``Conv1D``)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


@pytest.fixture
def transposed_registered():
    register_layer(Transposed, 1)
    yield
    _BY_CLASS.pop(Transposed, None)


@pytest.mark.parametrize(("module", "axis"), [
    (nn.Linear(3, 4), 0),
    (nn.Conv1d(2, 4, 3), 0),
    (nn.Conv2d(2, 4, 3), 0),
    (nn.ConvTranspose2d(2, 4, 3), 1),
    (nn.Embedding(10, 4), 0),
    (nn.BatchNorm1d(4), None),
])
def test_builtin_axes(module: nn.Module, axis: int | None) -> None:
    assert out_axis(module) == axis


def test_subclass_inherits_axis() -> None:
    class MyLinear(nn.Linear):
        pass

    assert out_axis(MyLinear(2, 3)) == 0
    assert takes_index_inputs(nn.Embedding(4, 2)) and not takes_index_inputs(nn.Linear(2, 2))


def test_register_by_name_is_lazy_and_negative_axis_normalised() -> None:
    name = f"{__name__}.Transposed"
    register_layer(name, -1, index_inputs=True)
    try:
        layer = Transposed(3, 5)
        assert out_axis(layer) == 1
        assert takes_index_inputs(layer)
    finally:
        _BY_NAME.pop(name)
        _INDEX_INPUTS.discard(name)
    assert out_axis(Transposed(3, 5)) is None


@pytest.mark.parametrize(("args", "err", "match"), [
    ((nn.Linear, 1.0), TypeError, "out_axis must be an int"),
    ((nn.Linear, True), TypeError, "out_axis must be an int"),
    ((int, 0), TypeError, "nn.Module subclass"),
    (("Conv1D", 1), ValueError, "fully qualified"),
])
def test_register_rejects_bad_input(args: tuple, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        register_layer(*args)


def test_layer_spec_sets_axis_only_per_channel() -> None:
    conv_t = nn.ConvTranspose1d(2, 4, 3)
    assert layer_spec(conv_t, QuantSpec(bits=4, granularity="channel")).axis == 1
    per_tensor = QuantSpec(bits=4, granularity="tensor")
    assert layer_spec(conv_t, per_tensor) is per_tensor


def test_default_selector_follows_the_table(transposed_registered) -> None:
    model = nn.Sequential(nn.Embedding(10, 6), Transposed(6, 5), nn.ReLU(), nn.Linear(5, 2), nn.LayerNorm(2))
    assert [s.name for s in Selector().select(model)] == ["0", "1", "3"]
    assert "Transposed" in Selector().type_names()
    assert [s.name for s in Selector(types=(nn.Linear,)).select(model)] == ["3"]


def test_ptq_per_channel_follows_transposed_axis(transposed_registered) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Transposed(6, 5))
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 1, 5))  # columns on very different scales
    spec = QuantSpec(bits=3, granularity="channel")
    q = ptq(model, spec)
    expected = fake_quantize(model[0].weight.detach().t(), spec).t()
    assert torch.equal(q[0].weight, expected)
    # per-row scales would wipe out the small columns: the axis matters
    assert not torch.equal(q[0].weight, fake_quantize(model[0].weight.detach(), spec))


@pytest.mark.parametrize("method", ["ste", "lsq", "ewgs"])
def test_qat_per_channel_follows_transposed_axis(transposed_registered, method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Transposed(6, 5))
    q = prepare_qat(model, method=method, w_bits=3, w_granularity="channel")
    quantizer = q[0].parametrizations["weight"][0]
    assert quantizer.axis == 1
    w = q[0].weight.detach()
    for col in range(5):  # each output column holds at most 2^3 distinct values
        assert w[:, col].unique().numel() <= 8


def test_ptq_skips_activation_quantizers_on_index_inputs() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    calib = [torch.randint(0, 10, (5, 3)) for _ in range(2)]
    q = ptq(model, QuantSpec(bits=8), calib=calib, act_spec=QuantSpec(bits=8, symmetric=False, granularity="tensor"))
    assert not hasattr(q[0], "input_quantizer") and hasattr(q[2], "input_quantizer")


def test_import_does_not_pull_transformers() -> None:
    code = "import sys, qready.quant.layers, qready.quant; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_hf_conv1d_registered_by_name() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(5, 3)  # nf=5 outputs, nx=3 inputs: weight [3, 5]
    assert tuple(layer.weight.shape) == (3, 5)
    assert out_axis(layer) == 1
    assert [s.name for s in Selector().select(nn.Sequential(layer))] == ["0"]


@pytest.mark.parametrize("method", ["kmeans", "dkm"])
def test_palettize_groups_follow_transposed_axis(transposed_registered, method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Transposed(8, 6))
    pal = palettize(model, bits=2, method=method, granularity="group", group_size=2)
    if method == "dkm":
        finalize_palettized(pal.eval())
    w = pal[0].weight.detach()
    for start in range(0, 6, 2):  # each group of 2 output columns shares one 4-entry LUT
        assert w[:, start:start + 2].unique().numel() <= 4
    assert w.unique().numel() > 4  # ... and the groups differ


class TiedLM(nn.Module):
    """An embedding and an output head sharing one weight (like GPT-2's ``wte`` / ``lm_head``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


@pytest.mark.parametrize("method", ["lsq", "ewgs"])
def test_qat_tied_weight_shares_one_quantizer(method: str) -> None:
    torch.manual_seed(0)
    q = prepare_qat(TiedLM(), method=method, w_bits=3, w_granularity="channel")
    assert q.embed.parametrizations["weight"][0] is q.head.parametrizations["weight"][0]
    ids = torch.randint(0, 12, (4, 5))
    opt = torch.optim.Adam(q.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        q(ids).square().mean().backward()
        opt.step()
    q.eval()
    with torch.no_grad():
        before = q(ids)
        finalize(q)
        assert torch.allclose(q(ids), before, atol=1e-6)
    assert torch.equal(q.embed.weight, q.head.weight)


def test_dkm_tied_weight_shares_one_set_of_centroids() -> None:
    torch.manual_seed(0)
    pal = palettize(TiedLM(), bits=2, method="dkm")
    assert pal.embed.parametrizations["weight"][0] is pal.head.parametrizations["weight"][0]
    finalize_palettized(pal.eval())
    assert torch.equal(pal.embed.weight, pal.head.weight) and pal.head.weight.unique().numel() <= 4


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_ptq_quantizes_a_tied_weight_once(method: str, monkeypatch) -> None:
    """The embedding (no statistics) quantizes the shared weight first; the head is not quantized again
    and records the same parameters for export."""
    from qready.quant.ptq import GPTQ, RTN

    quantized: list[str] = []
    for cls in (RTN, GPTQ):
        original = cls.quantize_layer

        def spy(self, name, module, spec, stats, _original=original):
            quantized.append(name)
            return _original(self, name, module, spec, stats)

        monkeypatch.setattr(cls, "quantize_layer", spy)
    torch.manual_seed(0)
    model = TiedLM()
    calib = [torch.randint(0, 12, (8, 5)) for _ in range(2)]
    spec = QuantSpec(bits=3, granularity="channel", range="mse")
    q = ptq(model, spec, calib=calib, method=method, bias_correction=method == "gptq")
    assert quantized == ["embed"]
    assert q.head.weight is q.embed.weight
    monkeypatch.undo()
    rounded = ptq(model, spec, select={"types": (nn.Embedding,)})
    assert torch.equal(q.embed.weight, rounded.embed.weight)
    head, embed = recorded_params(q.head), recorded_params(q.embed)
    assert torch.equal(head.scale, embed.scale) and torch.equal(head.zero_point, embed.zero_point)
