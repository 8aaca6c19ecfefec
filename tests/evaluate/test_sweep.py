"""Sweeps on a model trained on real digits; bit-setting parsing; report tables and plots."""

import pytest
import torch

from qready.data import load_dataset, make_loaders
from qready.evaluate import parse_bit_setting, sweep
from qready.evaluate.plots import plot_accuracy_vs_bits
from qready.evaluate.report import markdown_table, pivot_sweep
from qready.models import create_model
from qready.quant import QuantSpec
from qready.train import TrainConfig, fit, seed_everything


@pytest.fixture(scope="module")
def trained_digits():
    splits = load_dataset("digits", seed=0)
    train_loader, test_loader = make_loaders(splits, 64, seed=0)
    seed_everything(0)
    model = create_model("dwcnn", num_classes=10, in_channels=1, width=16)
    fit(model, train_loader, TrainConfig(epochs=6, lr=0.01), seed=0, progress=False)
    return model, train_loader, test_loader


def test_8bit_ptq_within_half_a_point_of_float(trained_digits):
    model, train_loader, test_loader = trained_digits
    rows = sweep(model, test_loader, bits=[8, 2, "W8A8"], spec=QuantSpec(bits=8, range="minmax"), calib=train_loader)
    by_label = {r["label"]: r for r in rows}
    assert by_label["FP"]["accuracy"] > 90.0
    assert abs(by_label["W8"]["accuracy"] - by_label["FP"]["accuracy"]) <= 0.5
    assert abs(by_label["W8A8"]["accuracy"] - by_label["FP"]["accuracy"]) <= 1.0
    assert by_label["W2"]["accuracy"] < by_label["FP"]["accuracy"]  # 2 bits must cost something here
    assert {"label", "w_bits", "a_bits", "range", "granularity", "accuracy", "loss"} <= set(rows[0])


def test_mse_ranges_reconstruct_weights_better_than_minmax_at_low_bits(trained_digits):
    """Per layer, MSE ranges never reconstruct the weights worse (the search includes the min-max clip),
    and clearly better overall (ratio ≈ 0.66 on seeds 0-2). Their *test loss* is not always lower: on
    seed 2 min-max gives the lower 3-bit loss, so that is not asserted."""
    from qready.quant import Selector, fake_quantize

    model, _, test_loader = trained_digits
    rows = sweep(model, test_loader, bits=[3], spec=QuantSpec(bits=8, range="mse"), include_fp=False)
    assert rows[0]["range"] == "mse" and rows[0]["loss"] > 0
    errors = {rng: [] for rng in ("minmax", "mse")}
    for item in Selector().select(model):
        w = item.module.weight.detach()
        for rng in errors:
            errors[rng].append(float((fake_quantize(w, QuantSpec(bits=3, range=rng)) - w).square().sum()))
    assert all(e <= m * (1 + 1e-6) for e, m in zip(errors["mse"], errors["minmax"], strict=True))
    assert sum(errors["mse"]) < 0.8 * sum(errors["minmax"])


def test_sweep_leaves_model_untouched(trained_digits):
    model, _, test_loader = trained_digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sweep(model, test_loader, bits=[2])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_parse_bit_setting():
    assert parse_bit_setting(4) == (4, None)
    assert parse_bit_setting("W4A8") == (4, 8)
    assert parse_bit_setting("w3") == (3, None)
    assert parse_bit_setting((2, 4)) == (2, 4)
    for bad in (0, 9, "four", "W4A1", (4,), True):
        with pytest.raises((ValueError, TypeError)):
            parse_bit_setting(bad)


def test_activation_rows_need_calibration(trained_digits):
    model, _, test_loader = trained_digits
    with pytest.raises(ValueError, match="calib"):
        sweep(model, test_loader, bits=["W4A4"])


def test_report_table_and_plot(tmp_path):
    rows = [
        {"label": "FP", "w_bits": None, "a_bits": None, "range": "minmax", "granularity": "channel", "accuracy": 97.0, "loss": 0.1},
        {"label": "W4", "w_bits": 4, "a_bits": None, "range": "minmax", "granularity": "channel", "accuracy": 95.0, "loss": 0.2},
        {"label": "W4", "w_bits": 4, "a_bits": None, "range": "mse", "granularity": "channel", "accuracy": 96.0, "loss": 0.15},
    ]
    header, lines = pivot_sweep(rows)
    assert header == ["range", "FP", "W4"]
    assert lines == [["minmax", "97.00", "95.00"], ["mse", "97.00", "96.00"]]
    md = markdown_table(header, lines)
    assert md.count("\n") == 4 and "| mse | 97.00 | 96.00 |" in md
    path = plot_accuracy_vs_bits(rows, tmp_path / "p.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
