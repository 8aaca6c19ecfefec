"""Training objectives: what the loop minimises before loss terms are added.

An objective is called once per loss evaluation as ``objective(model, inputs, targets) -> (loss,
outputs)``: it runs the forward itself (``model`` is the DDP wrapper under ``torchrun``), so objectives
that need more than the targets — distillation needs the inputs for its teacher — fit the same loop.
``targets`` is ``None`` for an unlabeled batch.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn

from ..batching import Inputs, forward, output_tensor
from .config import OBJECTIVES, TrainConfig
from .distill import Distill

__all__ = ["OBJECTIVES", "CrossEntropy", "Objective", "build_objective"]


@runtime_checkable
class Objective(Protocol):
    """``objective(model, inputs, targets) -> (scalar loss, model output)``; the output feeds the
    train-accuracy metric when targets are present."""

    def __call__(self, model: nn.Module, inputs: Inputs, targets: Tensor | None) -> tuple[Tensor, Tensor]: ...


class CrossEntropy:
    """Cross-entropy of the model's main output (logits, classes along dim 1) against the targets."""

    name = "cross_entropy"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, inputs: Inputs, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        if targets is None:
            raise TypeError("the cross-entropy objective needs labelled batches, (inputs, targets) or "
                            "(dict, targets); for unlabeled data train with objective='distill'")
        out = output_tensor(forward(model, inputs))
        return F.cross_entropy(out, targets, label_smoothing=self.label_smoothing), out

    def __repr__(self) -> str:
        return f"CrossEntropy(label_smoothing={self.label_smoothing:g})"


def build_objective(cfg: TrainConfig, model: nn.Module) -> Objective:
    """The objective named by ``cfg.objective``: cross-entropy (with ``cfg.label_smoothing``) or
    :class:`~qready.train.distill.Distill` from a frozen copy of ``model`` (``cfg.distill_loss``,
    ``cfg.temperature``)."""
    if cfg.objective == "distill":
        return Distill(model, loss=cfg.distill_loss, temperature=cfg.temperature)
    return CrossEntropy(cfg.label_smoothing)
