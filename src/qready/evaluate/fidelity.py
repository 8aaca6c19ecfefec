"""Fidelity of a (quantized) model to its float reference, without labels.

Both models see the same batches; their main outputs ``z_t`` (reference) and ``z_s`` (model) have the
class (or feature) axis last, and every other position (a sample; a token of a sequence output) counts
once. With ``p = softmax(z)`` over the last axis:

* ``agreement``: share of positions where ``argmax z_s == argmax z_t`` (percent);
* ``agreement_confident``: the same over the positions where the reference is confident,
  ``max p_t ≥ confidence`` (0.5 by default), percent, ``None`` when no position is confident;
  ``confident_n`` counts them. Near-ties of the reference flip under any perturbation, so agreement on
  confident inputs is the cleaner signal;
* ``kl``: mean over positions of ``KL(p_t ‖ p_s) = Σ_c p_t,c (log p_t,c − log p_s,c)``, in nats;
* ``sqnr_db``: output signal-to-quantization-noise ratio ``10·log10(Σ‖z_t‖² / Σ‖z_t − z_s‖²)`` in dB,
  sums over the whole data; ``math.inf`` when the outputs are identical (JSON writers that refuse
  infinities store ``null``);
* ``cosine``: mean over positions of the cosine similarity of ``z_t`` and ``z_s`` along the last axis.

When every batch carries targets, the model's own ``accuracy`` (percent) and mean cross-entropy
``loss`` come from the same pass; both are ``None`` for unlabeled data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import Inputs, forward, model_device, move_inputs, output_tensor, split_batch
from ..checks import check_float

DEFAULT_CONFIDENCE = 0.5
FIDELITY_KEYS: tuple[str, ...] = ("agreement", "agreement_confident", "confident_n", "kl", "sqnr_db", "cosine")

OutputFn = Callable[[nn.Module, Inputs], torch.Tensor]


def softmax_kl(reference: torch.Tensor, other: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(reference/T) ‖ softmax(other/T))`` along the last axis, one value per position
    (shape ``reference.shape[:-1]``), in nats; differentiable in both arguments."""
    if reference.shape != other.shape:
        raise ValueError(f"softmax_kl: shapes differ, {tuple(reference.shape)} vs {tuple(other.shape)}")
    if reference.dim() < 1 or reference.shape[-1] < 2:
        raise ValueError(f"softmax_kl needs logits with a class axis (last) of size >= 2; got shape "
                         f"{tuple(reference.shape)}")
    log_t = F.log_softmax(reference / temperature, dim=-1)
    log_s = F.log_softmax(other / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=-1)


def _check_confidence(confidence: float) -> float:
    return check_float("confidence (a probability)", confidence, minimum=0.0, maximum=1.0)


