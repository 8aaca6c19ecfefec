"""Quantization-readiness diagnosis: the first-order estimate against direct computations, its ranking
of a badly scaled layer, its agreement with measured loss increases, JSON and the CLI entry point."""

import copy
import io
import json

import pytest
import torch
import yaml
from rich.console import Console
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

from qready.app.cli import main
from qready.app.commands import inspect_command
from qready.data import load_dataset, make_loaders
from qready.evaluate.inspect import diagnose, spearman
from qready.models import create_model
from qready.quant.spec import QuantSpec
from qready.train import TrainConfig, fit, seed_everything

LAYER_KEYS = {"name", "type", "numel", "min", "max", "range", "max_abs", "std", "max_abs_over_std",
              "outlier_share", "kurtosis", "grad_l1", "sensitivity", "measured", "fidelity", "rank", "position", "keep_higher"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (several oversubscribe a busy 2-core machine, ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """A dwcnn (width 8) trained 8 epochs on digits, and 16 of its training batches."""
    seed_everything(0)
    splits = load_dataset("digits", seed=0)
    train_loader, _ = make_loaders(splits, 64, seed=0)
    model = create_model("dwcnn", num_classes=10, in_channels=1, width=8)
    fit(model, train_loader, TrainConfig(epochs=8, optimizer="adam", lr=0.01, batch_size=64), progress=False, seed=0)
    batches = [batch for _, batch in zip(range(16), train_loader, strict=False)]
    return model.eval(), batches


def _rows(t: torch.Tensor, granularity: str) -> torch.Tensor:
    """Reference scale-group view of a Linear weight [C, 6] (group size 3)."""
    if granularity == "tensor":
        return t.reshape(1, -1)
    return t if granularity == "channel" else t.reshape(-1, 3)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_sensitivity_and_measurement_match_direct_computation(granularity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    xs, ys = torch.randn(25, 6), torch.randint(0, 3, (25,))
    # Unequal batch sizes; the 4th "batch" would crash if it were used (num_batches=3).
    batches = [(xs[:10], ys[:10]), (xs[10:20], ys[10:20]), (xs[20:], ys[20:]), (torch.randn(2, 99), ys[:2])]
    spec = QuantSpec(granularity=granularity, group_size=3 if granularity == "group" else None)
    result = diagnose(model, batches, bits=(4, 2, 1), spec=spec, num_batches=3)

    ref = copy.deepcopy(model).double()  # float64, one concatenated batch, ordinary backward
    base = F.cross_entropy(ref(xs.double()), ys)
    base.backward()
    assert result.loss == pytest.approx(base.item(), rel=1e-5)
    assert result.num_samples == 25
    for layer, index in zip(result.layers, [0, 2], strict=True):
        module = ref[index]
        w, g = _rows(module.weight.detach(), granularity), _rows(module.weight.grad, granularity)
        assert layer["grad_l1"] == pytest.approx(float(g.abs().sum()), rel=1e-4)
        for b in (4, 2, 1):
            if b == 1:  # levels ±mean|w| per group: step 2·mean|w|
                step, wq = 2 * w.abs().mean(1), torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True)
            else:
                qmax = 2 ** (b - 1) - 1
                step = w.abs().amax(1) / qmax
                wq = torch.clamp(torch.round(w / step[:, None]), -qmax - 1, qmax) * step[:, None]
            expected = float((step / 2 * g.abs().sum(1)).sum())
            assert layer["sensitivity"][b] == pytest.approx(expected, rel=1e-4)
            quantized = copy.deepcopy(ref)
            with torch.no_grad():
                quantized[index].weight.copy_(wq.reshape(module.weight.shape))
            increase = (F.cross_entropy(quantized(xs.double()), ys) - base).item()
            assert layer["measured"][b] == pytest.approx(increase, rel=1e-3, abs=1e-5)
    assert [layer["position"] for layer in result.layers] == ["first", "last"]


def test_model_is_left_unchanged():
    torch.manual_seed(0)
    model = create_model("dwcnn", num_classes=10, in_channels=1, width=4).train()
    model.features[1][1][0].weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    result = diagnose(model, [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))], bits=(3,))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.features[1][1][0].weight.requires_grad
    frozen = next(layer for layer in result.layers if layer["name"] == "features.1.1.0")
    assert frozen["sensitivity"][3] > 0  # its gradient is still computed


def _scale_output_channels(model: nn.Module, block: str, channels) -> nn.Module:
    """Scale conv output ``channels`` of ``block`` (conv, BN, ReLU) ×10 and let the BN statistics absorb it."""
    model = copy.deepcopy(model)
    conv, bn = model.get_submodule(block)[0], model.get_submodule(block)[1]
    with torch.no_grad():
        conv.weight[channels] *= 10
        bn.running_mean[channels] *= 10
        bn.running_var[channels] *= 100
    return model


