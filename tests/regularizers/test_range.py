"""Range regularization R²: values, gradients, numerics, parameters, building and a short training."""

import json
import math

import pytest
import torch
from torch import nn

import qready
from qready.models import create_model
from qready.registry import UnknownNameError
from qready.regularizers import LInfRegularizer, MarginRegularizer, SoftMinMaxRegularizer, build, param_key

NAMES = ("linf", "margin", "soft_min_max")


def _tiny(dtype=torch.float64) -> nn.Sequential:
    """Two Linear layers with distinct |w| (no ties, away from the hinge kinks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            n = layer.weight.numel()
            values = torch.linspace(-0.9, 0.8, n, dtype=dtype)[torch.randperm(n)]
            layer.weight.copy_(values.reshape(layer.weight.shape))
    return model


def _weights(model) -> list[list[float]]:
    return [model[i].weight.detach().flatten().tolist() for i in (0, 2)]


# --- values against plain-Python computations ------------------------------------------------------


def test_linf_value():
    model = _tiny()
    reg = build("linf", model, weight=0.5)
    expected = sum(max(abs(v) for v in w) for w in _weights(model))
    assert reg(model).item() == pytest.approx(0.5 * expected, rel=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_margin_value(reduction):
    model = _tiny()
    reg = build("margin", model, weight=0.1, init=0.3, reduction=reduction)
    with torch.no_grad():
        reg.margins["2"].fill_(-0.2)  # a negative margin: |M| in the penalty, M in the hinge
    expected = 0.0
    for w, m in zip(_weights(model), (0.3, -0.2), strict=True):
        hinge = [max(abs(v) - m, 0.0) for v in w]
        expected += (sum(hinge) if reduction == "sum" else sum(hinge) / len(hinge)) + abs(m)
    assert reg(model).item() == pytest.approx(0.1 * expected, rel=1e-12)


@pytest.mark.parametrize("parametrization", ["softplus", "exp"])
def test_soft_min_max_value(parametrization):
    model = _tiny()
    reg = build("soft_min_max", model, weight=0.2, alpha_init=3.0, eta=0.7, parametrization=parametrization)
    expected = 0.0
    for w in _weights(model):
        smax = sum(v * math.exp(3 * v) for v in w) / sum(math.exp(3 * v) for v in w)
        smin = sum(v * math.exp(-3 * v) for v in w) / sum(math.exp(-3 * v) for v in w)
        expected += smax - smin + 0.7 * math.exp(-3.0)
    assert reg(model).item() == pytest.approx(0.2 * expected, rel=1e-12)
    assert reg.alpha("0").item() == pytest.approx(3.0, rel=1e-12)


def test_initialisation_from_current_weights():
    model = _tiny()
    w0 = model[0].weight.detach().clone()
    margin = build("margin", model)
    assert margin.margins["0"].item() == pytest.approx(w0.abs().max().item())
    assert build("margin", model, init="std3").margins["0"].item() == pytest.approx(3 * w0.std(correction=0).item())
    smm = build("soft_min_max", model)
    assert smm.alpha("0").item() == pytest.approx(10 / w0.std(correction=0).item(), rel=1e-9)
    assert build("soft_min_max", model, alpha_scale=2.0).alpha("0").item() == pytest.approx(2 / w0.std(correction=0).item())
    # Fine-tuning path: new weights, reset in place (the optimizer keeps the same Parameter).
    param = margin.margins["0"]
    with torch.no_grad():
        model[0].weight.mul_(3)
    margin.reset_parameters(model)
    assert margin.margins["0"] is param and param.item() == pytest.approx(3 * w0.abs().max().item())


# --- gradients against central finite differences (float64) --------------------------------------------


def _finite_difference_check(reg, model, eps=1e-6):
    tensors = [model[0].weight, model[2].weight, *reg.parameters()]
    reg.zero_grad()
    model.zero_grad()
    reg(model).backward()
    for t in tensors:
        numeric = torch.zeros_like(t)
        flat, out = t.data.view(-1), numeric.view(-1)
        for i in range(flat.numel()):
            orig = flat[i].item()
            with torch.no_grad():
                flat[i] = orig + eps
                up = reg(model).item()
                flat[i] = orig - eps
                down = reg(model).item()
                flat[i] = orig
            out[i] = (up - down) / (2 * eps)
        torch.testing.assert_close(t.grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name,options", [
    ("linf", {}),
    ("margin", {"init": 0.35}),
    ("margin", {"init": 0.35, "reduction": "mean"}),
    ("soft_min_max", {"alpha_init": 2.5, "eta": 1.3}),
    ("soft_min_max", {"parametrization": "exp"}),
])
def test_gradients_match_finite_differences(name, options):
    model = _tiny()
    reg = build(name, model, weight=0.3, **options)
    _finite_difference_check(reg, model)
    if name != "linf":
        assert all(p.grad is not None and p.grad.abs().item() > 0 for p in reg.parameters())


def test_linf_gradient_touches_only_the_extreme_weight():
    model = _tiny(torch.float32)
    reg = build("linf", model, weight=0.01)
    reg(model).backward()
    for layer in (model[0], model[2]):
        w, g = layer.weight.detach(), layer.weight.grad
        idx = w.abs().argmax()
        expected = torch.zeros_like(w).view(-1)
        expected[idx] = 0.01 * w.view(-1)[idx].sign()
        assert torch.equal(g.view(-1), expected)
        assert layer.bias.grad is None


def test_soft_min_max_stays_finite_for_huge_alpha_times_w():
    for dtype in (torch.float32, torch.float64):
        model = _tiny(dtype)  # |w| up to 0.9
        reg = build("soft_min_max", model, weight=1.0, alpha_init=6000.0)  # alpha*|w| up to 5400
        value = reg(model)
        value.backward()
        grads = [model[0].weight.grad, model[2].weight.grad, *(p.grad for p in reg.parameters())]
        assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
        # At such alpha smax/smin are the hard max/min and their gradients one-hot (+1 / -1).
        expected = sum(max(w) - min(w) for w in _weights(model))
        assert value.item() == pytest.approx(expected, rel=1e-6)
        g, w = model[0].weight.grad.view(-1), model[0].weight.detach().view(-1)
        assert g[w.argmax()].item() == pytest.approx(1.0) and g[w.argmin()].item() == pytest.approx(-1.0)


# --- parameters, selection, building ----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_learnable_parameters_live_in_the_regularizer_only(name):
    model = create_model("dwcnn", num_classes=10, in_channels=1)
    reg = build(name, model, weight=0.01)
    model_ids = {id(p) for p in model.parameters()}
    reg_params = list(reg.parameters())
    assert not any(id(p) in model_ids for p in reg_params)
    assert len(reg_params) == (0 if name == "linf" else len(reg.layer_names))
    assert all(p.requires_grad and p.dim() == 0 for p in reg_params)
    if reg_params:
        container = reg.margins if name == "margin" else reg.raw_alphas
        assert sorted(container.keys()) == sorted(param_key(n) for n in reg.layer_names)
    assert len(list(model.parameters())) == len(model_ids)  # nothing registered into the model


def test_selector_option():
    model = create_model("dwcnn", num_classes=10, in_channels=1)
    all_layers = build("linf", model).layer_names
    reg = build("margin", model, select={"skip_depthwise": True, "first_last": "float"})
    assert reg.layer_names == [n for n in all_layers[1:-1] if model.get_submodule(n).groups == 1]
    assert 0 < len(reg.layer_names) < len(all_layers) - 2
    assert len(reg.margins) == len(reg.layer_names)


def test_build_and_public_names():
    model = _tiny(torch.float32)
    assert isinstance(qready.regularizers.build("linf", model, weight=0.01), LInfRegularizer)
    assert isinstance(build("margin", model), MarginRegularizer)
    assert isinstance(build("soft_min_max", model), SoftMinMaxRegularizer)
    assert set(NAMES) <= set(qready.regularizers.list_regularizers())
    reg = build("linf", model, weight=0.01, start_epoch=2)
    assert not reg.active(1) and reg.active(2)


@pytest.mark.parametrize("name,options,match", [
    ("linf", {"init": "max"}, "linf.*init"),
    ("margin", {"reduction": "max"}, "reduction.*'sum', 'mean'"),
    ("margin", {"init": "p99"}, "init.*'max', 'std3'"),
    ("margin", {"init": -1.0}, "init"),
    ("soft_min_max", {"alpha_init": 0}, "alpha_init.*'inv_std'"),
    ("soft_min_max", {"parametrization": "sigmoid"}, "parametrization.*'softplus', 'exp'"),
    ("soft_min_max", {"eta": -1}, "eta"),
    ("linf", {"weight": -0.1}, "weight"),
    ("linf", {"select": {"include": ("nope",)}}, "no layer"),
])
def test_bad_options_give_clear_errors(name, options, match):
    with pytest.raises(ValueError, match=match):
        build(name, _tiny(torch.float32), **options)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError, match="linf.*margin.*soft_min_max"):
        build("l_inf", _tiny(torch.float32))


# --- a short training on real data ----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_loaders():
    """Digits loaders; one intra-op thread while they are used (a 64x64 MLP gains nothing from more and
    loses much when the cores are shared)."""
    from qready.data import load_dataset, make_loaders

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_loaders(load_dataset("digits", seed=0), 64, seed=0)
    torch.set_num_threads(threads)


def _train(loaders, seed: int, name: str | None, logger=None) -> nn.Module:
    from qready.train import TrainConfig, fit, seed_everything

    seed_everything(seed)
    model = create_model("mlp", hidden=(64,), num_classes=10)
    terms = [] if name is None else [build(name, model, weight=0.01)]
    result = fit(model, loaders[0], TrainConfig(epochs=4, lr=0.01, optimizer="adam"), loss_terms=terms,
                 seed=seed, progress=False, callbacks=[logger] if logger else ())
    assert result.final["train_acc"] > 85
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_short_training_shrinks_the_weight_range(digits_loaders, seed, tmp_path):
    """Default λ = 0.01, 4 epochs of an MLP on digits: each penalty shrinks its own measure of the range
    (Σ_l max|w| for linf/margin, Σ_l max−min for soft_min_max) by > 4% (measured 7-16% over 5 seeds)."""
    from qready.regularizers.stats import StatsLogger, layer_stats

    def measure(model, key):
        return sum(s[key] for s in layer_stats(model))

    plain = _train(digits_loaders, seed, None)
    for name, key in (("linf", "max_abs"), ("margin", "max_abs"), ("soft_min_max", "range")):
        logger = StatsLogger(None, tmp_path / f"{name}.jsonl")
        model = _train(digits_loaders, seed, name, logger)
        assert measure(model, key) < 0.96 * measure(plain, key), name
        lines = logger.path.read_text().splitlines()
        assert len(lines) == 4 and sum(s[key] for s in json.loads(lines[-1])["layers"]) == pytest.approx(measure(model, key))
