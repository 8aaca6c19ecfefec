"""SAQ: the perturbation sits on Q(w), is computed from dL/dQ(w), and w is restored bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qready.quant import finalize, prepare_qat, qat_param_groups
from qready.sharpness import SAQ, Perturbation, RhoSchedule, SAQStep
from qready.train import NonFiniteError, TrainConfig, fit

LAYERS = ("0", "2")


def float_model(seed: int = 0, bn: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)]
    if bn:
        layers.insert(1, nn.BatchNorm1d(10))
    return nn.Sequential(*layers)


def qat_model(seed: int = 0, a_bits: int | None = None, bn: bool = False) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = torch.randn(24, 6, generator=torch.Generator().manual_seed(seed)), torch.arange(24) % 3
    model = prepare_qat(float_model(seed, bn), method="lsq", w_bits=3, a_bits=a_bits, calib=[x])
    return model, x, y


def baked(model: nn.Module, seed: int) -> nn.Module:
    """A plain float copy (weight-only QAT model, no BN) whose weights ARE Q(w): its weight gradients
    are dL/dQ(w). (Not ``finalize(deepcopy(model))``: torch's deepcopy of a parametrized module shares
    its class, so removing the copy's parametrizations would break ``model``.)"""
    ref = float_model(seed)
    with torch.no_grad():
        for n in LAYERS:
            ref[int(n)].weight.copy_(model[int(n)].weight)
            ref[int(n)].bias.copy_(model[int(n)].bias)
    return ref


def grads_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names=LAYERS) -> list[torch.Tensor]:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    mods = dict(model.named_modules())
    return [mods[n].weight.grad.detach().clone() for n in names]


def test_second_pass_sees_q_plus_eps_and_eps_follows_grad_wrt_q() -> None:
    model, x, y = qat_model()
    ref = baked(model, 0)
    q = [ref[int(n)].weight.detach().clone() for n in LAYERS]
    g = grads_at(ref, x, y)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    eps = [0.3 * t / norm for t in g]

    seen: dict[str, list[torch.Tensor]] = {n: [] for n in LAYERS}
    for n in LAYERS:
        model[int(n)].register_forward_hook(lambda m, a, o, n=n: seen[n].append(m.weight.detach().clone()))
    originals = [model[int(n)].parametrizations.weight.original for n in LAYERS]
    saved = [w.detach().clone() for w in originals]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saq = SAQ(model, rho=0.3)

    opt.zero_grad()
    with saq.ascent():
        nn.functional.cross_entropy(model(x), y).backward()
    saq.perturb()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    saq.restore()

    for i, n in enumerate(LAYERS):
        first, second = seen[n]
        assert torch.equal(first, q[i])  # ascent pass: Q(w) (+ a zero probe)
        torch.testing.assert_close(second, q[i] + eps[i], rtol=1e-5, atol=1e-7)
        assert torch.equal(originals[i], saved[i])  # w itself never moved
        assert torch.equal(model[int(n)].weight, q[i])  # back to Q(w) after restore
    # descent gradient wrt w = dL/dW at W = Q(w) + eps, through LSQ's straight-through estimator
    for i, n in enumerate(LAYERS):
        ref[int(n)].weight.data.copy_(q[i] + eps[i])
    g2 = grads_at(ref, x, y)
    for i, n in enumerate(LAYERS):
        quant = model[int(n)].parametrizations.weight[0]
        ratio = originals[i].detach() / quant.step.detach()
        inside = ((ratio >= -quant.q_n) & (ratio <= quant.q_p)).float()
        torch.testing.assert_close(originals[i].grad, g2[i] * inside, rtol=1e-4, atol=1e-6)


def test_adaptive_saq_uses_abs_q_plus_eta() -> None:
    model, x, y = qat_model(1)
    ref = baked(model, 1)
    q = [ref[int(n)].weight.detach().clone() for n in LAYERS]
    g = grads_at(ref, x, y)
    t = [w.abs() + 0.05 for w in q]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g, strict=True)))
    saq = SAQ(model, rho=0.4, adaptive=True, eta=0.05)
    with saq.ascent():
        nn.functional.cross_entropy(model(x), y).backward()
    saq.perturb()
    for i, n in enumerate(LAYERS):
        expected = q[i] + 0.4 * t[i] ** 2 * g[i] / norm
        torch.testing.assert_close(model[int(n)].weight.detach(), expected, rtol=1e-5, atol=1e-7)
    saq.restore()
    assert all(torch.equal(model[int(n)].weight, q[i]) for i, n in enumerate(LAYERS))


