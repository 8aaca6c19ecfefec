"""What a batch is, in one place: every consumer (training, calibration, BN re-estimation, sweep,
inspect, SAQ, mixed precision, GPTQ) reads batches through these helpers.

Accepted forms:

* a tensor ``x`` — inputs only (unlabeled);
* an ``(inputs, targets)`` pair (tuple or list), inputs a tensor;
* a dict of model keyword arguments, e.g. Hugging Face ``{"input_ids": ..., "attention_mask": ...}``;
* a ``(dict, targets)`` pair.

A dict is passed to the model as keyword arguments (``model(**inputs)``), a tensor positionally.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

Inputs = torch.Tensor | Mapping[str, Any]

ACCEPTED_FORMS = "a tensor, an (inputs, targets) pair, a dict of model keyword arguments, or a (dict, targets) pair"


def _is_inputs(obj: object) -> bool:
    return isinstance(obj, torch.Tensor) or isinstance(obj, Mapping)


def split_batch(batch: object) -> tuple[Inputs, torch.Tensor | None]:
    """``(inputs, targets)`` of ``batch``; ``targets`` is ``None`` for an unlabeled batch.

    Raises:
        TypeError: ``batch`` is none of the accepted forms (the message lists them).

    >>> import torch
    >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    >>> split_batch(x)[1] is None, split_batch((x, y))[1].tolist()
    (True, [0, 1])
    >>> inputs, targets = split_batch(({"input_ids": torch.ones(2, 5, dtype=torch.long)}, y))
    >>> sorted(inputs), targets.shape
    (['input_ids'], torch.Size([2]))
    """
    if _is_inputs(batch):
        return batch, None  # type: ignore[return-value]
    if isinstance(batch, (tuple, list)) and batch and _is_inputs(batch[0]):
        if len(batch) == 1:
            return batch[0], None
        target = batch[1]
        if target is not None and not isinstance(target, torch.Tensor):
            raise TypeError(f"batch targets must be a tensor, got {type(target).__name__}")
        return batch[0], target
    raise TypeError(f"a batch must be {ACCEPTED_FORMS}; got {type(batch).__name__}")


def batch_inputs(batch: object) -> Inputs:
    """The inputs of a batch (a tensor or a dict of keyword arguments)."""
    return split_batch(batch)[0]


def batch_targets(batch: object, consumer: str = "this") -> torch.Tensor:
    """The targets of a labelled batch; a clear error naming ``consumer`` for an unlabeled one."""
    targets = split_batch(batch)[1]
    if targets is None:
        raise TypeError(f"{consumer} needs labelled batches: (inputs, targets) or (dict, targets)")
    return targets


def move_inputs(inputs: Inputs, device: torch.device | str | None) -> Inputs:
    """``inputs`` on ``device`` (tensor values of a dict moved, other values kept); no-op for ``None``."""
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def inputs_size(inputs: Inputs) -> int:
    """Number of samples (the leading dimension of the tensor, or of the dict's first tensor)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise TypeError("a dict batch needs at least one tensor value")


def check_inputs_finite(inputs: Inputs, consumer: str = "this") -> None:
    """Refuse inputs holding NaN/inf (floating tensors only) with a clear error."""
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{consumer}: an input batch holds NaN or inf values")


def forward(model: nn.Module, inputs: Inputs) -> Any:
    """``model(inputs)`` for a tensor, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(**inputs)


def output_tensor(output: Any) -> torch.Tensor:
    """The main output tensor: the tensor itself, ``output.logits`` (Hugging Face), or the first
    tensor of a tuple/dict output."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"cannot find an output tensor in a {type(output).__name__}")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
