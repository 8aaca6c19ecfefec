"""QAT quantizer modules: gradients against the published formulas, Hutchinson traces, statistics."""

import math

import pytest
import torch

from qready.quant import compute_qparams, fake_quantize
from qready.quant.qat.hessian import hutchinson_trace
from qready.quant.qat.quantizers import (
    EWGSActivationQuantizer,
    EWGSRound,
    EWGSWeightQuantizer,
    LSQActivationQuantizer,
    LSQWeightQuantizer,
    RunningStats,
    STEActivationQuantizer,
    STEWeightQuantizer,
    grad_scale,
    lsq_bounds,
    lsq_quantize,
    straight_through,
)
from qready.quant.spec import QuantSpec


def _lsq_reference_grads(v, s, up, q_n, q_p, g):
    """Esser et al. (2020), eq. 3 and the STE: d v_hat/d s and d v_hat/d v, summed against ``up``."""
    r = v / s
    below, above = r <= -q_n, r >= q_p
    inside = ~(below | above)
    dvhat_ds = torch.where(below, -float(q_n) * torch.ones_like(r), torch.where(above, float(q_p) * torch.ones_like(r),
                                                                                 torch.round(r) - r))
    return (up * dvhat_ds).sum() * g, up * inside


@pytest.mark.parametrize("bits,signed", [(2, True), (3, True), (4, True), (8, True), (2, False), (4, False)])
def test_lsq_step_gradient_matches_published_formula(bits, signed):
    gen = torch.Generator().manual_seed(bits)
    v = torch.randn(500, generator=gen, dtype=torch.float64) * 2
    if not signed:
        v = v.abs()
    q_n, q_p = lsq_bounds(bits, signed)
    s = torch.tensor(0.6 * v.abs().max().item() / q_p, dtype=torch.float64, requires_grad=True)  # clips the top
    up = torch.randn(500, generator=gen, dtype=torch.float64)
    v.requires_grad_(True)
    g = 1 / math.sqrt(v.numel() * q_p)
    out = lsq_quantize(v, s, q_n, q_p, g)
    (out * up).sum().backward()
    ref_s, ref_v = _lsq_reference_grads(v.detach(), s.detach(), up, q_n, q_p, g)
    assert torch.allclose(s.grad, ref_s, rtol=1e-10, atol=1e-12)
    assert torch.allclose(v.grad, ref_v, rtol=1e-12, atol=0)
    clipped = (v.detach() / s.detach() > q_p) | (v.detach() / s.detach() < -q_n)
    assert clipped.any()  # the test covers the clipped branch
    expected = torch.clamp(torch.round(v.detach() / s.detach()), -q_n, q_p) * s.detach()
    assert torch.allclose(out.detach(), expected)