class FidelityMeter:
    """Running sums for the fidelity metrics (see the module docstring), fed batch by batch."""

    def __init__(self, confidence: float = DEFAULT_CONFIDENCE) -> None:
        self.confidence = _check_confidence(confidence)
        self.n = 0
        self.agree = 0
        self.confident = 0
        self.agree_confident = 0
        self.kl_sum = 0.0
        self.cos_sum = 0.0
        self.signal = 0.0
        self.noise = 0.0
        self.labelled = 0
        self.correct = 0
        self.ce_sum = 0.0

    @torch.no_grad()
    def update(self, reference: torch.Tensor, output: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Add one batch: ``reference`` and ``output`` of the same shape ``[..., C]``; ``targets``
        (class indices ``[N]`` or class probabilities ``[N, C]``) for accuracy and loss of ``output`` (shape ``[N, C]``)."""
        if reference.shape != output.shape:
            raise ValueError(f"the model's output shape {tuple(output.shape)} differs from the reference's "
                             f"{tuple(reference.shape)}")
        z_t = reference.detach().double()
        z_s = output.detach().double().to(z_t.device)
        top_t = z_t.argmax(dim=-1)
        same = top_t == z_s.argmax(dim=-1)
        confident = F.softmax(z_t, dim=-1).amax(dim=-1) >= self.confidence
        self.n += same.numel()
        self.agree += int(same.sum())
        self.confident += int(confident.sum())
        self.agree_confident += int((same & confident).sum())
        self.kl_sum += float(softmax_kl(z_t, z_s).sum())
        self.cos_sum += float(F.cosine_similarity(z_t, z_s, dim=-1, eps=1e-12).sum())
        self.signal += float(z_t.pow(2).sum())
        self.noise += float((z_t - z_s).pow(2).sum())
        if targets is not None:
            y = targets.to(z_s.device)
            self.labelled += int(y.numel())
            hard = y.argmax(dim=1) if y.dim() == 2 else y  # one-hot / soft targets: their top class
            self.correct += int((z_s.argmax(dim=1) == hard).sum())
            self.ce_sum += float(F.cross_entropy(z_s, y, reduction="sum"))

    def result(self) -> dict[str, Any]:
        """The metrics so far: :data:`FIDELITY_KEYS`, ``n`` (positions), ``accuracy`` and ``loss``
        (``None`` unless every batch had targets)."""
        if self.n == 0:
            raise ValueError("fidelity: no outputs were compared (empty data?)")
        if self.labelled and self.labelled != self.n:
            raise ValueError("fidelity: some batches have targets and some do not; accuracy is undefined")
        if self.noise > 0:
            sqnr = 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf
        else:
            sqnr = math.inf
        return {
            "agreement": 100.0 * self.agree / self.n,
            "agreement_confident": 100.0 * self.agree_confident / self.confident if self.confident else None,
            "confident_n": self.confident,
            "kl": self.kl_sum / self.n,
            "sqnr_db": sqnr,
            "cosine": self.cos_sum / self.n,
            "n": self.n,
            "accuracy": 100.0 * self.correct / self.labelled if self.labelled else None,
            "loss": self.ce_sum / self.labelled if self.labelled else None,
        }


def model_output(model: nn.Module, inputs: Inputs, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The compared output of ``model`` on ``inputs``: ``output_fn(model, inputs)`` or the main output
    tensor (a tensor, Hugging Face ``.logits``, or the first tensor of a tuple/dict)."""
    if output_fn is not None:
        out = output_fn(model, inputs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"output_fn must return a tensor; got {type(out).__name__}")
        return out
    return output_tensor(forward(model, inputs))


@torch.no_grad()
def fidelity(
    reference: nn.Module,
    model: nn.Module,
    data: Iterable,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    output_fn: OutputFn | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Compare ``model`` with ``reference`` (usually the float model) in one pass over ``data``.

    Args:
        reference: the model whose outputs are the target (e.g. the float model); not modified.
        model: the model under test (e.g. after PTQ); not modified. When it *is* ``reference`` the
            outputs are computed once (agreement 100, KL 0, SQNR ``inf``, cosine 1).
        data: batches of any form (tensor, ``(inputs, targets)``, dict of model keyword arguments,
            ``(dict, targets)``).
        confidence: reference top-1 probability from which an input counts as confident.
        output_fn: ``output_fn(model, inputs) -> tensor`` choosing the compared output; default the
            main output (logits).
        device: where the inputs go (default: each model's own device, so the two models may sit on
            different devices); the models are not moved.
    Returns:
        ``{agreement, agreement_confident, confident_n, kl, sqnr_db, cosine, n, accuracy, loss}``
        (see the module docstring for definitions and units).
    """
    meter = FidelityMeter(confidence)
    ref_device = device if device is not None else model_device(reference)
    dev = device if device is not None else model_device(model)
    modes = (reference.training, model.training)
    reference.eval()
    model.eval()
    try:
        for batch in data:
            inputs, targets = split_batch(batch)
            z_t = model_output(reference, move_inputs(inputs, ref_device), output_fn)
            z_s = z_t if model is reference else model_output(model, move_inputs(inputs, dev), output_fn)
            meter.update(z_t, z_s, targets)
    finally:
        reference.train(modes[0])
        model.train(modes[1])
    return meter.result()
