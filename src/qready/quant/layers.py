"""Weight-bearing layer types and the axis of their weight that holds the output channels.

One table, read by the default :class:`~qready.quant.Selector` and by every method that works per
output channel (PTQ, QAT quantizers, palettization groups, per-channel regularizers, packed and ONNX
export):

==========================================  ===========  ==============================================
layer type                                  output axis  weight shape
==========================================  ===========  ==============================================
``nn.Linear``                               0            ``[out_features, in_features]``
``nn.Conv1d/2d/3d``                         0            ``[out_channels, in_channels/groups, *k]``
``nn.ConvTranspose1d/2d/3d``                1            ``[in_channels, out_channels/groups, *k]``
``nn.Embedding``                            0            ``[num_embeddings, embedding_dim]``
``transformers.pytorch_utils.Conv1D``       1            ``[nx, nf]`` (Hugging Face GPT-2; ``x @ W + b``)
==========================================  ===========  ==============================================

For an embedding a "channel" is one token's row: per-channel quantization gives every token its own
scale. The Hugging Face ``Conv1D`` entry is registered by name, so ``transformers`` is never imported
here: the class is recognised once the user's code has imported it. Add a type of your own with
:func:`register_layer` (a class, or its ``"module.QualName"`` to stay lazy).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .spec import QuantSpec

_BY_CLASS: dict[type[nn.Module], int] = {
    nn.Linear: 0,
    nn.Conv1d: 0,
    nn.Conv2d: 0,
    nn.Conv3d: 0,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 1,
    nn.ConvTranspose3d: 1,
    nn.Embedding: 0,
}
_BY_NAME: dict[str, int] = {"transformers.pytorch_utils.Conv1D": 1}
_INDEX_INPUTS: set[type[nn.Module] | str] = {nn.Embedding}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer(cls: type[nn.Module] | str, out_axis: int, *, index_inputs: bool = False) -> None:
    """Declare a weight-bearing layer type (re-registering replaces the entry).

    Args:
        cls: an ``nn.Module`` subclass with a ``weight`` attribute, or its fully qualified name
            ``"package.module.ClassName"`` (matched lazily, without importing the package).
        out_axis: the axis of ``weight`` that indexes output channels (may be negative).
        index_inputs: the layer's inputs are integer indices (like ``nn.Embedding``), so activation
            quantizers are never attached to them.
    """
    if isinstance(out_axis, bool) or not isinstance(out_axis, int):
        raise TypeError(f"register_layer: out_axis must be an int, got {out_axis!r}")
    if isinstance(cls, str):
        if "." not in cls:
            raise ValueError(f"register_layer: a class name must be fully qualified ('package.module.Class'), got {cls!r}")
        _BY_NAME[cls] = out_axis
    elif isinstance(cls, type) and issubclass(cls, nn.Module):
        _BY_CLASS[cls] = out_axis
    else:
        raise TypeError(f"register_layer: cls must be an nn.Module subclass or its qualified name, got {cls!r}")
    if index_inputs:
        _INDEX_INPUTS.add(cls)
    else:
        _INDEX_INPUTS.discard(cls)


def _entry(cls: type) -> type | str | None:
    """The table key matching ``cls`` (the nearest registered class in its MRO), or ``None``."""
    for klass in cls.__mro__:
        if klass in _BY_CLASS:
            return klass
        name = _qualified(klass)
        if name in _BY_NAME:
            return name
    return None


def out_axis(module: nn.Module) -> int | None:
    """Output-channel axis of ``module.weight`` (``None`` for an unregistered type), normalised to
    ``0 <= axis < weight.dim()`` when the module already has a weight tensor."""
    key = _entry(type(module))
    if key is None:
        return None
    axis = _BY_CLASS[key] if isinstance(key, type) else _BY_NAME[key]
    weight = getattr(module, "weight", None)
    return axis % weight.dim() if isinstance(weight, torch.Tensor) and weight.dim() > 0 else axis


def is_weight_layer(module: nn.Module) -> bool:
    """True for a module of a registered type."""
    return _entry(type(module)) is not None


def takes_index_inputs(module: nn.Module) -> bool:
    """True when the module's inputs are integer indices (e.g. an embedding)."""
    return _entry(type(module)) in _INDEX_INPUTS


def registered_types() -> list[str]:
    """Names of the registered types (for messages)."""
    return [c.__name__ for c in _BY_CLASS] + [n.rsplit(".", 1)[1] for n in _BY_NAME]


def layer_spec(module: nn.Module, spec: QuantSpec) -> QuantSpec:
    """``spec`` with its channel axis set to ``module``'s output-channel axis (per-channel/per-group
    specs; a per-tensor spec is returned as is). Unregistered modules keep ``spec.axis``."""
    if spec.granularity == "tensor":
        return spec
    axis = out_axis(module)
    return spec if axis is None or axis == spec.axis else replace(spec, axis=axis)