@pytest.mark.parametrize("block", ["features.1.1", "features.2.0", "features.3.0"])
def test_a_channel_scaled_up_ranks_its_layer_first(trained, block):
    """Per-tensor PTQ: one output channel ×10 (BN absorbs it, the function is unchanged) makes the layer's
    step 10× for the other channels too, so the layer becomes the most sensitive one."""
    model, batches = trained
    scaled = _scale_output_channels(model, block, 0)
    x = batches[0][0]
    assert torch.allclose(scaled(x), model(x), atol=1e-3)
    spec = QuantSpec(granularity="tensor")
    before = diagnose(model, batches[:4], bits=(2,), spec=spec, measure=False)
    after = diagnose(scaled, batches[:4], bits=(2,), spec=spec, measure=False)
    name = f"{block}.0"
    assert next(layer["rank"] for layer in before.layers if layer["name"] == name) > 1
    layer = next(layer for layer in after.layers if layer["name"] == name)
    assert layer["rank"] == 1 and layer["keep_higher"]
    assert any(name in line for line in after.recommend)


def test_whole_layer_scaled_with_per_channel_scales_is_not_more_sensitive(trained):
    """Scaling a whole conv ×10 before BN scales each channel's step ×10 and its gradient ×0.1: the
    estimate (and the real loss increase) must not change -- a range alone is no sensitivity."""
    model, batches = trained
    scaled = _scale_output_channels(model, "features.2.1", slice(None))
    a = diagnose(model, batches[:4], bits=(4, 2))
    b = diagnose(scaled, batches[:4], bits=(4, 2))
    for la, lb in zip(a.layers, b.layers, strict=True):
        for bits in (4, 2):
            assert lb["sensitivity"][bits] == pytest.approx(la["sensitivity"][bits], rel=5e-3)
            assert lb["measured"][bits] == pytest.approx(la["measured"][bits], rel=1e-2, abs=1e-4)
    range_a, range_b = (next(ly["range"] for ly in d.layers if ly["name"] == "features.2.1.0") for d in (a, b))
    assert range_b == pytest.approx(10 * range_a, rel=1e-5)


def test_estimate_ranks_layers_like_the_measured_increase(trained):
    """Across 20 training seeds the W2 rank correlation ranged 0.12-0.95 (16 batches, 8 epochs)."""
    model, batches = trained
    result = diagnose(model, batches, bits=(4, 2))
    estimate = [layer["sensitivity"][2] for layer in result.layers]
    measured = [layer["measured"][2] for layer in result.layers]
    assert all(m > 0 for m in measured)
    rho = spearmanr(estimate, measured)[0]
    assert result.spearman[2] == pytest.approx(rho, abs=1e-9)
    assert rho > 0


def test_spearman_matches_scipy_with_ties():
    a, b = [1.0, 2.0, 2.0, 5.0, 3.0, 0.5], [0.3, 0.1, 0.2, 0.2, 0.9, 0.0]
    assert spearman(a, b) == pytest.approx(spearmanr(a, b)[0], abs=1e-12)
    assert spearman([1.0, 1.0], [0.0, 1.0]) is None


def test_json_has_every_field_and_no_nan():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(0.5)  # std 0: kurtosis and max|w|/std are undefined
    batches = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    data = json.loads(diagnose(model, batches, bits=(8, 3)).to_json())
    assert set(data) >= {"layers", "recommend", "bits", "spec", "loss", "num_samples", "spearman"}
    assert data["bits"] == [8, 3] and data["spec"]["granularity"] == "channel"
    for layer in data["layers"]:
        assert set(layer) == LAYER_KEYS
        assert set(layer["sensitivity"]) == set(layer["measured"]) == {"8", "3"}
    assert data["layers"][0]["kurtosis"] is None and data["layers"][1]["kurtosis"] > 0
    assert data["recommend"] and all(isinstance(line, str) for line in data["recommend"])


def test_table_lists_every_layer():
    model = create_model("dwcnn", num_classes=10, in_channels=1, width=4)
    result = diagnose(model, [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))], bits=(4, 2))
    console = Console(file=io.StringIO(), width=160)
    console.print(result.table())
    text = console.file.getvalue()
    for layer in result.layers:
        assert layer["name"] in text
    assert "S W2" in text and "ΔL W2" in text and "KL W2" in text


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"bits": ("W4A8",)}, "bits"), ({"bits": 4}, "bits"), ({"bits": (9,)}, "weight bits"),
     ({"num_batches": 0}, "num_batches"), ({"select": {"include": ["nothing"]}}, "select"),
     ({"spec": 4}, "spec")],
)
def test_errors_name_the_argument(kwargs, needle):
    model = nn.Sequential(nn.Linear(4, 3))
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]))]
    with pytest.raises((ValueError, TypeError), match=needle):
        diagnose(model, batches, **kwargs)
    with pytest.raises(ValueError, match="batches"):
        diagnose(model, [])


def test_inspect_command_on_a_cli_checkpoint(tmp_path, capsys):
    recipe = {"name": "tiny", "seed": 0, "model": {"name": "dwcnn", "args": {"width": 8}}, "data": {"name": "digits"},
              "train": {"epochs": 1, "lr": 0.01, "batch_size": 64}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    names = [name for name, m in create_model("dwcnn", width=8).named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    assert inspect_command(str(run / "checkpoint"), batches=2, bits=(4, 2)) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in names)
    assert "keep" in out and "S W4" in out

    assert inspect_command(str(run / "checkpoint"), batches=2, bits=(4, 2), as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert [layer["name"] for layer in data["layers"]] == names
    assert data["num_samples"] == 128 and data["bits"] == [4, 2]
