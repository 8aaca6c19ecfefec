"""Fidelity without labels: metrics checked against hand computations, every batch form, sweep rows
and report columns on unlabeled data."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from qready.evaluate.fidelity import FIDELITY_KEYS, FidelityMeter, fidelity, softmax_kl


class Scaled(nn.Module):
    """``scale · model(x)``: a perturbation with a known SQNR, ``−20·log10|scale − 1|`` dB."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.scale * self.model(x)


class KwargsNet(nn.Module):
    """A model called with keyword arguments, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 4)

    def forward(self, input_ids, attention_mask=None):
        out = self.net(input_ids)
        return out if attention_mask is None else out * attention_mask[:, :1]


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def _np_reference(z_t, z_s, confidence=0.5):
    """The metrics written out in numpy, one position at a time."""
    z_t, z_s = z_t.double().numpy(), z_s.double().numpy()
    kls, coss, agree, conf, agree_conf = [], [], 0, 0, 0
    for a, b in zip(z_t, z_s, strict=True):
        p = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
        q = np.exp(b - b.max()) / np.exp(b - b.max()).sum()
        kls.append(float(np.sum(p * (np.log(p) - np.log(q)))))
        coss.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        same = a.argmax() == b.argmax()
        agree += same
        if p.max() >= confidence:
            conf += 1
            agree_conf += same
    sqnr = 10 * math.log10(np.sum(z_t**2) / np.sum((z_t - z_s) ** 2))
    return {"agreement": 100 * agree / len(z_t), "agreement_confident": 100 * agree_conf / conf if conf else None,
            "confident_n": conf, "kl": np.mean(kls), "sqnr_db": sqnr, "cosine": np.mean(coss)}


def test_identical_models_agree_fully():
    model = _model()
    x, y = _data()
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    for other in (model, copy.deepcopy(model)):  # the same object (one forward) and an equal copy
        res = fidelity(model, other, batches)
        assert res["agreement"] == 100.0
        assert res["agreement_confident"] in (100.0, None)
        assert res["kl"] == pytest.approx(0.0, abs=1e-12)
        assert res["sqnr_db"] == math.inf  # identical outputs: no noise at all
        assert res["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert res["n"] == 64
        assert set(FIDELITY_KEYS) <= set(res)


def test_scaled_output_gives_the_analytic_sqnr():
    model = _model()
    x, _ = _data()
    for scale, sqnr in ((1.1, 20.0), (0.99, 40.0), (2.0, 0.0)):
        res = fidelity(model, Scaled(model, scale), [x])
        assert res["sqnr_db"] == pytest.approx(sqnr, abs=1e-4)  # float32 outputs
        assert res["cosine"] == pytest.approx(1.0, abs=1e-9)  # a positive scale keeps the direction
        assert res["agreement"] == 100.0  # ... and the top-1 class
    res = fidelity(model, Scaled(model, -1.0), [x])
    assert res["cosine"] == pytest.approx(-1.0, abs=1e-9)
    assert res["sqnr_db"] == pytest.approx(-10 * math.log10(4), abs=1e-4)


def test_meter_matches_numpy_hand_computation():
    g = torch.Generator().manual_seed(3)
    z_t = 3 * torch.randn(200, 5, generator=g)
    z_s = z_t + torch.randn(200, 5, generator=g)
    meter = FidelityMeter(confidence=0.6)
    meter.update(z_t[:70], z_s[:70])
    meter.update(z_t[70:], z_s[70:])
    res, ref = meter.result(), _np_reference(z_t, z_s, confidence=0.6)
    assert 0 < ref["confident_n"] < 200 and ref["agreement"] < 100  # the case is not degenerate
    for key in ("agreement", "agreement_confident", "confident_n", "kl", "sqnr_db", "cosine"):
        assert res[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert res["accuracy"] is None and res["loss"] is None  # no targets


def test_confident_subset_on_a_hand_made_case():
    # reference top-1 probabilities: softmax([2, 0]) ≈ 0.88 (confident), softmax([0.1, 0]) ≈ 0.52, [0, 0] = 0.5
    z_t = torch.tensor([[2.0, 0.0], [0.1, 0.0], [0.0, 0.3], [1.0, 1.0]])
    z_s = torch.tensor([[1.0, 0.0], [0.0, 0.1], [0.0, 1.0], [0.0, 1.0]])
    meter = FidelityMeter()
    meter.update(z_t, z_s)
    res = meter.result()
    assert res["confident_n"] == 4  # 0.88, 0.525, 0.574, 0.5 are all >= 0.5
    meter = FidelityMeter(confidence=0.55)
    meter.update(z_t, z_s)
    res = meter.result()
    assert res["confident_n"] == 2 and res["agreement_confident"] == 100.0
    assert res["agreement"] == 50.0  # rows 2 and 4 flip (row 4: a tie resolved to class 0 by argmax)


def test_accuracy_and_loss_when_labelled():
    model = _model()
    x, y = _data()
    res = fidelity(model, Scaled(model, 1.5), [(x, y)])
    logits = 1.5 * model(x).detach()
    assert res["accuracy"] == pytest.approx(100.0 * float((logits.argmax(1) == y).double().mean()))
    assert res["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits.double(), y)), rel=1e-9)
    with pytest.raises(ValueError, match="some batches have targets"):
        fidelity(model, model, [(x[:8], y[:8]), x[8:]])


def test_every_batch_form_and_output_fn():
    torch.manual_seed(0)
    ref = KwargsNet()
    other = copy.deepcopy(ref)
    with torch.no_grad():
        other.net.weight.add_(0.05 * torch.randn_like(other.net.weight))
    x, y = _data()
    mask = torch.ones(64, 3)
    forms = {
        "dict": [{"input_ids": x, "attention_mask": mask}],
        "(dict, targets)": [({"input_ids": x, "attention_mask": mask}, y)],
    }
    results = {name: fidelity(ref, other, data) for name, data in forms.items()}
    assert results["dict"]["accuracy"] is None and results["(dict, targets)"]["accuracy"] is not None
    for key in FIDELITY_KEYS:
        assert results["dict"][key] == results["(dict, targets)"][key]
    model = _model()
    tensor_res = fidelity(model, Scaled(model, 1.1), [x])
    pair_res = fidelity(model, Scaled(model, 1.1), [(x, y)])
    assert tensor_res["kl"] == pair_res["kl"] and tensor_res["n"] == 64
    # output_fn: compare the hidden layer instead of the logits
    hidden = fidelity(model, Scaled(model, 1.1), [x], output_fn=lambda m, inp: m[0](inp) if isinstance(m, nn.Sequential)
                      else m.scale * m.model[0](inp))
    assert hidden["sqnr_db"] == pytest.approx(20.0, abs=1e-4)


def test_bad_arguments_are_named():
    model = _model()
    x, _ = _data()
    with pytest.raises(ValueError, match="confidence"):
        fidelity(model, model, [x], confidence=1.5)
    with pytest.raises(ValueError, match="empty"):
        fidelity(model, model, [])
    wider = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(ValueError, match="output shape"):
        fidelity(model, wider, [x])
    with pytest.raises(ValueError, match="class axis"):
        softmax_kl(torch.zeros(3, 1), torch.zeros(3, 1))


def test_models_keep_their_mode():
    model = _model()
    other = copy.deepcopy(model).train()
    model.eval()
    fidelity(model, other, [_data()[0]])
    assert not model.training and other.training


def test_sweep_rows_on_unlabeled_and_labelled_data(tmp_path):
    from qready.app.stages import write_report
    from qready.evaluate import sweep
    from qready.evaluate.report import sweep_tables
    from qready.recipe import Recipe

    model = _model()
    x, y = _data(128)
    unlabeled = [x[:64], x[64:]]
    rows = sweep(model, unlabeled, bits=[8, 2, "W8A8"], calib=unlabeled)
    by_label = {r["label"]: r for r in rows}
    assert all(r["accuracy"] is None and r["loss"] is None for r in rows)
    assert by_label["FP"]["agreement"] == 100.0 and by_label["FP"]["sqnr_db"] == math.inf
    assert by_label["W8"]["kl"] < 1e-3 and by_label["W8"]["sqnr_db"] > 30  # 8 bits: nearly the float outputs
    assert by_label["W2"]["kl"] > 10 * by_label["W8"]["kl"] and by_label["W2"]["sqnr_db"] < by_label["W8"]["sqnr_db"]
    assert by_label["W8A8"]["agreement"] >= 90.0
    labelled = sweep(model, [(x, y)], bits=[8], include_fp=False)[0]
    assert labelled["accuracy"] is not None and labelled["kl"] == pytest.approx(by_label["W8"]["kl"], rel=1e-6)

    titles = [t for t, _, _ in sweep_tables(rows)]
    assert not any("accuracy" in t.lower() for t in titles)  # no labels: no accuracy table
    assert any("agreement" in t for t in titles) and any("SQNR" in t for t in titles) and any("KL" in t for t in titles)
    header, lines = next((h, ln) for t, h, ln in sweep_tables(rows) if "SQNR" in t)
    assert header[:2] == ["range", "FP"] and lines[0][1] == "inf"
    write_report(tmp_path, rows, Recipe(), plot=True)
    report = (tmp_path / "report.md").read_text()
    assert "Top-1 agreement" in report and "Test accuracy" not in report
    saved = json.loads((tmp_path / "sweep.json").read_text())  # strict JSON: the infinite SQNR is null
    assert saved[0]["sqnr_db"] is None and saved[1]["kl"] == pytest.approx(by_label["W8"]["kl"])
    assert (tmp_path / "accuracy_vs_bits.png").stat().st_size > 0  # plots the agreement without labels
    from qready.app.comparison import write_comparison

    md, page = write_comparison(tmp_path)  # the run comparison page shows the agreement too
    assert "Top-1 agreement with the float model (%), mean ± std" in md.read_text()
    assert "Top-1 agreement" in page.read_text() and "100.00" in md.read_text()
    with_labels = [t for t, _, _ in sweep_tables(sweep(model, [(x, y)], bits=[4]))]
    assert with_labels[0].startswith("Test accuracy") and len(with_labels) == 5  # accuracy alongside fidelity


def test_inspect_measures_each_layers_fidelity_without_labels():
    from qready.evaluate.inspect import diagnose
    from qready.quant import QuantSpec
    from qready.quant.functional import fake_quantize

    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0] = 8.0  # one outlier: the first layer's 3-bit grid becomes coarse
    x, y = _data(96)
    unlabeled = [x[:48], x[48:]]
    spec = QuantSpec(bits=8, granularity="tensor")
    result = diagnose(model, unlabeled, bits=(8, 3), spec=spec)
    assert not result.labelled
    first, last = result.layers
    assert first["fidelity"][3]["kl"] > last["fidelity"][3]["kl"]  # the outlier layer moves the outputs most
    assert any(line.startswith("largest output error at W3 when quantized alone: 0 ") for line in result.recommend)
    # the measured KL is the fidelity of the model with only that layer quantized
    alone = copy.deepcopy(model)
    with torch.no_grad():
        alone[0].weight.copy_(fake_quantize(alone[0].weight, spec.with_bits(3)))
    direct = fidelity(model, alone, unlabeled)
    for key in ("kl", "agreement", "sqnr_db"):
        assert first["fidelity"][3][key] == pytest.approx(direct[key], rel=1e-6), key
    # labels change the loss and gradient, not the fidelity
    labelled = diagnose(model, [(x[:48], y[:48]), (x[48:], y[48:])], bits=(8, 3), spec=spec)
    assert labelled.labelled and labelled.layers[0]["fidelity"] == first["fidelity"]


def test_confidence_threshold_is_configurable_in_sweeps_and_recipes():
    from qready.evaluate import sweep
    from qready.recipe import RecipeError, load_recipe

    model = Scaled(_model(), 4.0)  # sharper logits: a spread of top-1 probabilities
    x, _ = _data(128)
    counts = [sweep(model, [x], bits=[4], include_fp=False, confidence=c)[0]["confident_n"] for c in (0.0, 0.5, 0.9)]
    assert counts[0] == 128 and counts[0] > counts[1] > counts[2] > 0
    assert load_recipe({"sweep": {"confidence": 0.8}}).sweep.confidence == 0.8
    with pytest.raises(RecipeError, match=r"sweep.confidence must be a probability in \[0, 1\]"):
        load_recipe({"sweep": {"confidence": 1.5}})
