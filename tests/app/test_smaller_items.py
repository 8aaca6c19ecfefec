"""Smaller items: per-channel act_spec accepted by ptq, int bits for ptq, training refuses NaN weights
up front (no line per step), save_packed refuses NaN (see tests/export)."""

from __future__ import annotations

import logging

import pytest
import torch

from qready.models import create_model
from qready.quant import QuantSpec, ptq
from qready.quant.activations import input_quantizers
from qready.train import NonFiniteError, TrainConfig, fit


def test_ptq_takes_an_int_and_a_default_granularity_act_spec() -> None:
    torch.manual_seed(0)
    model = create_model("mlp", hidden=(16,), num_classes=4, in_features=8)
    calib = [torch.randn(8, 8) for _ in range(2)]
    q = ptq(model, 4, calib=calib, act_spec=QuantSpec(bits=8, symmetric=False))  # granularity "channel"
    quantizers = input_quantizers(q)
    assert quantizers and all(a.spec.granularity == "tensor" and a.spec.bits == 8 for a in quantizers)
    assert torch.equal(q.net[1].weight, ptq(model, QuantSpec(bits=4)).net[1].weight)


def test_fit_refuses_nan_weights_before_the_first_step(caplog) -> None:
    model = create_model("mlp", hidden=(16,), num_classes=4, in_features=8)
    with torch.no_grad():
        model.net[1].weight[0, 0] = float("nan")
    data = [(torch.randn(4, 8), torch.randint(0, 4, (4,))) for _ in range(5)]
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteError, match=r"cannot train.*net\.1\.weight"):
        fit(model, data, TrainConfig(epochs=1, lr=0.1))
    assert not [r for r in caplog.records if "skipping this update" in r.getMessage()]
