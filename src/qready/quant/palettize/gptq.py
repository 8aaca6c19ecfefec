"""Post-training palettization with GPTQ's error feedback (``palettize(..., method="gptq", calib=...)``).

Each layer's LUT is fixed first (the 1-D k-means of the float weight, per tensor or per group of output
channels, as ``"kmeans"`` computes it); GPTQ then visits the input columns and snaps each one to its
row's LUT, spreading the snapping error over the columns not yet visited, weighted by the inverse
Hessian of the layer's output error on the calibration inputs (see :mod:`qready.quant.ptq.gptq`).
The result has the same LUTs and layout as ``"kmeans"``, so it exports the same way, and a layer
keeps the plain snap when that gives the lower output error on the calibration data. Layers GPTQ cannot
compensate (embeddings) are snapped plainly. Sequential by default, like PTQ.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..layers import out_axis
from ..ptq.apply import calibration_inputs, quantize_weights
from ..ptq.capture import LayerStats, supports
from ..ptq.gptq import GPTQ, LutGrid, gptq_layer
from ..select import SelectedModule
from ..spec import QuantSpec
from .codebook import channel_groups, kmeans_lut, snap
from .kmeans import KMeansMethod
from .methods import PALETTIZERS, PaletteLayer, Palettizer


@dataclass(frozen=True)
class _LutGPTQ:
    """The per-layer step: k-means LUT, then GPTQ on it (``spec.bits`` carries the layer's index bits)."""

    options: GPTQ
    group_size: int | None
    kmeans_method: KMeansMethod
    uses_calibration: ClassVar[bool] = True

    @torch.no_grad()
    def quantize_layer(self, name: str, module: nn.Module, spec: QuantSpec, stats: LayerStats | None) -> None:
        weight, axis = module.weight, out_axis(module) or 0
        lut = kmeans_lut(weight, spec.bits, self.group_size, self.kmeans_method, axis)
        rounded = snap(weight, lut, channel_groups(tuple(weight.shape), self.group_size, weight.device, axis))
        if stats is None or not supports(module):
            weight.copy_(rounded)
            return
        channels = torch.arange(weight.shape[axis], device=weight.device)
        row_lut = channels // self.group_size if self.group_size is not None else torch.zeros_like(channels)

        def grid_for(_weight: torch.Tensor, shape: tuple[int, int, int]) -> LutGrid:
            return LutGrid(lut, row_lut.reshape(shape[0], shape[1]))

        gptq_layer(module, grid_for, rounded, stats, block_size=self.options.block_size, damp=self.options.damp,
                   act_order=self.options.act_order)


@PALETTIZERS.register("gptq")
@dataclass
class GPTQPalettizer(Palettizer):
    """Post-training: k-means LUTs, then GPTQ's error-compensating snap on ``calib`` batches. 1-8 bits.

    ``calib``: calibration batches (any batch form; required); ``calib_batches``: at most this many are
    used; ``block_size``, ``damp``, ``act_order``: GPTQ's options; ``sequential``: each layer sees the
    outputs of the already-palettized layers before it; ``kmeans_method``: the LUTs' k-means solver."""

    calib: Iterable | None = None
    calib_batches: int = 8
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    sequential: bool = True
    kmeans_method: KMeansMethod = "auto"
    post_training: ClassVar[bool] = True

    def check(self, bits: int) -> None:
        if self.calib is None:
            raise ValueError("method='gptq' needs calib=, calibration batches")
        GPTQ(self.block_size, self.damp, self.act_order)  # validates the options

    def apply(self, model: nn.Module, layers: Sequence[PaletteLayer], group_size: int | None) -> None:
        batches = calibration_inputs(self.calib, self.calib_batches)
        step = _LutGPTQ(GPTQ(self.block_size, self.damp, self.act_order), group_size, self.kmeans_method)
        chosen = [SelectedModule(layer.name, layer.module, layer.bits) for layer in layers]
        quantize_weights(model, chosen, QuantSpec(bits=chosen[0].bits_override), step, batches,
                         sequential=self.sequential)
