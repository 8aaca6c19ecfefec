"""The vectorised MSE range search equals the candidate-by-candidate loop it replaced, bit for bit."""

import pytest
import torch

from qready.quant import QuantSpec
from qready.quant.activations import MAX_SAMPLES, ActivationQuantizer
from qready.quant.grid import fake_quantize_rows, to_rows
from qready.quant.ranges import compute_scale_zero_point, observed_range, scale_zero_point_from_range


def reference_mse(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous implementation: one candidate ratio at a time, ties keep the widest range."""
    lo, hi = observed_range(rows, spec)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zp = torch.ones_like(lo), torch.zeros_like(lo)
    for i in range(spec.mse_grid, 0, -1):
        r = i / spec.mse_grid
        scale, zp = scale_zero_point_from_range(lo * r, hi * r, spec)
        fq = fake_quantize_rows(rows, scale[:, None], zp[:, None], spec.qmin, spec.qmax, binary=False)
        err = (fq - rows).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


CASES = [
    # (shape, granularity, group_size, bits, symmetric, percentile, mse_grid)
    ((64, 3, 3, 3), "channel", None, 4, True, 100.0, 100),
    ((64, 3, 3, 3), "channel", None, 3, False, 100.0, 37),
    ((1000,), "tensor", None, 8, False, 100.0, 100),
    ((48, 50), "group", 16, 4, True, 100.0, 100),  # padded groups
    ((48, 50), "group", 16, 2, False, 99.0, 20),  # MSE shrinking of a percentile range
    ((300, 700), "channel", None, 4, True, 100.0, 100),  # several candidate chunks
]


@pytest.mark.parametrize("shape,granularity,group_size,bits,symmetric,percentile,grid", CASES)
def test_mse_search_equals_the_loop(shape, granularity, group_size, bits, symmetric, percentile, grid):
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=gen)
    w.view(-1)[::97] *= 8.0  # outliers, so that shrinking pays off
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size,
                     range="mse", percentile=percentile, mse_grid=grid)
    rows = to_rows(w, granularity, 0, group_size)
    scale, zp = compute_scale_zero_point(rows, spec)
    ref_scale, ref_zp = reference_mse(rows, spec)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(zp, ref_zp)
    widest, _ = scale_zero_point_from_range(*observed_range(rows, spec), spec)
    assert bits == 8 or (scale < widest).any(), "the case must exercise shrinking"


def test_ties_keep_the_widest_range():
    # {-1, 0, 1} lies exactly on the r = 1 grid (error 0); no smaller ratio can beat it
    rows = torch.tensor([[-1.0, 0.0, 1.0]])
    spec = QuantSpec(bits=2, symmetric=True, granularity="tensor", range="mse", mse_grid=10)
    scale, _ = compute_scale_zero_point(rows, spec)
    assert torch.equal(scale, reference_mse(rows, spec)[0])
    assert float(scale) == pytest.approx(1.0 / spec.qmax)


def test_activation_observer_subsample_is_bounded_and_spread():
    q = ActivationQuantizer(QuantSpec(bits=8, granularity="tensor", symmetric=False, range="percentile"))
    x = torch.arange(4 * MAX_SAMPLES, dtype=torch.float32)
    q.observe(x)
    (sample,) = q._samples
    assert sample.numel() == MAX_SAMPLES
    assert torch.isin(sample, x).all()
    assert sample.std() > 0.25 * x.std()  # spread over the whole tensor, not a slice of it
    q.finish_calibration()
    assert float(q.scale) > 0
