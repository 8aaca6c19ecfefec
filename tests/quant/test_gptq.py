"""GPTQ: the recursion against references, every layer type, bit widths, export, batch forms."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qready.data import load_dataset
from qready.models import create_model
from qready.quant import QuantSpec, compute_qparams, dequantize, fake_quantize, ptq
from qready.quant.ptq import UniformGrid, correct_bias, gptq_matrix, layer_error
from qready.quant.ptq.capture import StatsCollector, im2col, input_columns, weight_matrix
from qready.quant.ptq.params import recorded_codes
from qready.quant.ptq.passes import capture_stats

SPECS = [
    QuantSpec(bits=4),
    QuantSpec(bits=3, symmetric=False, range="mse", mse_grid=20),
    QuantSpec(bits=3, granularity="group", group_size=8),
    QuantSpec(bits=2, symmetric=False, granularity="group", group_size=5, range="percentile", percentile=99.0),
    QuantSpec(bits=4, granularity="tensor"),
    QuantSpec(bits=1, granularity="group", group_size=8),
]


def _weight(rows=6, cols=21, seed=0, dtype=torch.float32):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _hessian(cols, n=64, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g, dtype=dtype) @ torch.randn(cols, cols, generator=g, dtype=dtype)
    return 2 * x.T @ x / n


def _grid(spec, w, act_order=False):
    return UniformGrid(spec, w, (1, *w.shape), dynamic=spec.granularity == "group" and not act_order)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_is_round_to_nearest(spec, act_order):
    w = _weight()
    q = gptq_matrix(w[None], torch.eye(w.shape[1], dtype=torch.float64)[None], _grid(spec, w, act_order),
                    block_size=4, act_order=act_order)
    assert torch.equal(q[0], fake_quantize(w, spec))


def _reference(w, h, spec, damp, order):
    """The paper's recursion in float64, one column at a time, with the inverse Hessian of the remaining
    columns updated by Gaussian elimination (no Cholesky, no blocks)."""
    w = w.clone()
    k = w.shape[1]
    h = h + damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    static = compute_qparams(w, spec) if spec.granularity != "group" or order is not None else None
    channel = QuantSpec(bits=spec.bits, symmetric=spec.symmetric, range=spec.range, mse_grid=spec.mse_grid,
                        percentile=spec.percentile)
    group_params = None
    for j in (order if order is not None else range(k)):
        if static is not None:
            q[:, j] = fake_quantize(w, spec, static)[:, j]
        else:
            start = j - j % spec.group_size
            if j == start:  # scales of this group from its current values
                group_params = compute_qparams(w[:, start:start + spec.group_size].clone(), channel)
            q[:, j] = fake_quantize(w[:, j:j + 1], channel, group_params)[:, 0]
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w -= err[:, None] * hinv[j][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return q


@pytest.mark.parametrize("spec", SPECS[:4], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_slow_float64_reference(spec, act_order):
    w = _weight(dtype=torch.float64)
    h = _hessian(w.shape[1])
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist() if act_order else None
    expected = _reference(w, h, spec, 0.01, order)
    got = gptq_matrix(w[None], h[None], _grid(spec, w, act_order), block_size=4, damp=0.01, act_order=act_order)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_block_size_does_not_change_the_result():
    w, h = _weight(), _hessian(21)
    spec = QuantSpec(bits=3, granularity="group", group_size=4)
    results = [gptq_matrix(w[None], h[None], _grid(spec, w), block_size=b) for b in (1, 4, 7, 128)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=0, atol=1e-5)


def test_dead_columns_are_rounded_and_isolated():
    w = _weight()
    h = _hessian(21)
    h[:, 3] = 0
    h[3, :] = 0
    spec = QuantSpec(bits=3)
    q = gptq_matrix(w[None], h[None], _grid(spec, w))[0]
    assert torch.equal(q[:, 3], fake_quantize(w, spec)[:, 3])
    assert torch.isfinite(q).all()


CONVS = [
    nn.Conv1d(4, 6, 5, stride=2, padding=2),
    nn.Conv2d(4, 6, 3, stride=(1, 2), padding=1, dilation=(2, 1)),
    nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect", groups=2),
    nn.Conv2d(6, 6, 3, stride=2, groups=6),
    nn.Conv3d(2, 4, (2, 3, 3), padding=(1, 0, 1), stride=(1, 2, 1)),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: repr(c))
def test_conv_is_the_linear_on_its_im2col(conv):
    torch.manual_seed(0)
    x = torch.randn(3, conv.in_channels, *[7] * len(conv.kernel_size))
    y = conv(x) - conv.bias.view(1, -1, *[1] * len(conv.kernel_size))
    cols = input_columns(conv, x)  # [G, N, K]
    out = torch.bmm(cols, weight_matrix(conv).transpose(1, 2))  # [G, B*L, R]
    groups, _, rows = out.shape
    expected = y.reshape(3, groups, rows, -1).permute(1, 0, 3, 2).reshape(groups, -1, rows)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros":
        unfolded = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        torch.testing.assert_close(im2col(conv, x), unfolded)


def test_depthwise_and_grouped_equal_separate_convs():
    torch.manual_seed(0)
    for groups in (2, 6):
        conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups, bias=False)
        calib = [torch.randn(8, 6, 6, 6) for _ in range(2)]
        q = ptq(nn.Sequential(conv), QuantSpec(bits=3), calib=calib, method="gptq")[0].weight
        per = 6 // groups
        for g in range(groups):
            part = nn.Conv2d(per, per, 3, padding=1, bias=False)
            part.weight.data.copy_(conv.weight[g * per:(g + 1) * per])
            part_calib = [x[:, g * per:(g + 1) * per] for x in calib]
            qg = ptq(nn.Sequential(part), QuantSpec(bits=3), calib=part_calib, method="gptq")[0].weight
            torch.testing.assert_close(q[g * per:(g + 1) * per], qg, rtol=0, atol=1e-6)
        collector = StatsCollector(conv, with_hessian=True)
        collector.add(calib[0])
        assert tuple(collector.stats.xx.shape) == (groups, 9 * per, 9 * per)


def _inputs(splits, n):
    x, _ = next(iter(torch.utils.data.DataLoader(splits.train, batch_size=n)))
    return x


def _zoo():
    """Zoo models with real calibration inputs (digits and MNIST-1D)."""
    digits = _inputs(load_dataset("digits", seed=0), 128)
    mnist = _inputs(load_dataset("mnist1d", seed=0, num_samples=600), 128)
    return [
        (create_model("dwcnn", num_classes=10, in_channels=1, width=8), digits),
        (create_model("cnn1d", num_classes=10, in_channels=1, width=8), mnist),
        (create_model("mlp", num_classes=10, in_features=64), digits.flatten(1)),
    ]


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=3, granularity="group", group_size=16),
                                  QuantSpec(bits=2, symmetric=False, range="mse", mse_grid=20)], ids=str)
def test_reconstruction_error_never_above_round_to_nearest_on_zoo_models(spec):
    torch.manual_seed(0)
    for model, x in _zoo():
        model.eval()
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        stats = capture_stats(model, layers, list(x.split(32)), with_hessian=True)
        assert set(stats) == {n for n, _ in layers}
        qmodel = ptq(model, spec, calib=list(x.split(32)), method="gptq", sequential=False)
        for name, module in layers:
            h = stats[name].hessian()
            original = weight_matrix(module).detach()
            rtn = weight_matrix(module, fake_quantize(module.weight.detach(), spec)) - original
            gptq = weight_matrix(module, qmodel.get_submodule(name).weight.detach()) - original
            assert layer_error(gptq, h) <= layer_error(rtn, h) * (1 + 1e-6), (type(model).__name__, name)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_bit_width(bits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    calib = [torch.randn(64, 12) for _ in range(2)]
    q = ptq(model, QuantSpec(bits=bits), calib=calib, method="gptq")
    for layer in (q[0], q[2]):
        for row in layer.weight:
            assert row.unique().numel() <= 2 ** bits
    # the recorded scales reproduce the quantized weights exactly
    for layer in (q[0], q[2]):
        codes, params = recorded_codes(layer, spec=QuantSpec(bits=bits))
        assert torch.equal(dequantize(codes, params), layer.weight)


def test_act_order_static_groups_export_like_round_to_nearest(tmp_path):
    from qready.export import load_packed, save_packed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    spec = QuantSpec(bits=3, granularity="group", group_size=8)
    calib = [torch.randn(64, 24) @ torch.randn(24, 24) for _ in range(2)]
    files = {}
    for label, kwargs in {"rtn": {}, "gptq": {"method": "gptq", "act_order": True}}.items():
        q = ptq(model, spec, calib=calib, **kwargs)
        info = save_packed(q, tmp_path / f"{label}.qready", spec_or_bits=spec)
        assert set(info["layers"].values()) == {"uniform"}
        loaded = load_packed(tmp_path / f"{label}.qready", lambda: nn.Sequential(nn.Linear(24, 16), nn.ReLU(),
                                                                                   nn.Linear(16, 4)))
        for a, b in zip(loaded.state_dict().values(), q.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        files[label] = info
    assert files["gptq"]["bytes"] == files["rtn"]["bytes"]


class _KwargsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 12)
        self.b = nn.Linear(12, 3)

    def forward(self, features, scale=1.0):
        return self.b(torch.relu(self.a(features * scale)))


def test_dict_batches_give_the_tensor_batch_result():
    torch.manual_seed(0)
    model = _KwargsNet()
    xs = [torch.randn(32, 10) for _ in range(2)]
    from_dicts = ptq(model, 3, calib=[({"features": x}, torch.zeros(32)) for x in xs], method="gptq",
                     bias_correction=True)
    seq = nn.Sequential(model.a, nn.ReLU(), model.b)
    from_tensors = ptq(seq, 3, calib=xs, method="gptq", bias_correction=True)
    assert torch.equal(from_dicts.a.weight, from_tensors[0].weight)
    assert torch.equal(from_dicts.b.bias, from_tensors[2].bias)


def test_nan_input_is_refused():
    model = nn.Sequential(nn.Linear(4, 2))
    bad = torch.randn(8, 4)
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        ptq(model, 4, calib=[bad], method="gptq")


def test_embedding_falls_back_to_round_to_nearest_and_sequential_differs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    calib = [torch.randint(0, 20, (32, 3)) for _ in range(2)]
    q = ptq(model, 3, calib=calib, method="gptq")
    assert torch.equal(q[0].weight, fake_quantize(model[0].weight, QuantSpec(bits=3)))
    once = ptq(model, 3, calib=calib, method="gptq", sequential=False)
    assert not torch.equal(once[2].weight, q[2].weight)  # sequential: it sees the quantized embedding


def _schedule_case(name: str) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    if name == "dwcnn":
        return (create_model("dwcnn", num_classes=10, in_channels=1, width=8).eval(),
                list(_inputs(load_dataset("digits", seed=0), 64).split(32)))
    # residual blocks inside nn.Sequential stages, each holding an nn.Sequential branch: the branches'
    # outputs are replayed when the block around them is advanced
    model = create_model(name, num_classes=10, in_channels=3).eval()
    return model, [torch.randn(8, 3, 32, 32) for _ in range(2)]


@pytest.mark.parametrize("name", ["dwcnn", "mobilenet_v2", "resnet20"])
def test_cached_sequential_schedule_equals_one_full_pass_per_layer(name):
    """The schedule that advances cached activations through nn.Sequential children (and replays the
    outputs of finished containers) gives the result of the plain definition: each layer's statistics
    from full passes through the partly quantized model."""
    from qready.quant.ptq import GPTQ

    model, calib = _schedule_case(name)
    fast = ptq(model, 3, calib=calib, method="gptq", bias_correction=True)
    assert not [n for n, m in fast.named_modules() if "forward" in vars(m)]  # no replay left behind
    slow = copy.deepcopy(model)
    layers = [(n, m) for n, m in slow.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, module in layers:
        stats = capture_stats(slow, [(name, module)], calib, with_hessian=True)[name]
        original = module.weight.detach().clone()
        GPTQ().quantize_layer(name, module, QuantSpec(bits=3), stats)
        correct_bias(module, original, stats)
    for (layer, module), (_, other) in zip(layers, [(n, fast.get_submodule(n)) for n, _ in layers], strict=True):
        torch.testing.assert_close(other.weight, module.weight, rtol=0, atol=1e-5, msg=layer)
        if module.bias is not None:
            torch.testing.assert_close(other.bias, module.bias, rtol=0, atol=1e-5, msg=layer)
    torch.testing.assert_close(fast(calib[0]), slow(calib[0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("group", 4)])
def test_palettization_variant_keeps_the_kmeans_luts_and_lowers_the_error(granularity, group_size):
    from qready.quant import palettize
    from qready.quant.palettize.codebook import channel_groups, kmeans_lut

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    calib = [torch.randn(64, 24) @ torch.randn(24, 24) for _ in range(2)]
    kwargs = {"granularity": granularity, "group_size": group_size}
    plain = palettize(model, bits=2, method="kmeans", **kwargs)
    fed = palettize(model, bits=2, method="gptq", calib=calib, sequential=False, **kwargs)
    with pytest.raises(ValueError, match="calib"):
        palettize(model, bits=2, method="gptq", **kwargs)
    stats = capture_stats(model, [("0", model[0]), ("2", model[2])], calib, with_hessian=True)
    for name in ("0", "2"):
        w = model.get_submodule(name).weight
        groups = channel_groups(tuple(w.shape), group_size)
        groups = torch.zeros(w.numel(), dtype=torch.long) if groups is None else groups
        lut = kmeans_lut(w, 2, group_size)  # [G, 4]: the LUTs "kmeans" snaps to
        values = fed.get_submodule(name).weight.reshape(-1)
        assert bool((values[:, None] == lut[groups]).any(dim=1).all())  # each value is in its group's LUT
        h = stats[name].hessian()
        err = {label: layer_error(weight_matrix(m.get_submodule(name), m.get_submodule(name).weight.detach() - w.detach()), h)
               for label, m in (("kmeans", plain), ("gptq", fed))}
        assert err["gptq"] <= err["kmeans"]
    assert any(not torch.equal(fed[i].weight, plain[i].weight) for i in (0, 2))
