"""Mixed precision: the search meets the BOPs budget, gives a deliberately sensitive layer more bits,
and prepare_mixed gives every layer its own bit width (then SAQ fine-tunes it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qready.quant import Selector, qat_param_groups
from qready.quant.qat.quantizers import LSQActivationQuantizer, LSQWeightQuantizer
from qready.sharpness import SAQStep, bops, prepare_mixed, search_mixed_precision
from qready.sharpness.mixed import config_bops
from qready.train import TrainConfig, fit

SHAPE = (16,)
LAYERS = ("0", "2", "4", "6")


def trained_mlp(seed: int = 0) -> tuple[nn.Module, DataLoader]:
    """A 4-layer MLP trained briefly on a random linear teacher (256 samples, 16 features, 4 classes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(dim=1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, DataLoader(TensorDataset(x, y), batch_size=64)


class TwoBranch(nn.Module):
    """``head(relu(a(x)) + relu(b(x)))`` with ``a`` and ``b`` identical: by symmetry they are equally
    sensitive, unless ``a`` gets outliers on the inputs 12-15, which are always 0 (no effect on the
    function, but a per-channel min-max grid of ``a`` then spans the outlier)."""

    def __init__(self, outlier: float, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.b.weight[:, 12:] = 0.0
            self.a.load_state_dict(self.b.state_dict())
            self.a.weight[:, 12:] = outlier * self.a.weight.abs().amax()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x)) + torch.relu(self.b(x)))


def branch_data(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    x[:, 12:] = 0.0
    model = TwoBranch(0.0, seed)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=64)


BRANCHES = Selector(include=(r"^a$", r"^b$"))


@pytest.mark.parametrize("seed", [0, 1])
def test_search_gives_the_deliberately_sensitive_layer_more_bits(seed: int) -> None:
    loader = branch_data(seed)
    options = dict(select=BRANCHES, a_bits=None, w_range="minmax", batches=4)
    sensitive = TwoBranch(2.0, seed)
    target = bops(sensitive, SHAPE, {"a": 4, "b": 2}, 32).total  # == {"a": 2, "b": 4}
    result = search_mixed_precision(sensitive, loader, SHAPE, target, bits=(2, 4), **options)
    assert result.config == {"a": 4, "b": 2} and result.bops <= target
    assert result.sensitivity["a"][2] > result.sensitivity["b"][2] + 0.05
    wide = search_mixed_precision(sensitive, loader, SHAPE, target, **options)
    assert wide.config["a"] >= wide.config["b"] and wide.bops <= target
    control = search_mixed_precision(TwoBranch(0.0, seed), loader, SHAPE, target, bits=(2, 4), **options)
    assert control.sensitivity["a"][2] == pytest.approx(control.sensitivity["b"][2], rel=1e-5)


def test_search_meets_a_uniform_3_bit_budget() -> None:
    model, loader = trained_mlp()
    target = bops(model, SHAPE, 3, 3).total
    result = search_mixed_precision(model, loader, SHAPE, target, rho=0.05, batches=4)
    assert set(result.config) == set(LAYERS)
    assert result.bops == bops(model, SHAPE, result.config, result.config).total <= target
    assert all(c["bops"] <= target for c in result.candidates)
    uniform = next(c for c in result.candidates if c["config"] == dict.fromkeys(LAYERS, 3))
    assert result.objective <= uniform["objective"]


def test_search_with_pinned_layers_and_a_tight_budget() -> None:
    model, loader = trained_mlp(1)
    select = Selector(types=(nn.Linear,), first_last=8)
    pinned = {"0": 8, "6": 8}
    target = config_bops(
        {"0": 256, "2": 256, "4": 256, "6": 64}, {**pinned, "2": 2, "4": 3}, "same")
    result = search_mixed_precision(model, loader, SHAPE, target, select=select, batches=2, candidates=3)
    assert result.config["0"] == 8 and result.config["6"] == 8
    assert result.bops <= target
    assert sorted((result.config["2"], result.config["4"])) in ([2, 2], [2, 3])
    with pytest.raises(ValueError, match="below the cheapest"):
        search_mixed_precision(model, loader, SHAPE, target / 10, select=select, batches=1)


def test_prepare_mixed_sets_per_layer_bits_and_saq_fine_tunes() -> None:
    model, loader = trained_mlp(2)
    config = {"0": 3, "2": 2, "4": 5, "6": 3}
    qmodel = prepare_mixed(model, config, method="lsq", calib=loader)
    for name, b in config.items():
        layer = qmodel.get_submodule(name)
        quantizer = layer.parametrizations.weight[0]
        assert isinstance(quantizer, LSQWeightQuantizer) and quantizer.bits == b
        assert isinstance(layer.input_quantizer, LSQActivationQuantizer) and layer.input_quantizer.bits == b
    assert not hasattr(model[0], "parametrizations")  # the input model is untouched
    cfg = TrainConfig(epochs=2, lr=0.01, optimizer="adam", schedule="none")
    result = fit(qmodel, loader, cfg, step_strategy=SAQStep(rho=0.1), param_groups=qat_param_groups(qmodel, lr=0.01),
                 seed=0, progress=False)
    assert result.history[-1]["sharpness"] > 0 and result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    with pytest.raises(ValueError, match="does not have"):
        prepare_mixed(model, {"9": 2})


def test_prepare_mixed_with_a_uniform_config_equals_prepare_qat() -> None:
    from qready.quant import prepare_qat

    model, loader = trained_mlp(3)
    uniform = prepare_qat(model, method="lsq", w_bits=3, a_bits=3, first_last=8, calib=loader)
    mixed = prepare_mixed(model, {"0": 8, "2": 3, "4": 3, "6": 8}, method="lsq", calib=loader)
    a, b = uniform.state_dict(), mixed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = next(iter(loader))[0]
    assert torch.equal(uniform(x), mixed(x))
