"""REINFORCE mixed-precision search: the policy finds the configuration the reward singles out, every
returned configuration fits the budget, a seed fixes the result, and the supernet evaluates exactly
the model that prepare_mixed / ptq_mixed build."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qready.quant import Selector
from qready.registry import UnknownNameError
from qready.sharpness import bops, prepare_mixed, ptq_mixed, search_mixed_precision
from qready.sharpness.search import kl_to_teacher
from qready.sharpness.supernet import Supernet

SHAPE = (16,)
LAYERS = ("0", "2", "4")


@functools.cache
def trained_mlp(seed: int = 0) -> tuple[nn.Module, DataLoader]:
    """16 -> 24 -> 10 -> 4 MLP (MACs 384, 240, 40), trained briefly on a random linear teacher (cached:
    nothing here modifies it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(dim=1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, DataLoader(TensorDataset(x, y), batch_size=64)


@pytest.mark.parametrize("policy", ["independent", "lstm"])
def test_large_beta_drives_the_policy_to_the_only_feasible_configuration(policy: str) -> None:
    """The budget admits one configuration (every layer at 2 bits): the loss prefers wider bits, the
    large penalty wins."""
    model, loader = trained_mlp()
    wanted = dict.fromkeys(LAYERS, 2)
    target = bops(model, SHAPE, wanted, 32).total
    result = search_mixed_precision(model, loader, SHAPE, target, search="reinforce", bits=(2, 3, 4), a_bits=None,
                                    lam=1e4, batches=1, policy=policy, steps=80, samples=4, final=8)
    assert result.config == wanted and result.bops == target
    assert all(result.probabilities[n][2] > 0.9 for n in LAYERS)
    assert result.history[-1]["reward"] > result.history[0]["reward"]
    assert result.history[-1]["within_budget"] > 0.7
    assert result.search == "reinforce" and result.seconds > 0


@pytest.mark.parametrize(("policy", "lam"), [("independent", 1.0), ("lstm", 0.0)])
def test_every_returned_configuration_fits_the_budget(policy: str, lam: float) -> None:
    """With ``lam=0`` nothing holds the policy to the budget: it drifts to the widest (lowest-loss) bits,
    and the final draws must be repaired to fit."""
    model, loader = trained_mlp(1)
    target = bops(model, SHAPE, 3, 3).total
    result = search_mixed_precision(model, loader, SHAPE, target, search="reinforce", bits=(2, 3, 4), lam=lam,
                                    batches=1, policy=policy, steps=20, samples=4, final=8)
    assert set(result.config) == set(LAYERS)
    assert result.bops == bops(model, SHAPE, result.config, result.config).total <= target
    assert result.candidates and all(c["bops"] <= target for c in result.candidates)
    assert result.loss == min(c["loss"] for c in result.candidates)
    assert all(sum(p.values()) == pytest.approx(1.0) for p in result.probabilities.values())


def test_the_same_seed_gives_the_same_search() -> None:
    model, loader = trained_mlp(1)
    target = bops(model, SHAPE, 3, 3).total
    options = dict(search="reinforce", bits=(2, 3, 4), batches=1, policy="lstm", steps=10, samples=4, final=4)
    a, b = (search_mixed_precision(model, loader, SHAPE, target, seed=5, **options) for _ in range(2))
    assert a.config == b.config and a.probabilities == b.probabilities and a.history == b.history
    c = search_mixed_precision(model, loader, SHAPE, target, seed=6, **options)
    assert c.history != a.history


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.pw(torch.relu(self.dw(h))))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize(("method", "options"), [("lsq", {}), ("ste", {"range": "mse"}),
                                                 ("ewgs", {"w_granularity": "channel"})])
def test_the_supernet_evaluates_exactly_the_prepare_mixed_model(method: str, options: dict) -> None:
    model = SmallCNN()
    x = torch.randn(32, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    calib = [(x[:16], None), (x[16:], None)]
    choices = {"stem": [8], "dw": [2, 3, 5], "pw": [2, 3, 5], "fc": [8]}
    net = Supernet(model, choices, "same", calib, 2, method=method, **options)
    for config in ({"stem": 8, "dw": 2, "pw": 5, "fc": 8}, {"stem": 8, "dw": 5, "pw": 3, "fc": 8}):
        net.set_config(config)
        reference = prepare_mixed(model, config, method=method, calib=calib, calib_batches=2, **options).eval()
        with torch.no_grad():
            assert torch.equal(net(x), reference(x))
    with pytest.raises(ValueError, match="not a choice"):
        net.set_config({"stem": 8, "dw": 4, "pw": 3, "fc": 8})


def test_the_weight_only_supernet_evaluates_exactly_the_ptq_mixed_model() -> None:
    model = SmallCNN().eval()
    x = torch.randn(8, 1, 6, 6)
    config = {"stem": 8, "dw": 3, "pw": 2, "fc": 4}
    net = Supernet(model, {n: [2, 3, 4, 8] for n in config}, None, [x], 1, method="ste", range="mse")
    net.set_config(config)
    with torch.no_grad():
        assert torch.equal(net(x), ptq_mixed(model, config)(x))


def test_label_free_search_on_unlabeled_batches() -> None:
    model, loader = trained_mlp(0)
    unlabeled = [x for x, _ in loader]
    target = bops(model, SHAPE, 3, 32).total
    for search in ("sensitivity", "reinforce"):
        result = search_mixed_precision(model, unlabeled, SHAPE, target, search=search, loss="kl", a_bits=None,
                                        batches=2, **({"steps": 10} if search == "reinforce" else {}))
        assert result.bops <= target and result.loss > 0
    with pytest.raises(TypeError, match="labelled"):
        search_mixed_precision(model, unlabeled, SHAPE, target)


def test_kl_to_teacher_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    p, q = t.softmax(-1), s.softmax(-1)
    assert float(kl_to_teacher(s, t)) == pytest.approx(float((p * (p / q).log()).sum(-1).mean()), rel=1e-5)
    assert float(kl_to_teacher(t, t)) == pytest.approx(0.0, abs=1e-7)


def test_bad_search_arguments_name_the_valid_values() -> None:
    model, loader = trained_mlp(0)
    target = bops(model, SHAPE, 3, 3).total
    with pytest.raises(UnknownNameError, match="reinforce, sensitivity"):
        search_mixed_precision(model, loader, SHAPE, target, search="evolution")
    with pytest.raises(UnknownNameError, match="independent, lstm"):
        search_mixed_precision(model, loader, SHAPE, target, search="reinforce", policy="mlp")
    with pytest.raises(ValueError, match="loss must be one of"):
        search_mixed_precision(model, loader, SHAPE, target, loss="mse")
    with pytest.raises(ValueError, match="momentum must be in"):
        search_mixed_precision(model, loader, SHAPE, target, search="reinforce", momentum=1.5)
    with pytest.raises(ValueError, match="below the cheapest"):
        search_mixed_precision(model, loader, SHAPE, target / 10, search="reinforce",
                               select=Selector(types=(nn.Linear,), first_last=8))


def test_the_compress_stage_searches_mixed_precision_and_writes_the_evidence(tmp_path) -> None:
    import json

    from qready.app.compress import compress_model
    from qready.recipe import CompressConfig
    from qready.train import TrainConfig

    model, loader = trained_mlp(1)
    block = CompressConfig(method="lsq", w_bits=3, a_bits=3, epochs=1, options={
        "mixed": {"search": "reinforce", "bits": [2, 3, 4], "batches": 1, "steps": 5, "samples": 4}})
    out = compress_model(model, block, loader, TrainConfig(epochs=1, lr=1e-3), {"run_dir": tmp_path, "progress": False})
    summary = json.loads((tmp_path / "mixed_precision.json").read_text())
    assert summary["search"] == "reinforce" and summary["bops"] <= summary["target"]
    assert summary["target"] == bops(model, SHAPE, 3, 3).total
    assert [r["name"] for r in summary["layers"]] == list(LAYERS)
    assert all(set(r["probabilities"]) == {"2", "3", "4"} for r in summary["layers"])
    assert "policy probability" in (tmp_path / "mixed_precision.md").read_text()
    for name, b in summary["config"].items():
        assert out.get_submodule(name).input_quantizer.spec.bits == b


def test_the_sensitivity_evidence_table_and_the_frontier_plot(tmp_path) -> None:
    from qready.sharpness.bops import layer_macs
    from qready.sharpness.mixed_report import layer_table, plot_frontier

    model, loader = trained_mlp(0)
    target = bops(model, SHAPE, 3, 32).total
    result = search_mixed_precision(model, loader, SHAPE, target, bits=(2, 3, 4), a_bits=None, batches=1)
    summary = result.to_dict(layer_macs(model, SHAPE), a_bits=None)
    assert [r["bops"] for r in summary["layers"]] == [r.bops for r in bops(model, SHAPE, result.config, 32).layers]
    table = layer_table(summary)
    assert "Δ loss per bit width" in table and all(f"| {n} |" in table for n in LAYERS)
    points = [{"method": m, "bops": b, "value": v} for m, b, v in
              (("uniform", 1e6, 90.0), ("uniform", 2e6, 95.0), ("sensitivity", 1.5e6, 93.0), ("reinforce", 1.4e6, 94.0))]
    path = plot_frontier({"toy": points}, tmp_path / "frontier.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ptq_mixed_with_gptq_gives_each_layer_its_grid() -> None:
    model, loader = trained_mlp(0)
    config = {"0": 2, "2": 4, "4": 3}
    qmodel = ptq_mixed(model, config, calib=loader, method="gptq")
    for name, b in config.items():
        w = qmodel.get_submodule(name).weight
        assert max(len(torch.unique(row)) for row in w) <= 2 ** b  # per channel: at most 2^b levels
    rtn = ptq_mixed(model, config)
    assert any(not torch.equal(qmodel.get_submodule(n).weight, rtn.get_submodule(n).weight) for n in config)
