"""Calibration passes shared by every back-end: forward a few batches, re-estimate BatchNorm statistics."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from ..batching import batch_inputs, check_inputs_finite, forward, model_device, move_inputs


@torch.no_grad()
def run_batches(model: nn.Module, batches: Iterable, max_batches: int) -> int:
    """Forward up to ``max_batches`` batches (any form :mod:`qready.batching` accepts) through ``model``;
    returns how many ran."""
    device = model_device(model)
    count = 0
    for batch in itertools.islice(batches, max_batches):  # never draws a batch it does not use
        inputs = batch_inputs(batch)
        check_inputs_finite(inputs, "calibration")
        forward(model, move_inputs(inputs, device))
        count += 1
    return count


def recalibrate_batchnorm(model: nn.Module, batches: Iterable, max_batches: int) -> None:
    """Re-estimate BatchNorm running statistics (cumulative average) on ``batches``."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        run_batches(model, batches, max_batches)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
