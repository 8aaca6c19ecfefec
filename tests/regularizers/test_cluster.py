"""The cluster regularizer: values and gradients against direct formulas, init, and its pull."""

import math

import pytest
import torch
from torch import nn

from qready.data import load_dataset, make_loaders
from qready.models import create_model
from qready.quant.palettize.kmeans import kmeans1d_centroids
from qready.regularizers import build
from qready.regularizers.cluster import soft_cluster_penalty
from qready.train import TrainConfig, fit


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def test_representatives_start_at_the_exact_kmeans_of_each_layer() -> None:
    model = tiny()
    reg = build("cluster", model, bits=2)
    assert reg.layer_names == ["0", "2"]
    for name in reg.layer_names:
        expected = kmeans1d_centroids(model.get_submodule(name).weight.detach(), 4, method="exact")
        torch.testing.assert_close(reg.representatives(name).detach(), expected)
        assert isinstance(reg.representatives(name), nn.Parameter)
    assert sum(p.numel() for p in reg.parameters()) == 8


def direct_hard(model: nn.Module, reg) -> torch.Tensor:
    total = 0
    for name in reg.layer_names:
        w = model.get_submodule(name).weight.reshape(-1, 1)
        total = total + (w - reg.representatives(name)[None]).square().min(dim=1).values.mean()
    return total


def test_normalized_penalty_divides_by_the_initial_layer_variance() -> None:
    model = tiny()
    plain = build("cluster", model, weight=1.0, bits=2, normalize=False)
    scaled = build("cluster", model, weight=1.0, bits=2)
    variances = [model.get_submodule(n).weight.detach().var(unbiased=False) for n in scaled.layer_names]
    torch.testing.assert_close(scaled.variances, torch.stack(variances))
    expected = 0
    for name, var in zip(scaled.layer_names, variances, strict=True):  # mean squared distance to the
        w = model.get_submodule(name).weight.detach().reshape(-1, 1)       # nearest representative / variance
        expected = expected + (w - scaled.representatives(name).detach()[None]).square().min(dim=1).values.mean() / var
    torch.testing.assert_close(scaled(model).detach(), expected)
    assert not torch.allclose(plain(model), scaled(model))


def test_hard_penalty_value_and_gradients_match_direct_computation() -> None:
    model = tiny()
    reg = build("cluster", model, weight=0.5, bits=1, normalize=False)
    with torch.no_grad():
        for rep in reg.reps.values():
            rep.add_(0.05)
    params = [*model.parameters(), *reg.parameters()]
    ours = reg(model)
    grads = torch.autograd.grad(ours, params, allow_unused=True)
    ref = 0.5 * direct_hard(model, reg)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(ours, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:
            assert g is None or torch.all(g == 0)
        else:
            torch.testing.assert_close(g, r)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[-2:])  # representatives get gradients


def test_soft_penalty_matches_formula_and_finite_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(20, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([-1.0, -0.2, 0.3, 1.1], dtype=torch.float64, requires_grad=True)
    t = 0.05
    d = (w[:, None] - c[None]) ** 2
    expected = (-t * torch.log(torch.exp(-d / t).sum(1))).mean() + t * math.log(4)
    torch.testing.assert_close(soft_cluster_penalty(w, c, t), expected)
    assert torch.autograd.gradcheck(lambda a, b: soft_cluster_penalty(a, b, t), (w, c))
    hard = d.min(dim=1).values.mean()
    assert hard <= soft_cluster_penalty(w, c, t) <= hard + t * math.log(4) + 1e-12
    torch.testing.assert_close(soft_cluster_penalty(w, c, 1e-6), hard, rtol=1e-4, atol=1e-6)


def test_soft_regularizer_uses_relative_temperature() -> None:
    model = tiny()
    reg = build("cluster", model, weight=1.0, bits=2, soft=True, temperature=0.1, normalize=False)
    ref = 0
    for name in reg.layer_names:
        w = model.get_submodule(name).weight
        ref = ref + soft_cluster_penalty(w, reg.representatives(name), 0.1 * w.detach().var(unbiased=False))
    torch.testing.assert_close(reg(model), ref)


def test_training_pulls_weights_toward_the_representatives() -> None:
    splits = load_dataset("digits", seed=0)
    train_loader, _ = make_loaders(splits, 64, seed=0)
    model = create_model("dwcnn", num_classes=10, in_channels=1, width=8)
    reg = build("cluster", model, weight=1.0, bits=2)
    reps_before = {k: v.detach().clone() for k, v in reg.reps.items()}
    with torch.no_grad():
        before = reg.penalty(model).item()
    fit(model, train_loader, TrainConfig(epochs=2, lr=0.01, optimizer="adam"), loss_terms=[reg], seed=0,
        progress=False)
    with torch.no_grad():
        after = reg.penalty(model).item()
    assert after < 0.5 * before
    assert any(not torch.equal(reps_before[k], v) for k, v in reg.reps.items())  # representatives trained too


@pytest.mark.parametrize(("options", "match"), [({"bits": 0}, "bits must be one of"), ({"bits": 9}, "bits must be one"),
                                                ({"temperature": 0.0}, "temperature"), ({"soft": 1}, "soft"),
                                                ({"normalize": "yes"}, "normalize")])
def test_invalid_options(options: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        build("cluster", tiny(), **options)