def test_lsq_binary_form():
    v = torch.tensor([-2.0, -0.3, 0.0, 0.2, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    out = lsq_quantize(v, s, 1, 1, g=0.25, binary=True)
    assert torch.equal(out.detach(), torch.tensor([-0.5, -0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64))
    out.sum().backward()
    r = v.detach() / 0.5
    inside = r.abs() <= 1
    sign = torch.where(r >= 0, 1.0, -1.0).double()
    assert torch.allclose(s.grad, 0.25 * torch.where(inside, sign - r, sign).sum())
    assert torch.allclose(v.grad, inside.double(), rtol=1e-12, atol=0)


def test_lsq_weight_quantizer_init_and_levels():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    q = LSQWeightQuantizer(w, bits=3)
    rows = w.reshape(6, -1)
    assert torch.allclose(q.step.detach().squeeze(1), 2 * rows.abs().mean(1) / math.sqrt(3))
    assert q.grad_factor == pytest.approx(1 / math.sqrt(27 * 3))
    out = q(w)
    for row, step in zip(out.reshape(6, -1), q.step.detach(), strict=True):
        codes = row / step
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert row.unique().numel() <= 8 and codes.min() >= -4 - 1e-4 and codes.max() <= 3 + 1e-4
    binary = LSQWeightQuantizer(w, bits=1)
    assert torch.allclose(binary.step.detach().squeeze(1), rows.abs().mean(1))


def test_grad_scale_and_straight_through_are_exact():
    x = torch.tensor([0.1, 0.3, 1.7, -2.2], requires_grad=True)
    y = grad_scale(x, 0.37)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full((4,), 0.37))
    x.grad = None
    q = straight_through(x, torch.round(x))
    assert torch.equal(q, torch.round(x.detach()))
    (q * torch.arange(4.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(4.0))


@pytest.mark.parametrize("delta", [0.0, 1e-3, 0.5])
def test_ewgs_backward_matches_formula(delta):
    gen = torch.Generator().manual_seed(0)
    x_n = torch.rand(1000, generator=gen, dtype=torch.float64, requires_grad=True)
    up = torch.randn(1000, generator=gen, dtype=torch.float64)
    levels = 3
    x_q = EWGSRound.apply(x_n, levels, torch.tensor(delta, dtype=torch.float64))
    assert torch.equal(x_q.detach(), torch.round(x_n.detach() * levels) / levels)
    x_q.backward(up)
    expected = up * (1 + delta * torch.sign(up) * (x_n.detach() - x_q.detach()))
    assert torch.allclose(x_n.grad, expected, rtol=0, atol=1e-15)


def test_ewgs_quantizer_forward_grid_and_bound_gradients():
    torch.manual_seed(0)
    w = torch.randn(4, 10, dtype=torch.float64)
    q = EWGSWeightQuantizer(w, bits=2, delta=0.0).double()
    assert torch.allclose(q.upper.detach(), 3 * w.std(correction=0))
    out = q(w)
    lo, hi = q.lower.detach(), q.upper.detach()
    levels = lo + (hi - lo) * torch.arange(4, dtype=torch.float64) / 3
    assert torch.isclose(out.detach().reshape(-1, 1), levels.reshape(1, -1)).any(1).all()
    # d out / d upper for a value clipped at the top is exactly 1 and the sum over all matches the chain rule
    x = torch.tensor([[100.0, -100.0]], dtype=torch.float64)
    q.zero_grad()
    q(x).sum().backward()
    assert q.upper.grad.item() == pytest.approx(1.0) and q.lower.grad.item() == pytest.approx(1.0)


def test_ewgs_activation_init_post_relu_and_signed():
    relu = EWGSActivationQuantizer(bits=4)
    x = torch.relu(torch.randn(4096, generator=torch.Generator().manual_seed(0)))
    relu(x)
    sigma = x.std(correction=0).item() / math.sqrt(1 - 2 / math.pi)
    assert relu.lower.item() == 0.0 and relu.upper.item() == pytest.approx(min(3 * sigma, x.max().item()), rel=1e-5)
    signed = EWGSActivationQuantizer(bits=4)
    y = torch.randn(4096, generator=torch.Generator().manual_seed(1)) + 2
    signed(y)
    assert signed.signed
    assert signed.lower.item() == pytest.approx(max(y.mean() - 3 * y.std(correction=0), y.min()).item(), rel=1e-4)


def test_lsq_activation_sign_and_init():
    relu = LSQActivationQuantizer(bits=4)
    x = torch.relu(torch.randn(8, 100, generator=torch.Generator().manual_seed(0)))
    out = relu(x)
    assert not relu.signed
    assert relu.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-5)
    assert out.min() >= 0 and (out / relu.step.detach()).round().unique().numel() <= 16
    signed = LSQActivationQuantizer(bits=4)
    signed(x - 0.5)
    assert signed.signed and lsq_bounds(4, True) == (8, 7)


def test_ste_activation_masks_gradient_outside_range_and_tracks_ema():
    q = STEActivationQuantizer(bits=4, momentum=0.5)
    q(torch.linspace(0.0, 3.0, 100))  # initialises the range to [0, 3]
    assert q.lo.item() == 0.0 and q.hi.item() == pytest.approx(3.0, abs=1e-6)
    q.eval()
    x = torch.tensor([-5.0, -0.5, 0.0, 1.0, 2.9, 9.0], requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0]))
    assert q.hi.item() == pytest.approx(3.0, abs=1e-6)  # eval mode: fixed
    q.train()
    q(torch.linspace(0.0, 7.0, 100))
    assert q.hi.item() == pytest.approx(5.0, abs=1e-5)  # 0.5 * 3 + 0.5 * 7


def test_ste_weight_quantizer_is_fake_quantize_and_masks_clipped():
    torch.manual_seed(0)
    w = torch.randn(4, 200)
    w[:, 0] = 4.0  # outliers the MSE range clips
    spec = QuantSpec(bits=3, range="mse")
    q = STEWeightQuantizer(w, bits=3, range="mse")
    w = w.clone().requires_grad_(True)
    out = q(w)
    assert torch.equal(out, fake_quantize(w.detach(), spec))
    out.sum().backward()
    scale = compute_qparams(w.detach(), spec).scale[:, None]
    clipped = (torch.round(w.detach() / scale) > spec.qmax) | (torch.round(w.detach() / scale) < spec.qmin)
    assert clipped[:, 0].all()
    assert torch.equal(w.grad, (~clipped).float())


def test_running_stats():
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(7, 5, generator=gen) for _ in range(3)]
    st = RunningStats()
    for p in parts:
        st.update(p)
    full = torch.cat([p.reshape(-1) for p in parts]).double()
    assert st.mean == pytest.approx(full.mean().item())
    assert st.std == pytest.approx(full.std(correction=0).item())
    assert st.mean_abs == pytest.approx(full.abs().mean().item())
    assert (st.lo, st.hi) == (pytest.approx(full.min().item()), pytest.approx(full.max().item()))


def test_hutchinson_trace_matches_exact_hessian():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    m = torch.randn(8, 8, generator=gen, dtype=torch.float64)

    def f(a, b):
        z = torch.cat([a, b])
        return torch.log1p((m @ z).pow(2).sum()) + (a.pow(3)).sum() + torch.sin(b).sum()

    loss = f(a, b)
    grads = torch.autograd.grad(loss, [a, b], create_graph=True)
    est = hutchinson_trace(grads, [a, b], samples=3000, generator=torch.Generator().manual_seed(1))
    h = torch.autograd.functional.hessian(f, (a.detach(), b.detach()))
    exact = torch.tensor([torch.diagonal(h[0][0]).sum().item(), torch.diagonal(h[1][1]).sum().item()])
    assert torch.allclose(est, exact.double(), rtol=0.1, atol=0.1)


def test_hutchinson_trace_exact_for_separable_function():
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, dtype=torch.float64, requires_grad=True)
    loss = (x.pow(2) * torch.arange(10.0)).sum() + y.exp().sum()
    grads = torch.autograd.grad(loss, [x, y], create_graph=True)
    est = hutchinson_trace(grads, [x, y], samples=1)
    assert est[0].item() == pytest.approx(2 * 45.0)
    assert est[1].item() == pytest.approx(y.exp().sum().item())
