"""SAM / ASAM: the ascent formulas, exact restore, closure vs two-step API, rho = 0, BN policy, SAMStep."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qready.sharpness import ASAM, SAM, RhoSchedule, SAMStep, ascent_direction
from qready.train import NonFiniteError, TrainConfig, fit

A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def quadratic_params() -> tuple[nn.Parameter, nn.Parameter]:
    return (nn.Parameter(torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)),
            nn.Parameter(torch.tensor([[0.2, -1.1]], dtype=torch.float64)))


def quadratic_loss(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``½ wᵀAw − bᵀw + ‖v‖²``: gradients ``Aw − b`` and ``2v``."""
    return 0.5 * w @ A @ w - B @ w + (v**2).sum()


def test_sam_first_step_is_w_plus_rho_g_over_global_norm() -> None:
    w, v = quadratic_params()
    w0, v0 = w.detach().clone(), v.detach().clone()
    opt = SAM([w, v], torch.optim.SGD, rho=0.07, lr=0.1)
    quadratic_loss(w, v).backward()
    norm = opt.first_step()
    gw, gv = A @ w0 - B, 2 * v0
    total = torch.sqrt((gw**2).sum() + (gv**2).sum())
    assert norm == pytest.approx(float(total), rel=1e-12)
    torch.testing.assert_close(w.detach(), w0 + 0.07 * gw / total, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v.detach(), v0 + 0.07 * gv / total, rtol=1e-12, atol=1e-14)


def test_asam_first_step_matches_the_formula() -> None:
    w, v = quadratic_params()
    w0, v0 = w.detach().clone(), v.detach().clone()
    opt = ASAM([w, v], torch.optim.SGD, rho=0.5, eta=0.02, lr=0.1)
    assert opt.adaptive
    quadratic_loss(w, v).backward()
    opt.first_step()
    gw, gv = A @ w0 - B, 2 * v0
    tw, tv = w0.abs() + 0.02, v0.abs() + 0.02
    norm = torch.sqrt(((tw * gw) ** 2).sum() + ((tv * gv) ** 2).sum())
    torch.testing.assert_close(w.detach(), w0 + 0.5 * tw**2 * gw / norm, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v.detach(), v0 + 0.5 * tv**2 * gv / norm, rtol=1e-12, atol=1e-14)


def test_zero_gradient_gives_zero_perturbation() -> None:
    eps, norm = ascent_direction([torch.zeros(3), torch.zeros(2, 2)], 0.1)
    assert float(norm) == 0.0 and all(torch.count_nonzero(e) == 0 for e in eps)


class Recorder(torch.optim.SGD):
    """SGD that records the parameter values it sees when ``step`` is called."""

    seen: list[torch.Tensor]

    def step(self, closure=None):  # type: ignore[override]
        self.seen = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def test_second_step_restores_w_exactly_before_the_base_step() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(50) * 3.3)  # float32: w + e - e would not round-trip exactly
    w0 = w.detach().clone()
    opt = SAM([w], Recorder, rho=0.3, lr=0.1)
    ((w**3).sum()).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(w.detach(), w0)
    ((w**3).sum()).backward()
    g_perturbed = w.grad.clone()
    opt.second_step()
    assert torch.equal(opt.base_optimizer.seen[0], w0)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * g_perturbed)


def _toy(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(20, 6)
    y = torch.randint(0, 3, (20,))
    return model, x, y


def test_closure_api_equals_two_step_api() -> None:
    m1, x, y = _toy()
    m2 = copy.deepcopy(m1)
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    for _ in range(3):
        def closure() -> torch.Tensor:
            loss = crit(m1(x), y)
            loss.backward()
            return loss

        l1 = o1.step(closure)
        l2 = crit(m2(x), y)
        l2.backward()
        o2.first_step(zero_grad=True)
        crit(m2(x), y).backward()
        o2.second_step(zero_grad=True)
        assert torch.equal(l1, l2.detach())
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_rho_zero_equals_plain_training_exactly() -> None:
    m1, x, y = _toy(1)
    m2 = copy.deepcopy(m1)
    sam = SAM(m1.parameters(), torch.optim.SGD, rho=0.0, lr=0.3, momentum=0.9, weight_decay=1e-3)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    crit = nn.CrossEntropyLoss()
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = crit(m1(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        sam.step(closure)
        sgd.zero_grad()
        crit(m2(x), y).backward()
        sgd.step()
    assert calls == 4  # one pass per step
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_rho_is_settable_and_validated() -> None:
    w, _ = quadratic_params()
    opt = SAM([w], torch.optim.SGD, lr=0.1)
    opt.rho = 0.2
    assert opt.rho == 0.2
    with pytest.raises(ValueError, match="rho"):
        opt.rho = -1.0
    with pytest.raises(TypeError, match="base_optimizer_cls"):
        SAM([w], "sgd", lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="gradient"):
        opt.first_step()


def test_bn_statistics_come_from_the_first_pass_only() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    crit = nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        loss = crit(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        reference(x)  # one pass at the unperturbed weights
    bn, ref = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_a_failing_second_pass_leaves_weights_untouched() -> None:
    model, x, y = _toy(3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise NonFiniteError("loss is nan")
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(NonFiniteError):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))


def test_samstep_rho_zero_in_fit_equals_the_standard_step() -> None:
    cfg = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", schedule="none")
    m1, _, _ = _toy(4)
    m2 = copy.deepcopy(m1)
    fit(m1, _loader(), cfg, step_strategy=SAMStep(rho=0.0), seed=0, progress=False)
    fit(m2, _loader(), cfg, seed=0, progress=False)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_samstep_with_warmup_schedule_trains_and_logs() -> None:
    model, _, _ = _toy(5)
    passes = 0

    def count(*_: object) -> None:
        nonlocal passes
        passes += 1

    model.register_forward_hook(count)
    cfg = TrainConfig(epochs=3, lr=0.05, optimizer="sgd", schedule="none")
    result = fit(model, _loader(), cfg, step_strategy=SAMStep(rho=RhoSchedule(0.05, warmup_epochs=1)), seed=0,
                 progress=False)
    steps = len(_loader())
    assert passes == steps * 1 + steps * 2 * 2  # epoch 0: one pass per step, then two
    h = result.history
    assert h[0]["rho"] == 0.0 and "sharpness" not in h[0]
    assert h[1]["rho"] == pytest.approx(0.05) and h[2]["ascent_grad_norm"] > 0
    assert h[2]["train_loss"] < h[0]["train_loss"]