class Recorder(torch.optim.SGD):
    def step(self, closure=None):  # type: ignore[override]
        self.seen = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def test_closure_step_restores_every_parameter_exactly_before_the_update() -> None:
    model, x, y = qat_model(2, a_bits=4, bn=True)
    before = [p.detach().clone() for p in model.parameters()]
    opt = Recorder(model.parameters(), lr=0.1)
    saq = SAQ(model, rho=0.5, act_clip=True, norm=True, bias=True)

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = saq.step(closure, opt)
    assert all(torch.equal(a, b) for a, b in zip(opt.seen, before, strict=True))
    assert saq.last_perturbed_loss > loss  # the ascent went uphill
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_options_choose_what_is_perturbed() -> None:
    model, _, _ = qat_model(3, a_bits=4, bn=True)
    plain = SAQ(copy.deepcopy(model))
    assert len(plain.probe_targets()) == 2 and list(plain.direct_targets()) == []
    full = SAQ(model, act_clip=True, norm=True, bias=True)
    direct = {id(p) for p in full.direct_targets()}
    expected = [model[0].bias, model[3].bias, model[1].weight, model[1].bias,
                model[0].input_quantizer.step, model[3].input_quantizer.step]
    assert direct == {id(p) for p in expected}
    assert isinstance(model[0].parametrizations.weight[-1], Perturbation)
    with pytest.raises(ValueError, match="act_clip"):
        SAQ(model, act_clip=1)  # type: ignore[arg-type]


def test_float_weights_are_perturbed_directly() -> None:
    torch.manual_seed(4)
    model = prepare_qat(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), method="lsq", w_bits=2,
                        select={"include": (r"^0$",)})
    saq = SAQ(model)
    assert [id(p) for p in saq.direct_targets()] == [id(model[2].weight)]
    assert len(saq.probe_targets()) == 1


def test_state_dict_finalize_and_remove_with_perturbations_attached() -> None:
    model, x, _ = qat_model(5)
    keys = set(model.state_dict())
    reference = baked(model, 5)
    saq = SAQ(model)
    assert set(model.state_dict()) == keys
    assert torch.equal(model(x), reference(x))
    saq.remove()
    assert all(not isinstance(p, Perturbation) for p in model[0].parametrizations.weight)
    SAQ(model)
    torch.testing.assert_close(finalize(model)(x), reference(x), rtol=0, atol=0)


def test_failing_second_pass_resets_the_perturbation() -> None:
    model, x, y = qat_model(6)
    q = [model[int(n)].weight.detach().clone() for n in LAYERS]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saq = SAQ(model, rho=0.3)
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = nn.functional.cross_entropy(model(x), y)
        if calls == 2:
            raise NonFiniteError("nan")
        loss.backward()
        return loss

    with pytest.raises(NonFiniteError):
        saq.step(closure, opt)
    assert all(torch.equal(model[int(n)].weight, q[i]) for i, n in enumerate(LAYERS))
    assert all(p.eps is None and not p.probing for p in saq.probe_targets())


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))


def test_saqstep_in_fit_trains_a_qat_model() -> None:
    model, _, _ = qat_model(7, a_bits=4, bn=True)
    cfg = TrainConfig(epochs=4, lr=0.02, optimizer="adam", schedule="none")
    result = fit(model, _loader(), cfg, step_strategy=SAQStep(rho=RhoSchedule(0.2, warmup_epochs=1)),
                 param_groups=qat_param_groups(model, lr=0.02), seed=0, progress=False)
    h = result.history
    assert h[0]["rho"] == 0.0 and h[-1]["rho"] == pytest.approx(0.2)
    assert h[-1]["sharpness"] > 0 and h[-1]["train_loss"] < h[0]["train_loss"]
    assert all(p.eps is None for p in model.modules() if isinstance(p, Perturbation))


def test_saqstep_rho_zero_equals_plain_qat_exactly() -> None:
    m1, _, _ = qat_model(8, a_bits=4)
    m2 = copy.deepcopy(m1)
    cfg = TrainConfig(epochs=2, lr=0.02, optimizer="adam", schedule="none")
    fit(m1, _loader(), cfg, step_strategy=SAQStep(rho=0.0), seed=0, progress=False)
    fit(m2, _loader(), cfg, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))


def test_build_step_from_a_recipe_block() -> None:
    from qready.sharpness import SAMStep, build_step

    saq = build_step({"kind": "saq", "rho": 0.3, "act_clip": True})
    assert isinstance(saq, SAQStep) and saq.rho == 0.3 and saq.options["act_clip"]
    sam = build_step({"kind": "asam", "rho": 0.5, "warmup_epochs": 2})
    assert isinstance(sam, SAMStep) and sam.adaptive and sam.rho(1) == 0.0 and sam.rho(2) == 0.5
    assert build_step(None) is None
    with pytest.raises(ValueError, match="sharpness.kind"):
        build_step({"kind": "sgd"})
    with pytest.raises(ValueError, match="sharpness.act_clip"):
        build_step({"kind": "sam", "act_clip": True})
    with pytest.raises(ValueError, match="rho"):
        build_step({"kind": "saq", "rho": -1})
