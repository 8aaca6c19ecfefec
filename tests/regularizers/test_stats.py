"""Per-layer weight statistics, the epoch logger and the histogram plot."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from qready.quant import Selector
from qready.regularizers.stats import StatsLogger, layer_stats, plot_weight_histograms, weight_stats


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5), nn.Linear(5, 2))


def _reference(values: list[float]) -> dict:
    """Plain-Python statistics (population moments, Pearson kurtosis)."""
    n = len(values)
    mean = sum(values) / n
    m2 = sum((v - mean) ** 2 for v in values) / n
    m4 = sum((v - mean) ** 4 for v in values) / n
    max_abs = max(abs(v) for v in values)
    return {"numel": n, "min": min(values), "max": max(values), "range": max(values) - min(values),
            "max_abs": max_abs, "std": math.sqrt(m2), "max_abs_over_std": max_abs / math.sqrt(m2),
            "kurtosis": m4 / m2**2}


def test_layer_stats_match_plain_python():
    model = _net()
    with torch.no_grad():
        model[3].weight[0, 0] = 4.0  # an outlier: high kurtosis and max_abs/std
    stats = layer_stats(model)
    assert [s["name"] for s in stats] == ["0", "3", "4"]
    for s in stats:
        ref = _reference(model.get_submodule(s["name"]).weight.detach().double().flatten().tolist())
        assert s["numel"] == ref["numel"]
        for key in ("min", "max", "range", "max_abs", "std", "max_abs_over_std", "kurtosis"):
            assert s[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-15), key
    assert stats[1]["kurtosis"] > 10 and stats[1]["max_abs"] == 4.0


def test_known_values_and_degenerate_layer():
    s = weight_stats(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert (s["std"], s["kurtosis"], s["max_abs_over_std"], s["range"]) == (1.0, 1.0, 1.0, 2.0)
    const = weight_stats(torch.full((5,), 0.3))
    assert const["std"] == 0 and math.isnan(const["kurtosis"]) and math.isnan(const["max_abs_over_std"])


def test_names_or_selector_forms():
    model = _net()
    assert [s["name"] for s in layer_stats(model, ["4"])] == ["4"]
    assert [s["name"] for s in layer_stats(model, Selector(types=(nn.Linear,)))] == ["3", "4"]
    assert [s["name"] for s in layer_stats(model, {"first_last": "float"})] == ["3"]
    with pytest.raises(TypeError, match="names_or_selector"):
        layer_stats(model, 3)
    with pytest.raises(TypeError, match="module names"):
        layer_stats(model, [0])


def test_stats_logger_appends_one_json_line_per_epoch(tmp_path):
    model = _net()
    path = tmp_path / "sub" / "stats.jsonl"
    logger = StatsLogger({"types": (nn.Linear,)}, path)
    logger(0, {"loss": 1.0}, model)
    with torch.no_grad():
        model[4].weight.mul_(2)
    logger(1, {"loss": 0.5}, model)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert [layer["name"] for layer in records[1]["layers"]] == ["3", "4"]
    assert records[1]["layers"][1]["max_abs"] == pytest.approx(2 * records[0]["layers"][1]["max_abs"])


def test_plot_weight_histograms_writes_png(tmp_path):
    before = _net()
    after = copy.deepcopy(before)
    with torch.no_grad():
        after[3].weight.clamp_(-0.1, 0.1)
    path = plot_weight_histograms(before, after, tmp_path / "plots" / "hist.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="no layer"):
        plot_weight_histograms(before, after, tmp_path / "x.png", selector={"include": ("nothing",)})
