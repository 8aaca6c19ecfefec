"""Classification metrics over a data loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def batch_to_device(batch, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an ``(inputs, targets)`` batch and move both to ``device`` (no-op when ``None``)."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError("a batch must be an (inputs, targets) pair")
    x, y = batch[0], batch[1]
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    criterion: nn.Module | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy loss of ``model`` over ``loader``.

    The model is put in eval mode for the pass and restored to its previous mode afterwards.
    Returns ``{"accuracy": float in [0, 100], "loss": float, "n": int}``.
    """
    criterion = criterion or nn.CrossEntropyLoss(reduction="sum")
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    try:
        for batch in loader:
            x, y = batch_to_device(batch, device)
            logits = model(x)
            loss_sum += float(criterion(logits, y))
            correct += int((logits.argmax(dim=1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total, "n": total}
