"""Batch forms (qready.batching) and dict batches through every consumer, on a tiny keyword-input model."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from qready.batching import (
    batch_inputs,
    batch_targets,
    check_inputs_finite,
    forward,
    inputs_size,
    move_inputs,
    output_tensor,
    split_batch,
)
from qready.evaluate.inspect import diagnose
from qready.evaluate.metrics import evaluate
from qready.evaluate.sweep import sweep
from qready.quant import QuantSpec, prepare_qat, ptq, run_batches
from qready.quant.qat.hessian import estimate_ewgs_deltas

VOCAB, TOKENS, CLASSES = 16, 6, 3


@dataclass
class Output:
    """Stands in for a Hugging Face ``ModelOutput``: logits as an attribute."""

    logits: torch.Tensor
    hidden: torch.Tensor


class KeywordModel(nn.Module):
    """``model(input_ids=..., attention_mask=...)`` -> :class:`Output` (mean-pooled embeddings, a linear head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Output:
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        pooled = h.mean(dim=1)
        return Output(logits=self.head(torch.relu(pooled)), hidden=pooled)


def _make_batches(n_batches: int = 4, size: int = 32, seed: int = 0) -> list[tuple[dict, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        labels = torch.randint(0, CLASSES, (size,), generator=g)
        ids = torch.randint(0, VOCAB, (size, TOKENS), generator=g)
        own = torch.rand(size, TOKENS, generator=g) < 0.6  # most tokens from the label's block of the vocabulary
        block = labels[:, None] * 5 + torch.randint(0, 5, (size, TOKENS), generator=g)
        ids = torch.where(own, block, ids)
        out.append(({"input_ids": ids, "attention_mask": torch.ones(size, TOKENS)}, labels))
    return out


@pytest.fixture(scope="module")
def trained() -> tuple[KeywordModel, list]:
    torch.manual_seed(0)
    model, batches = KeywordModel(), _make_batches(8)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(15):
        for inputs, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(output_tensor(forward(model, inputs)), y).backward()
            opt.step()
    return model.eval(), batches


# ----------------------------------------------------------------------------- the helpers


def test_split_batch_accepts_every_form() -> None:
    x, y, d = torch.zeros(2, 3), torch.tensor([0, 1]), {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    assert split_batch(x) == (x, None)
    assert split_batch((x, y))[1] is y and split_batch([x, y])[0] is x
    assert split_batch(d) == (d, None)
    assert split_batch((d, y)) == (d, y)
    assert split_batch((x,)) == (x, None)
    assert batch_inputs((d, y)) is d


@pytest.mark.parametrize("bad", [3, "text", None, (), ("a", torch.zeros(1)), [1, 2]])
def test_split_batch_names_the_accepted_forms(bad: object) -> None:
    with pytest.raises(TypeError, match=r"a tensor, an \(inputs, targets\) pair, a dict of model keyword arguments"):
        split_batch(bad)


def test_targets_must_be_a_tensor_and_unlabeled_is_named() -> None:
    with pytest.raises(TypeError, match="targets must be a tensor, got list"):
        split_batch((torch.zeros(1), [0]))
    with pytest.raises(TypeError, match="my consumer needs labelled batches"):
        batch_targets({"input_ids": torch.zeros(1)}, "my consumer")


def test_move_size_finite_and_output() -> None:
    d = {"input_ids": torch.zeros(4, 2, dtype=torch.long), "flag": True}
    moved = move_inputs(d, "cpu")
    assert moved["flag"] is True and moved["input_ids"].dtype == torch.long
    assert move_inputs(d, None) is d
    assert inputs_size(d) == 4 and inputs_size(torch.zeros(5, 1)) == 5
    with pytest.raises(TypeError, match="at least one tensor"):
        inputs_size({"flag": True})
    with pytest.raises(ValueError, match="calibration: an input batch holds NaN"):
        check_inputs_finite({"x": torch.tensor([float("nan")])}, "calibration")
    check_inputs_finite({"ids": torch.zeros(2, dtype=torch.long)})  # integer inputs are not checked
    t = torch.ones(2)
    assert output_tensor(t) is t
    assert output_tensor(Output(logits=t, hidden=torch.zeros(1))) is t
    assert output_tensor(OrderedDict(loss=t)) is t and output_tensor((None, t)) is t
    with pytest.raises(TypeError, match="cannot find an output tensor in a str"):
        output_tensor("x")


# ----------------------------------------------------------------------------- consumers


def test_evaluate_reads_dict_batches_and_refuses_unlabeled(trained) -> None:
    model, batches = trained
    metrics = evaluate(model, batches)
    correct = sum(int((model(**x).logits.argmax(1) == y).sum()) for x, y in batches)
    assert metrics["n"] == 256 and metrics["accuracy"] == pytest.approx(100 * correct / 256)
    assert metrics["accuracy"] > 60  # learnable, far above the 33 % of chance
    with pytest.raises(TypeError, match="evaluate needs labelled batches"):
        evaluate(model, [x for x, _ in batches])


def test_ptq_and_sweep_calibrate_on_dict_batches(trained) -> None:
    model, batches = trained
    unlabeled = [x for x, _ in batches]
    act = QuantSpec(bits=8, symmetric=False, granularity="tensor")
    q = ptq(model, QuantSpec(bits=8), calib=unlabeled, act_spec=act)
    assert q.head.input_quantizer.scale > 0 and not hasattr(q.embed, "input_quantizer")
    rows = sweep(model, batches, bits=["W8A8", 2], calib=unlabeled)
    fp, w8a8, w2 = (r["accuracy"] for r in rows)
    assert abs(w8a8 - fp) <= 2.0 and rows[2]["loss"] > rows[0]["loss"]
    assert run_batches(model, unlabeled, 2) == 2


def test_qat_calibration_and_ewgs_hessian_on_dict_batches(trained) -> None:
    model, batches = trained
    q = prepare_qat(model, method="ewgs", w_bits=4, a_bits=8, calib=[x for x, _ in batches])
    assert q.head.input_quantizer.initialized
    deltas = estimate_ewgs_deltas(q, batches, max_batches=2, generator=torch.Generator().manual_seed(0))
    assert set(deltas) >= {"head.parametrizations.weight.0"} and all(d >= 0 for d in deltas.values())
    with pytest.raises(TypeError, match="estimate_ewgs_deltas needs labelled batches"):
        estimate_ewgs_deltas(q, [x for x, _ in batches])


def test_diagnose_on_dict_batches(trained) -> None:
    model, batches = trained
    diag = diagnose(model, batches, bits=(8, 2), num_batches=2)
    assert [layer["name"] for layer in diag.layers] == ["embed", "head"]
    assert diag.num_samples == 64
    for layer in diag.layers:
        assert abs(layer["measured"][8]) < 1e-3 < abs(layer["measured"][2])


def test_fit_and_saq_train_on_dict_batches() -> None:
    from qready.sharpness import SAQStep
    from qready.train import TrainConfig, fit

    torch.manual_seed(0)
    batches = _make_batches(8)
    model = KeywordModel()
    before = evaluate(model, batches)["accuracy"]
    result = fit(model, batches, TrainConfig(epochs=3, lr=0.05, schedule="none"), val_loader=batches, progress=False)
    assert result.history[-1]["val_acc"] > max(before, 60)
    q = prepare_qat(model, method="lsq", w_bits=4, calib=[x for x, _ in batches])
    fit(q, batches[:2], TrainConfig(epochs=1, lr=1e-3, schedule="none"), step_strategy=SAQStep(rho=0.05),
        progress=False)
    assert evaluate(q, batches)["accuracy"] > 50
    with pytest.raises(TypeError, match="cross-entropy objective needs labelled batches"):
        fit(KeywordModel(), [x for x, _ in batches], TrainConfig(epochs=1), progress=False)


class NormedKeywordModel(KeywordModel):
    """:class:`KeywordModel` with a BatchNorm on the pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Output:
        pooled = self.embed(input_ids).mean(dim=1)
        return Output(logits=self.head(self.norm(pooled)), hidden=pooled)


def test_batchnorm_reestimation_on_dict_batches() -> None:
    from qready.quant import recalibrate_batchnorm

    torch.manual_seed(0)
    model, batches = NormedKeywordModel(), _make_batches(3)
    recalibrate_batchnorm(model, batches, max_batches=3)
    model.eval()
    with torch.no_grad():
        pooled = torch.cat([model(**x).hidden for x, _ in batches])
    assert torch.allclose(model.norm.running_mean, pooled.mean(dim=0), atol=1e-5)
    assert model.norm.num_batches_tracked == 3


def test_evaluate_per_token_outputs_classes_last() -> None:
    torch.manual_seed(0)
    tagger = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, CLASSES))  # [B, T] -> [B, T, C]
    batches = [(torch.randint(0, VOCAB, (4, TOKENS)), torch.randint(0, CLASSES, (4, TOKENS))) for _ in range(2)]
    metrics = evaluate(tagger, batches)
    with torch.no_grad():
        correct = sum(int((tagger(x).argmax(-1) == y).sum()) for x, y in batches)
        loss = sum(float(nn.functional.cross_entropy(tagger(x).flatten(0, 1), y.flatten(), reduction="sum"))
                   for x, y in batches)
    assert metrics["n"] == 2 * 4 * TOKENS
    assert metrics["accuracy"] == pytest.approx(100 * correct / metrics["n"])
    assert metrics["loss"] == pytest.approx(loss / metrics["n"])
