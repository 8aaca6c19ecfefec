"""Fake quantization, codes and ranges: against PyTorch's own kernels and by properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qready.quant import QuantSpec, compute_qparams, dequantize, fake_quantize, quantize


def _weights(seed: int = 0, shape=(16, 8, 3, 3)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w.view(-1)[0] = 6.0  # an outlier, so ranges differ between methods
    return w


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_matches_torch(bits, symmetric):
    w = _weights(bits)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel")
    p = compute_qparams(w, spec)
    ref = torch.fake_quantize_per_channel_affine(w, p.scale, p.zero_point, 0, p.qmin, p.qmax)
    assert torch.equal(fake_quantize(w, spec), ref)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_matches_torch(bits, symmetric):
    w = _weights(100 + bits)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="tensor")
    p = compute_qparams(w, spec)
    ref = torch.fake_quantize_per_tensor_affine(w, float(p.scale), int(p.zero_point), p.qmin, p.qmax)
    assert torch.equal(fake_quantize(w, spec), ref)


@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_gradient_matches_torch(symmetric):
    w = _weights(7)
    spec = QuantSpec(bits=3, symmetric=symmetric, granularity="channel", range="percentile", percentile=90.0)
    p = compute_qparams(w, spec)
    a = w.clone().requires_grad_(True)
    b = w.clone().requires_grad_(True)
    upstream = torch.randn_like(w)
    (fake_quantize(a, spec) * upstream).sum().backward()
    ref = torch.fake_quantize_per_channel_affine(b, p.scale, p.zero_point, 0, p.qmin, p.qmax)
    (ref * upstream).sum().backward()
    assert torch.equal(a.grad, b.grad)
    assert (a.grad == 0).any(), "percentile clipping must zero some gradients"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_roundtrip(bits, granularity, symmetric):
    w = _weights(bits, shape=(6, 10))
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity,
                     group_size=4 if granularity == "group" else None)
    codes, params = quantize(w, spec)
    assert codes.shape == w.shape
    assert not codes.is_floating_point()
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    assert torch.equal(dequantize(codes, params), fake_quantize(w, spec))


def test_one_bit_is_sign_times_mean_abs():
    w = _weights(3, shape=(4, 9))
    out = fake_quantize(w, QuantSpec(bits=1, granularity="channel"))
    expected = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(out, expected)


def test_group_padding_keeps_shape_and_uses_own_scale():
    w = _weights(5, shape=(3, 10))
    spec = QuantSpec(bits=4, granularity="group", group_size=4)
    p = compute_qparams(w, spec)
    assert p.num_groups == 3 * 3  # ceil(10 / 4) groups per channel
    out = fake_quantize(w, spec)
    assert out.shape == w.shape
    # each group of 4 (last group of 2) is quantized independently: its own max is on the grid
    for c in range(3):
        for start in range(0, 10, 4):
            g = w[c, start:start + 4]
            assert torch.isclose(out[c, start:start + 4].abs().max(), g.abs().max())


def test_mse_and_percentile_clip_an_outlier():
    w = _weights(11, shape=(1, 4096))
    w[0, 0] = 40.0
    errs = {}
    for rng in ("minmax", "mse", "percentile"):
        spec = QuantSpec(bits=3, granularity="tensor", range=rng, percentile=99.0)
        errs[rng] = float((fake_quantize(w, spec) - w).pow(2).sum())
    assert errs["mse"] < 0.5 * errs["minmax"]
    assert errs["percentile"] < errs["minmax"]


def test_other_axis():
    w = _weights(2, shape=(5, 7))
    by_col = fake_quantize(w, QuantSpec(bits=3, axis=1))
    ref = fake_quantize(w.t().contiguous(), QuantSpec(bits=3, axis=0)).t()
    assert torch.equal(by_col, ref)


@pytest.mark.parametrize("bad", [0, 9, "four", 4.0, True, -1])
def test_bad_bits(bad):
    with pytest.raises((ValueError, TypeError), match="bits"):
        QuantSpec(bits=bad)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"granularity": "row"}, "granularity"),
        ({"range": "kl"}, "range"),
        ({"granularity": "group"}, "group_size"),
        ({"group_size": 8}, "group_size"),
        ({"percentile": 0.0}, "percentile"),
    ],
)
def test_bad_spec_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        QuantSpec(**kwargs)
    if field in ("granularity", "range"):
        assert "channel" in str(err.value) or "minmax" in str(err.value)  # lists the allowed values


def test_bad_tensors():
    with pytest.raises(TypeError):
        fake_quantize(torch.arange(4), QuantSpec())
    with pytest.raises(ValueError, match="NaN"):
        fake_quantize(torch.tensor([1.0, float("nan")]), QuantSpec(granularity="tensor"))
    with pytest.raises(ValueError, match="axis"):
        fake_quantize(torch.ones(3, 3), QuantSpec(axis=2))


# ---------------------------------------------------------------- properties
_float = st.floats(min_value=-100, max_value=100, allow_nan=False, width=32)
_matrix = st.integers(1, 6).flatmap(
    lambda c: st.integers(1, 12).flatmap(
        lambda k: st.lists(_float, min_size=c * k, max_size=c * k).map(lambda v: torch.tensor(v).reshape(c, k))
    )
)
_specs = st.builds(
    QuantSpec,
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel"]),
    range=st.sampled_from(["minmax", "mse", "percentile"]),
    percentile=st.sampled_from([90.0, 99.0, 100.0]),
    mse_grid=st.sampled_from([10, 50]),
)


@settings(max_examples=150, deadline=None)
@given(w=_matrix, spec=_specs)
def test_at_most_2_pow_b_levels_per_channel(w, spec):
    out = fake_quantize(w, spec)
    for row in out:
        assert row.unique().numel() <= 2**spec.bits


@settings(max_examples=150, deadline=None)
@given(w=_matrix, spec=_specs)
def test_error_at_most_half_step_inside_range(w, spec):
    p = compute_qparams(w, spec)
    scale = p.scale[:, None] if spec.granularity == "channel" else p.scale.reshape(1, 1)
    zp = p.zero_point.float()[:, None] if spec.granularity == "channel" else p.zero_point.float().reshape(1, 1)
    lo, hi = (spec.qmin - zp) * scale, (spec.qmax - zp) * scale
    inside = (w >= lo) & (w <= hi)
    err = (fake_quantize(w, spec) - w).abs()
    bound = (scale / 2) * (1 + 1e-5) + 1e-6
    assert bool((err <= bound)[inside].all() if inside.any() else True)


@settings(max_examples=150, deadline=None)
@given(w=_matrix, spec=_specs)
def test_idempotent_on_its_grid(w, spec):
    p = compute_qparams(w, spec)
    once = fake_quantize(w, spec, p)
    assert torch.equal(fake_quantize(once, spec, p), once)


@settings(max_examples=100, deadline=None)
@given(w=_matrix, bits=st.integers(2, 8), granularity=st.sampled_from(["tensor", "channel"]))
def test_symmetric_minmax_requantization_is_stable(w, bits, granularity):
    spec = QuantSpec(bits=bits, granularity=granularity)
    once = fake_quantize(w, spec)
    torch.testing.assert_close(fake_quantize(once, spec), once, rtol=1e-5, atol=1e-6)


@settings(max_examples=150, deadline=None)
@given(w=_matrix, bits=st.integers(2, 8), symmetric=st.booleans(), granularity=st.sampled_from(["tensor", "channel"]))
def test_mse_error_never_above_minmax(w, bits, symmetric, granularity):
    base = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, mse_grid=20)
    mse = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, range="mse", mse_grid=20)
    e_minmax = float((fake_quantize(w, base) - w).pow(2).sum())
    e_mse = float((fake_quantize(w, mse) - w).pow(2).sum())
    assert e_mse <= e_minmax * (1 + 1e-6) + 1e-9
