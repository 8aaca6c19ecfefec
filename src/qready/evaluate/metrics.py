"""Classification metrics over a data loader (batches in any form of :mod:`qready.batching`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..batching import Inputs, batch_inputs, batch_targets, forward, move_inputs, output_tensor


def batch_to_device(batch: object, device: torch.device | str | None,
                    consumer: str = "evaluate") -> tuple[Inputs, torch.Tensor]:
    """Inputs (a tensor or a dict of model keyword arguments) and targets of a labelled batch, moved
    to ``device`` (no-op when ``None``); an unlabeled batch is refused with an error naming ``consumer``."""
    targets = batch_targets(batch, consumer)
    return move_inputs(batch_inputs(batch), device), targets if device is None else targets.to(device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    criterion: nn.Module | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy loss of ``model`` over ``loader``.

    ``loader`` yields labelled batches, ``(inputs, targets)`` or ``(dict, targets)``; logits are the
    model's output tensor (``.logits`` of a Hugging Face output), classes along dim 1 — or along the
    last dim for per-token outputs ``[B, T, C]`` with targets ``[B, T]`` (every token counts once).

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
            logits = output_tensor(forward(model, x))
            if logits.dim() > 2 and tuple(y.shape) == tuple(logits.shape[:-1]):  # [B, T, C] per-token outputs
                logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
            loss_sum += float(criterion(logits, y))
            correct += int((logits.argmax(dim=1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total, "n": total}
