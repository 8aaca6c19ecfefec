"""Bit operations (BOPs): the cost measure of a (mixed-precision) quantized network.

Per layer ``BOPs = MACs · b_w · b_a`` with, for one input sample,

* ``ConvNd``: ``MACs = prod(kernel) · C_in · (C_out / groups) · prod(output spatial)`` (for Conv2d
  ``k² · C_in · (C_out/groups) · H_out · W_out``; Conv1d ``k · ... · L_out``);
* ``Linear``: ``MACs = in · out`` (times the leading dimensions of a ``[1, ..., in]`` input, e.g.
  tokens).

MACs are measured with forward hooks in eval mode (a layer run several times counts every call) on
one dummy input ``zeros(1, *input_shape)``, or on an example batch of any form :mod:`qready.batching`
accepts (a dict of keyword arguments for Hugging Face models), divided by its number of samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..batching import ACCEPTED_FORMS, Inputs, batch_inputs, forward, inputs_size, model_device, move_inputs
from ..checks import check_int
from ..quant.qat.quantizers import ActivationQAT

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BitsLike = int | Mapping[str, int]


@dataclass(frozen=True)
class LayerBops:
    """One layer: MACs per sample, weight and activation bits, and ``bops = macs · w_bits · a_bits``."""

    name: str
    macs: int
    w_bits: int
    a_bits: int

    @property
    def bops(self) -> int:
        return self.macs * self.w_bits * self.a_bits


@dataclass(frozen=True)
class BopsReport:
    """Per-layer BOPs (in the model's layer order) and their total."""

    layers: tuple[LayerBops, ...]

    @property
    def total(self) -> int:
        return sum(layer.bops for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def __getitem__(self, name: str) -> LayerBops:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in this report; layers: {[la.name for la in self.layers]}")

    def rows(self) -> list[dict]:
        """One dict per layer (name, macs, w_bits, a_bits, bops) -- for tables and JSON."""
        return [{"name": la.name, "macs": la.macs, "w_bits": la.w_bits, "a_bits": la.a_bits, "bops": la.bops}
                for la in self.layers]


def _macs_hook(macs: dict[str, int], name: str):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            count = module.in_features * out.numel()
        else:
            count = math.prod(module.kernel_size) * (module.in_channels // module.groups) * out.numel()
        macs[name] = macs.get(name, 0) + int(count)

    return hook


ShapeOrBatch = Sequence[int] | Inputs | tuple[Inputs, torch.Tensor]


def _example(model: nn.Module, input_shape: ShapeOrBatch) -> tuple[Inputs, int]:
    """The inputs to measure on and their number of samples."""
    if isinstance(input_shape, Sequence) and all(isinstance(s, int) and not isinstance(s, bool) for s in input_shape):
        shape = tuple(input_shape)
        if not shape or not all(s > 0 for s in shape):
            raise ValueError("input_shape must be a non-empty sequence of positive ints (no batch dim) or an "
                             f"example batch; got {input_shape!r}")
        ref = next(iter(model.parameters()), None)
        x = torch.zeros((1, *shape), device=ref.device if ref is not None else None,
                        dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.float32)
        return x, 1
    try:
        inputs = batch_inputs(input_shape)
    except (TypeError, ValueError) as err:
        raise ValueError("input_shape must be one sample's shape (a sequence of positive ints, no batch dim) or "
                         f"an example batch ({ACCEPTED_FORMS}); got {type(input_shape).__name__}") from err
    return move_inputs(inputs, model_device(model)), inputs_size(inputs)


@torch.no_grad()
def layer_macs(model: nn.Module, input_shape: ShapeOrBatch) -> dict[str, int]:
    """MACs per sample of every Conv1d/2d/3d and Linear layer that runs (name -> MACs, layer order).

    ``input_shape``: one sample's shape, without the batch dimension (e.g. ``(1, 8, 8)``), or an
    example batch of any :mod:`qready.batching` form (e.g. a Hugging Face tokenizer's dict); MACs of
    a batch are divided by its number of samples (rounded down).
    """
    late = [n for n, m in model.named_modules() if isinstance(m, ActivationQAT) and not m.initialized]
    if late:
        raise ValueError(f"activation quantizers {late} are not initialised; a dummy forward would initialise them "
                         "from zeros: compute BOPs on the float model or after calibration")
    inputs, samples = _example(model, input_shape)
    macs: dict[str, int] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    handles = [m.register_forward_hook(_macs_hook(macs, n)) for n, m in layers]
    was_training = model.training
    model.eval()
    try:
        forward(model, inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: macs[n] // samples for n, _ in layers if n in macs}


def _bits_for(bits: BitsLike, names: Sequence[str], arg: str) -> dict[str, int]:
    def check(value: object, where: str) -> int:
        return check_int(f"{arg}{where}", value, minimum=1, maximum=32)

    if isinstance(bits, Mapping):
        return {n: check(bits[n], f"[{n!r}]") for n in names}
    value = check(bits, "")
    return dict.fromkeys(names, value)


def bops_from_macs(macs: Mapping[str, int], w_bits: BitsLike, a_bits: BitsLike) -> BopsReport:
    """A :class:`BopsReport` from per-layer MACs (see :func:`layer_macs`).

    The layers are those of ``w_bits`` when it is a dict (each must be in ``macs``), else all of
    ``macs``; a dict ``a_bits`` must cover the same layers.
    """
    names = list(w_bits) if isinstance(w_bits, Mapping) else list(macs)
    missing = [n for n in names if n not in macs]
    if missing:
        raise ValueError(f"w_bits names layers without measured MACs: {missing}; measured: {list(macs)}")
    if isinstance(a_bits, Mapping):
        lacking = [n for n in names if n not in a_bits]
        if lacking:
            raise ValueError(f"a_bits has no entry for layers {lacking}")
    wb, ab = _bits_for(w_bits, names, "w_bits"), _bits_for(a_bits, names, "a_bits")
    return BopsReport(tuple(LayerBops(n, macs[n], wb[n], ab[n]) for n in names))


def bops(model: nn.Module, input_shape: ShapeOrBatch, w_bits: BitsLike = 32, a_bits: BitsLike = 32) -> BopsReport:
    """BOPs of ``model`` for one sample of ``input_shape`` (no batch dim).

    ``w_bits`` / ``a_bits``: one bit width for every Conv/Linear layer, or a dict ``name -> bits``
    (the report then covers exactly the dict's layers; use 32 for a float layer).
    """
    return bops_from_macs(layer_macs(model, input_shape), w_bits, a_bits)
