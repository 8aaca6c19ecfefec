"""Gradient-ℓ1 regularization: values against direct autograd, gradcheck of the double backprop,
activation hooks, BatchNorm, λ=0 reproducibility and a short training on digits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from qready.data import load_dataset, make_loaders
from qready.models import create_model
from qready.regularizers import GradL1, build
from qready.train import TrainConfig, fit, seed_everything


def _tiny(dtype=torch.float64, batch_norm: bool = False) -> nn.Sequential:
    """Linear -> (BatchNorm1d) -> Tanh -> Linear; smooth, so finite differences are meaningful."""
    torch.manual_seed(0)
    layers = [nn.Linear(3, 5)] + ([nn.BatchNorm1d(5)] if batch_norm else []) + [nn.Tanh(), nn.Linear(5, 4)]
    return nn.Sequential(*layers).to(dtype)


def _batch(n=6, dtype=torch.float64, in_features=3, classes=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, in_features, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _direct_weight_l1(model, loss, normalize="none"):
    grads = torch.autograd.grad(loss, [m.weight for m in _linears(model)], retain_graph=True)
    return sum(g.abs().mean() if normalize == "numel" else g.abs().sum() for g in grads).item()


# --- values against direct autograd computations ---------------------------------------------------


@pytest.mark.parametrize("normalize", ["none", "numel"])
def test_weight_term_equals_direct_autograd(normalize):
    model = _tiny()
    x, y = _batch()
    loss = F.cross_entropy(model(x), y)
    expected = _direct_weight_l1(model, loss, normalize)
    reg = build("grad_l1", model, weight=0.3, normalize=normalize)
    assert reg(model, loss=loss).item() == pytest.approx(0.3 * expected, rel=1e-12)
    assert reg.penalty(model, loss).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("site", ["output", "input"])
def test_activation_term_equals_direct_autograd(site):
    model = _tiny()
    x, y = _batch()
    reg = GradL1(model, weight=0.3, act_weight=0.7, act_site=site)
    loss = F.cross_entropy(model(x), y)
    value = reg(model, loss=loss).item()

    h = model[0](x)
    t = model[1](h)
    out = model[2](t)
    direct_loss = F.cross_entropy(out, y)
    # outputs of both Linear layers; inputs: the data needs no grad, so only the second layer's input
    acts = [h, out] if site == "output" else [t]
    a_grads = torch.autograd.grad(direct_loss, acts, retain_graph=True)
    expected_a = sum(g.abs().sum() for g in a_grads).item()
    expected_w = _direct_weight_l1(model, direct_loss)
    assert value == pytest.approx(0.3 * expected_w + 0.7 * expected_a, rel=1e-12)


def test_one_autograd_grad_call_per_step_and_none_when_off(monkeypatch):
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    model = _tiny()
    x, y = _batch()
    reg = GradL1(model, weight=0.1, act_weight=0.1)
    reg(model, loss=F.cross_entropy(model(x), y)).backward()
    assert calls == [4]  # 2 weights + 2 activations in one call

    off = GradL1(model, weight=0.0, act_weight=0.0)
    loss = F.cross_entropy(model(x), y)
    zero = off(model, loss=loss)
    assert calls == [4]
    assert zero.item() == 0.0 and zero.dtype == loss.dtype and zero.device == loss.device


# --- gradients of the penalty (double backprop) against finite differences ------------------------


class _LossAndPenalty(nn.Module):
    def __init__(self, model: nn.Module, reg: GradL1) -> None:
        super().__init__()
        self.model, self.reg = model, reg

    def forward(self, x, y):
        return self.reg(self.model, loss=F.cross_entropy(self.model(x), y))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_gradcheck_penalty_wrt_weights(batch_norm):
    model = _tiny(batch_norm=batch_norm).train()
    wrapper = _LossAndPenalty(model, GradL1(model, weight=1.0, act_weight=0.5))
    x, y = _batch()
    names = [f"model.{n}" for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    weights = tuple(wrapper.get_parameter(n).detach().clone().requires_grad_(True) for n in names)

    def penalty(*ws):
        return functional_call(wrapper, dict(zip(names, ws, strict=True)), (x, y))

    assert penalty(*weights).item() > 0
    assert torch.autograd.gradcheck(penalty, weights, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_backward_accumulates_task_and_penalty_gradients():
    model = _tiny()
    x, y = _batch()
    reg = GradL1(model, weight=0.2)
    loss = F.cross_entropy(model(x), y)
    (loss + reg(model, loss=loss)).backward()
    got = [m.weight.grad.clone() for m in _linears(model)]

    model.zero_grad()
    ws = [m.weight for m in _linears(model)]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, ws, create_graph=True)
    (loss + 0.2 * sum(g.abs().sum() for g in grads)).backward()
    for a, m in zip(got, _linears(model), strict=True):
        torch.testing.assert_close(a, m.weight.grad, rtol=1e-12, atol=1e-14)


# --- BatchNorm, the zoo, hooks ---------------------------------------------------------------------


def test_dwcnn_batchnorm_train_mode_single_forward():
    model = create_model("dwcnn", num_classes=10, in_channels=1, width=8).double().train()
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 10
    reg = GradL1(model, weight=0.05, act_weight=0.05)
    bn = model.features[0][1]
    loss = F.cross_entropy(model(x), y)
    layers = [m for _, m in reg.layers(model)]
    expected = sum(g.abs().sum() for g in torch.autograd.grad(loss, [m.weight for m in layers], retain_graph=True))
    w_l1, a_l1 = reg.gradient_l1(model, loss)
    assert w_l1.item() == pytest.approx(expected.item(), rel=1e-10)
    assert a_l1.item() > 0
    (loss + 0.05 * (w_l1 + a_l1)).backward()
    assert int(bn.num_batches_tracked) == 1  # no second forward
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name,shape,kwargs", [
    ("mlp", (4, 64), {}),
    ("cnn1d", (4, 1, 40), {"in_channels": 1}),
    ("resnet20", (2, 3, 8, 8), {"in_channels": 3}),
    ("mobilenet_v2", (2, 3, 8, 8), {"in_channels": 3, "width_mult": 0.25, "stem": "cifar"}),
])
def test_zoo_models_train_a_step(name, shape, kwargs):
    model = create_model(name, num_classes=10, **kwargs).train()
    reg = GradL1(model, weight=0.01, act_weight=0.01)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(x), torch.arange(shape[0]) % 10)
    penalty = reg(model, loss=loss)
    (loss + penalty).backward()
    assert penalty.item() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    reg.remove()


def test_remove_takes_hooks_off():
    model = _tiny()
    reg = GradL1(model, weight=0.1, act_weight=0.1)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 2
    model(_batch()[0])
    reg.remove()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    model(_batch()[0])
    assert not reg._acts
    assert not GradL1(model, weight=0.1)._handles  # weights only: no hooks at all


def test_no_grad_forward_is_not_captured_and_stale_activations_are_refused():
    model = _tiny()
    reg = GradL1(model, weight=0.0, act_weight=1.0)
    x, y = _batch()
    out = model(x)
    with torch.no_grad():
        model(x * 2)  # an evaluation forward does not replace the stored activations
    assert reg(model, loss=F.cross_entropy(out, y)).item() > 0

    out = model(x)
    model(x * 2)  # a second forward with gradients: the stored activations are not the loss's
    with pytest.raises(RuntimeError, match="after the forward that produced loss"):
        reg(model, loss=F.cross_entropy(out, y))


# --- arguments ----------------------------------------------------------------------------------


def test_loss_must_carry_its_graph():
    model = _tiny()
    reg = GradL1(model)
    x, y = _batch()
    with pytest.raises(ValueError, match="needs loss="):
        reg(model, loss=None)
    with pytest.raises(ValueError, match="without grad_fn"):
        reg(model, loss=F.cross_entropy(model(x), y).detach())
    with pytest.raises(ValueError, match="scalar"):
        reg(model, loss=F.cross_entropy(model(x), y, reduction="none"))


@pytest.mark.parametrize("kwargs,match", [
    ({"normalize": "mean"}, "normalize must be one of"),
    ({"act_site": "pre"}, "act_site must be one of"),
    ({"act_weight": -1.0}, "act_weight"),
    ({"last_epochs": 3}, "given together"),
    ({"last_epochs": 5, "epochs": 3}, "last_epochs must be <= epochs"),
    ({"last_epochs": 2, "epochs": 6, "start_epoch": 1}, "not both"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build("grad_l1", _tiny(), weight=0.1, **kwargs)


def test_last_epochs_schedule():
    reg = build("grad_l1", _tiny(), weight=0.1, last_epochs=2, epochs=6)
    assert reg.start_epoch == 4
    assert [reg.active(e) for e in range(6)] == [False] * 4 + [True] * 2


# --- training through qready.train.fit ------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny models train faster (and identically) on one thread; restores the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_digits(seed: int, terms_fn, epochs: int):
    splits = load_dataset("digits", seed=seed)
    train_loader, test_loader = make_loaders(splits, 64, seed=seed)
    seed_everything(seed)
    model = create_model("dwcnn", num_classes=10, in_channels=1, width=16)
    cfg = TrainConfig(epochs=epochs, lr=0.01, batch_size=64, optimizer="adam")
    fit(model, train_loader, cfg, loss_terms=terms_fn(model), seed=seed, progress=False)
    return model, test_loader


def _held_weight_grad_l1(model, loader) -> float:
    """Σ_l ‖∇_{W_l} L‖₁ on the first test batch, BatchNorm in train mode (the penalised quantity)."""
    x, y = next(iter(loader))
    model.train()
    loss = F.cross_entropy(model(x), y)
    return GradL1(model).penalty(model, loss).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_training_with_penalty_lowers_gradient_l1(seed, one_thread):
    plain, loader = _train_digits(seed, lambda m: [], epochs=3)
    reg_model, _ = _train_digits(seed, lambda m: [build("grad_l1", m, weight=0.01)], epochs=3)
    base, penalised = _held_weight_grad_l1(plain, loader), _held_weight_grad_l1(reg_model, loader)
    assert penalised < 0.85 * base  # seeds 0-2: ratios 0.59-0.72


def test_zero_weight_reproduces_plain_training_bit_for_bit(one_thread):
    plain, _ = _train_digits(0, lambda m: [], epochs=1)
    zero, _ = _train_digits(0, lambda m: [build("grad_l1", m, weight=0.0, act_weight=0.0)], epochs=1)
    for (name, a), b in zip(plain.state_dict().items(), zero.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
