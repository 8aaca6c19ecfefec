"""Label-free distillation: the loss and its gradient against references, composition with every
regularizer and back-end, every batch form, recipes, and a fine-tune with R² on real digits."""

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from qready.data import load_dataset, make_loaders
from qready.evaluate.fidelity import fidelity
from qready.models import create_model
from qready.quant.palettize import palettize
from qready.quant.qat import prepare_qat
from qready.recipe import RecipeError, load_recipe
from qready.regularizers import build
from qready.train import TrainConfig, fit, seed_everything
from qready.train.distill import DISTILL_LOSSES, Distill, distill_loss, frozen_teacher
from qready.train.objective import CrossEntropy, build_objective

CFG = TrainConfig(epochs=2, lr=5e-3, schedule="none")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def _x(n: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def _perturb(model: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


class KwargsNet(nn.Module):
    """Called with keyword arguments, like a Hugging Face model; returns an object with ``.logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()

    def forward(self, input_ids, attention_mask):
        return type("Output", (), {"logits": self.body(input_ids) * attention_mask})()


@pytest.mark.parametrize("loss", DISTILL_LOSSES)
def test_zero_at_step_zero(loss):
    model = _mlp()
    value, out = Distill(model, loss=loss, temperature=2.0)(model, _x())
    assert out.shape == (48, 4)
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-7)


def test_kl_gradient_is_the_analytic_one_and_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    z_s = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    T = 3.0
    (grad,) = torch.autograd.grad(distill_loss(z_s, z_t, loss="kl", temperature=T), z_s)
    analytic = T * (torch.softmax(z_s / T, -1) - torch.softmax(z_t / T, -1)) / 5
    torch.testing.assert_close(grad, analytic, rtol=1e-10, atol=1e-12)
    for loss in DISTILL_LOSSES:  # autograd against central finite differences
        assert torch.autograd.gradcheck(lambda s, loss=loss: distill_loss(s, z_t, loss=loss, temperature=T), (z_s,))
    # the value against torch's own KL divergence
    ref = T**2 * nn.functional.kl_div(torch.log_softmax(z_s / T, -1), torch.log_softmax(z_t / T, -1),
                                      log_target=True, reduction="batchmean")
    torch.testing.assert_close(distill_loss(z_s, z_t, temperature=T), ref)


def test_parameter_gradient_matches_finite_differences():
    teacher_src = _mlp().double()
    student = copy.deepcopy(teacher_src)
    objective = Distill(teacher_src, temperature=2.0)
    _perturb(student, 0.1)
    x = _x().double()
    weight = student[0].weight

    def loss_of(w):  # the student's forward written out, with its first weight as the variable
        logits = student[2](torch.relu(nn.functional.linear(x, w, student[0].bias)))
        return distill_loss(logits, objective.teacher_output(x, torch.device("cpu")), temperature=2.0)

    (grad,) = torch.autograd.grad(objective(student, x)[0], weight)
    torch.testing.assert_close(grad, torch.autograd.grad(loss_of(weight), weight)[0])
    assert torch.autograd.gradcheck(loss_of, (weight.detach().clone().requires_grad_(True),))


def test_teacher_is_a_frozen_float_copy():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    objective = Distill(model)
    teacher = objective.teacher
    assert teacher is not model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    before = teacher[1].running_mean.clone()
    fit(model, [_x(32)], CFG, objective=objective, progress=False)
    assert torch.equal(teacher[1].running_mean, before)  # no BN updates in the teacher
    assert not torch.equal(model[1].running_mean, before)  # ... while the student's BN trains
    with pytest.raises(ValueError, match="teacher must be the float model"):
        frozen_teacher(prepare_qat(_mlp(), method="lsq", w_bits=4))
    with pytest.raises(ValueError, match="teacher must be the float model"):
        frozen_teacher(palettize(_mlp(), bits=2, method="dkm"))
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(6, 4))  # a float parametrization is welcome
    assert nn.utils.parametrize.is_parametrized(frozen_teacher(normed))


@pytest.mark.parametrize("name, options", [("linf", {}), ("margin", {}), ("soft_min_max", {}),
                                           ("grad_l1", {}), ("cluster", {"bits": 2})])
def test_zero_weight_regularizer_equals_plain_distillation_bit_for_bit(name, options):
    results = []
    for terms in (False, True):
        model = _mlp()
        objective = Distill(model, temperature=2.0)
        _perturb(model)
        reg = [build(name, model, weight=0.0, **options)] if terms else []
        fit(model, [_x(32, 0), _x(32, 1)], CFG, objective=objective, loss_terms=reg, seed=0, progress=False)
        results.append(model.state_dict())
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key


def test_dict_batches_and_unlabeled_training_reduce_the_gap():
    model = KwargsNet()
    objective = Distill(model)
    _perturb(model)
    mask = torch.ones(48, 1)
    batches = [{"input_ids": _x(48, i), "attention_mask": mask} for i in range(4)]
    before = fidelity(objective.teacher, model, batches)["kl"]
    history = fit(model, batches, TrainConfig(epochs=5, lr=1e-2), objective=objective, val_loader=batches,
                  progress=False).history
    after = fidelity(objective.teacher, model, batches)["kl"]
    assert after < 0.3 * before
    assert history[-1]["val_kl"] == pytest.approx(after, rel=1e-6) and history[-1]["val_acc"] is None
    assert history[-1]["train_acc"] is None  # no labels, no accuracy
    labelled = [(b, torch.zeros(48, dtype=torch.long)) for b in batches]  # (dict, targets): labels ignored
    assert fit(KwargsNet(), labelled, CFG, objective=Distill(KwargsNet()), progress=False).history


def test_output_fn_and_feature_losses():
    model = _mlp()
    hidden = lambda m, x: m[1](m[0](x))  # noqa: E731  (the hidden layer, not the logits)
    for loss in ("mse", "cosine"):
        student = copy.deepcopy(model)
        objective = Distill(student, loss=loss, output_fn=hidden)
        _perturb(student, 0.2)
        start = float(objective(student, _x())[0].detach())
        fit(student, [_x(48, i) for i in range(3)], TrainConfig(epochs=6, lr=1e-2), objective=objective,
            progress=False)
        assert float(objective(student, _x())[0].detach()) < 0.5 * start


def test_back_ends_qat_and_dkm_fine_tune_towards_the_float_teacher():
    for attach in (lambda m: prepare_qat(m, method="lsq", w_bits=3, inplace=True),
                   lambda m: palettize(m, bits=2, method="dkm", inplace=True)):
        model = _mlp()
        objective = Distill(model)  # the teacher: the float model before quantizers are attached
        student = attach(model)
        batches = [_x(48, i) for i in range(4)]
        before = fidelity(objective.teacher, student, batches)["kl"]
        assert before > 0
        fit(student, batches, TrainConfig(epochs=4, lr=5e-3), objective=objective, progress=False)
        assert fidelity(objective.teacher, student, batches)["kl"] < before


def test_two_pass_steps_run_the_teacher_once_per_batch():
    from qready.sharpness.build import build_step

    model = _mlp()
    objective = Distill(model)
    calls = []
    objective.teacher.register_forward_hook(lambda *args: calls.append(1))
    _perturb(model)
    batches = [_x(16, i) for i in range(3)]
    fit(model, batches, CFG, objective=objective, step_strategy=build_step({"kind": "sam", "rho": 0.05}),
        progress=False)
    assert len(calls) == CFG.epochs * len(batches)  # SAM evaluates the loss twice per step
    x = _x(4)
    first = objective.teacher_output(x, torch.device("cpu"))
    x.mul_(2.0)  # changed in place: the cached output must not be reused
    torch.testing.assert_close(objective.teacher_output(x, torch.device("cpu")), objective.teacher(x))
    assert not torch.equal(first, objective.teacher(x))


def test_saq_step_with_distillation():
    from qready.sharpness.build import build_step

    model = _mlp()
    objective = Distill(model)
    qmodel = prepare_qat(model, method="lsq", w_bits=2, inplace=True)
    batches = [_x(48, i) for i in range(3)]
    before = fidelity(objective.teacher, qmodel, batches)["kl"]
    step = build_step({"kind": "saq", "rho": 0.05})
    fit(qmodel, batches, TrainConfig(epochs=8, lr=1e-2), objective=objective, step_strategy=step, progress=False)
    assert fidelity(objective.teacher, qmodel, batches)["kl"] < 0.7 * before


def test_objective_from_config_and_errors():
    model = _mlp()
    assert isinstance(build_objective(TrainConfig(), model), CrossEntropy)
    objective = build_objective(TrainConfig(objective="distill", temperature=4.0, distill_loss="mse"), model)
    assert isinstance(objective, Distill) and (objective.loss, objective.temperature) == ("mse", 4.0)
    with pytest.raises(ValueError, match=r"objective must be one of 'cross_entropy', 'distill'"):
        TrainConfig(objective="kd")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TrainConfig(temperature=0)
    with pytest.raises(ValueError, match=r"distill_loss must be one of 'kl', 'mse', 'cosine'"):
        TrainConfig(distill_loss="l1")
    with pytest.raises(TypeError, match="needs labelled batches"):
        fit(model, [_x()], CFG, progress=False)
    # a cross-entropy recipe refuses unlabeled data; a distill recipe is validated like any other key
    recipe = load_recipe({"train": {"objective": "distill", "temperature": 2.0, "epochs": 1}})
    assert recipe.train.objective == "distill" and recipe.train.temperature == 2.0
    with pytest.raises(RecipeError, match="objective"):
        load_recipe({"train": {"objective": "teacher"}})


@pytest.fixture(scope="module")
def digits_model():
    splits = load_dataset("digits", seed=0)
    train_loader, test_loader = make_loaders(splits, 64, seed=0)
    seed_everything(0)
    model = create_model("mlp", in_features=64, hidden=(64,), num_classes=10)
    fit(model, train_loader, TrainConfig(epochs=3, lr=0.01), seed=0, progress=False)
    images = torch.stack([splits.train[i][0] for i in range(len(splits.train))])  # the labels are dropped
    unlabeled = DataLoader(images, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    return model, unlabeled, test_loader


def _max_abs(model: nn.Module) -> list[float]:
    return [float(m.weight.detach().abs().max()) for m in model.modules() if isinstance(m, nn.Linear)]


def test_distillation_with_r2_on_digits_keeps_agreement_and_shrinks_ranges(digits_model):
    model, unlabeled, test_loader = digits_model
    ranges = {}
    for name in ("none", "linf"):
        student = copy.deepcopy(model)
        terms = [build("linf", student, weight=0.1)] if name == "linf" else []
        fit(student, unlabeled, TrainConfig(epochs=3, lr=5e-3), objective=Distill(student), loss_terms=terms,
            seed=0, progress=False)
        res = fidelity(model, student, test_loader)  # held-out digits, against the original float model
        assert res["agreement"] >= 97.0 and res["kl"] < 0.01, name
        ranges[name] = _max_abs(student)
    for base, plain, reg in zip(_max_abs(model), ranges["none"], ranges["linf"], strict=True):
        assert abs(plain - base) < 0.05 * base  # distillation alone keeps the ranges (it starts at its minimum)
        assert reg < 0.92 * base  # R² shrinks every layer's range (~15% here)


def test_recipe_distill_fine_tune_then_qat_from_the_float_teacher(digits_model, tmp_path):
    from qready.app.stages import compress_stage, train_recipe

    model = digits_model[0]
    weights = tmp_path / "pretrained.pt"
    torch.save(model.state_dict(), weights)
    recipe = load_recipe({
        "name": "kd", "model": {"name": "mlp", "args": {"hidden": [64]}, "weights": str(weights)},
        "data": {"name": "digits"}, "regularizers": [{"name": "linf", "weight": 0.1}],
        "train": {"objective": "distill", "temperature": 2.0, "epochs": 1, "lr": 1e-3},
        "compress": {"method": "lsq", "w_bits": 3, "epochs": 1, "lr": 1e-3},
    })
    prepared = train_recipe(recipe, tmp_path / "run", progress=False)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_kl"] < 0.01 and last["val_agreement"] > 97  # the fine-tuned float model stays close
    row = compress_stage(prepared, tmp_path / "run", progress=False)["row"]
    assert row["agreement"] > 90 and 0 < row["kl"] < 0.5 and row["accuracy"] > 85
