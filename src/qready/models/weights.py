"""Loading pretrained weights into a model: :func:`load_weights` (used by ``create_model(weights=)``).

A weights file is a plain ``state_dict`` (parameter name -> tensor): a PyTorch file read with
``torch.load(..., weights_only=True)`` (so it cannot run code), or a ``.safetensors`` file. The zoo's
``resnet18`` and ``mobilenet_v2`` (ImageNet stems) use torchvision's parameter names, so torchvision's
checkpoint files (e.g. ``mobilenet_v2-b0353104.pth``) load unchanged. Loading is strict: any missing
or unexpected name, or a tensor of another shape, raises :class:`WeightsMismatchError` listing them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]
_SHOWN = 12  # names listed per category in a mismatch message


class WeightsMismatchError(ValueError):
    """A state dict that does not fit the model: the message lists missing, unexpected and
    wrongly-shaped names."""


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` stored at ``path`` (``.safetensors``, else ``torch.load`` with
    ``weights_only=True``), on the CPU."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"weights file {str(file)!r} does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file), device="cpu")
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in several types
            raise ValueError(f"weights file {str(file)!r} cannot be read with torch.load(weights_only=True): "
                             f"{err}") from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"weights file {str(file)!r} must hold a state_dict (a mapping of parameter names to "
                         f"tensors); got {type(state).__name__}")
    return dict(state)


def _listing(label: str, names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN]) + (f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")
    return f"{len(names)} {label}: {shown}"


def check_state_dict(model: nn.Module, state: StateDict) -> None:
    """Raise :class:`WeightsMismatchError` unless ``state`` has exactly the names and shapes of
    ``model.state_dict()``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        _listing(label, names)
        for label, names in (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes))
        if names
    ]
    if problems:
        raise WeightsMismatchError(f"the weights do not fit {type(model).__name__}: " + "; ".join(problems))


def load_weights(model: nn.Module, weights: str | os.PathLike[str] | StateDict) -> nn.Module:
    """Load ``weights`` (a file path or a state dict) into ``model`` in place and return it.

    Strict: names and shapes must match ``model.state_dict()`` exactly, else
    :class:`WeightsMismatchError` lists the missing, unexpected and wrongly-shaped names.
    """
    if isinstance(weights, (str, os.PathLike)):
        state: StateDict = read_state_dict(weights)
    elif isinstance(weights, Mapping):
        state = weights
    else:
        raise TypeError(f"weights must be a file path or a state dict; got {type(weights).__name__}")
    check_state_dict(model, state)
    model.load_state_dict(state)
    return model
