"""Label-free fine-tuning: distillation from a frozen float copy of the model.

The teacher is a deep copy of the float model taken when :class:`Distill` is built (eval mode,
``requires_grad=False``, never trained, its BatchNorm statistics never updated); the student is the
model being trained — regularized (R², gradient-ℓ1, cluster), quantization-aware (QAT), palettized
(DKM) or sharpness-aware (SAQ). Both see the same batch; the loss compares their outputs ``z_s``
(student) and ``z_t`` (teacher), last axis = classes / features, averaged over every other position
(samples; tokens of a sequence output):

* ``"kl"`` (logits): ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``. The ``T²`` keeps the gradient's
  scale independent of the temperature: ``∂/∂z_s = T·(softmax(z_s/T) − softmax(z_t/T)) / n``.
* ``"mse"``: ``mean((z_s − z_t)²)`` over all elements (hidden states, embeddings).
* ``"cosine"``: ``mean(1 − cos(z_s, z_t))`` along the last axis.

The compared outputs are the model's main output (a tensor, Hugging Face ``.logits``, the first tensor
of a tuple) or ``output_fn(model, inputs)`` for models without logits (a hidden state, a pooled
embedding). Batches may take any form of :mod:`qready.batching`; targets, when present, are ignored.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..batching import Inputs, model_device
from ..checks import check_float
from ..evaluate.fidelity import OutputFn, model_output, softmax_kl

DISTILL_LOSSES: tuple[str, ...] = ("kl", "mse", "cosine")


def distill_loss(student: Tensor, teacher: Tensor, *, loss: str = "kl", temperature: float = 1.0) -> Tensor:
    """The distillation loss (a scalar) between ``student`` and ``teacher`` outputs of the same shape
    ``[..., C]``; see the module docstring for the three forms. Only ``student`` should need grad."""
    if student.shape != teacher.shape:
        raise ValueError(f"distillation: the student's output shape {tuple(student.shape)} differs from the "
                         f"teacher's {tuple(teacher.shape)}")
    if loss == "kl":
        return temperature**2 * softmax_kl(teacher, student, temperature).mean()
    if loss == "mse":
        return F.mse_loss(student, teacher)
    if loss == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    raise ValueError(f"distillation loss must be one of {list(DISTILL_LOSSES)}; got {loss!r}")


def _holds_quantizer(module: nn.Module) -> bool:
    """Whether ``module`` carries a qready quantizer: an activation quantizer, or a weight
    parametrization defined by qready (QAT quantizer, DKM palettizer); other parametrizations, such as
    ``weight_norm``, are part of the float model."""
    from ..quant.activations import ATTR

    if hasattr(module, ATTR):
        return True
    return parametrize.is_parametrized(module) and any(
        type(p).__module__.startswith("qready.") for plist in module.parametrizations.values() for p in plist)


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen float copy of ``model``: deep copy, eval mode, no gradients.

    Raises:
        ValueError: ``model`` already holds qready quantizers: the teacher must be the float model, so
            build it before ``prepare_qat`` / ``palettize``.
    """
    quantized = [name or type(model).__name__ for name, m in model.named_modules() if _holds_quantizer(m)]
    if quantized:
        raise ValueError(f"the distillation teacher must be the float model, but {quantized[0]} already holds a "
                         "quantizer; build Distill from the model before prepare_qat/palettize")
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _version_key(inputs: Inputs) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version counter of every tensor of ``inputs``."""
    tensors = [inputs] if isinstance(inputs, Tensor) else [v for v in inputs.values() if isinstance(v, Tensor)]
    return tuple((id(t), t._version) for t in tensors)


class Distill:
    """Training objective matching a frozen float copy of ``model`` (the teacher), without labels.

    Use it as ``fit(model, loader, cfg, objective=Distill(model))`` (or ``objective: distill`` in a
    recipe's ``train`` section); loss terms (regularizers) are added to it as to cross-entropy.

    Args:
        model: the float model; it is copied now, so build the objective before attaching quantizers.
        loss: ``"kl"`` (logits, at ``temperature``), ``"mse"`` or ``"cosine"``.
        temperature: softmax temperature ``T > 0`` of the ``"kl"`` loss.
        output_fn: ``output_fn(model, inputs) -> tensor`` choosing the compared output (called on the
            student — the DDP wrapper under ``torchrun``, so call the model rather than reach into its
            submodules — and on the teacher); default the model's main output.
    """

    name = "distill"

    def __init__(self, model: nn.Module, *, loss: str = "kl", temperature: float = 1.0,
                 output_fn: OutputFn | None = None) -> None:
        if loss not in DISTILL_LOSSES:
            raise ValueError(f"Distill: loss must be one of {list(DISTILL_LOSSES)}; got {loss!r}")
        check_float("Distill: temperature", temperature, minimum=0.0, maximum=math.inf, exclusive=True)
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"Distill: output_fn must be callable (model, inputs) -> tensor; got {output_fn!r}")
        self.loss = loss
        self.temperature = float(temperature)
        self.output_fn = output_fn
        self.teacher = frozen_teacher(model)
        self._last: tuple[Inputs, tuple, Tensor] | None = None

    def teacher_output(self, inputs: Inputs, device: torch.device) -> Tensor:
        """The teacher's output on ``inputs`` (no graph); the teacher moves to ``device`` first if needed.

        Two-pass steps (SAM, SAQ) evaluate the loss twice on one batch: the output of the last call is
        reused while ``inputs`` is the same object with unchanged tensors (their in-place version
        counters included)."""
        key = _version_key(inputs)
        if self._last is not None and self._last[0] is inputs and self._last[1] == key:
            return self._last[2]
        if model_device(self.teacher) != device:
            self.teacher.to(device)
        with torch.no_grad():
            out = model_output(self.teacher, inputs, self.output_fn)
        self._last = (inputs, key, out)
        return out

    def __call__(self, model: nn.Module, inputs: Inputs, targets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(loss, student output)`` for one batch; ``targets`` are ignored."""
        out = model_output(model, inputs, self.output_fn)
        ref = self.teacher_output(inputs, out.device)
        return distill_loss(out, ref, loss=self.loss, temperature=self.temperature), out

    def __repr__(self) -> str:
        return f"Distill(loss={self.loss!r}, temperature={self.temperature:g})"

