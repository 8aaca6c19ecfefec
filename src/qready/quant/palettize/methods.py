"""The palettization methods by name: one registry, one class per method.

A method is a small dataclass (its fields are its options, so a misspelt option is an error naming the
method) registered with ``@PALETTIZERS.register("name")``; :func:`qready.quant.palettize.palettize`
resolves ``method=`` through the registry, validates the bit width against ``supported_bits`` and hands
the method the chosen layers. Adding a method is one class in one file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...registry import Registry
from ..layers import out_axis
from ..select import Selector, as_selector
from ..spec import WEIGHT_BITS
from .codebook import channel_groups, kmeans_lut, snap
from .dkm import CHUNK, DKM_BITS, DKMImpl, DKMWeight
from .kmeans import KMeansMethod


@dataclass(frozen=True)
class PaletteLayer:
    """One layer to palettize: its qualified name, the module and its index bits."""

    name: str
    module: nn.Module
    bits: int


class Palettizer:
    """Base class of a palettization method.

    Subclasses set ``supported_bits`` (``grouped = False`` when one LUT per layer is all they can do;
    ``post_training = True`` when the result needs no training afterwards) and implement :meth:`apply`; :meth:`layers` may be overridden when the method decides the
    layers itself."""

    supported_bits: ClassVar[tuple[int, ...]] = WEIGHT_BITS
    grouped: ClassVar[bool] = True
    post_training: ClassVar[bool] = False

    def layers(self, model: nn.Module, select: Selector | dict | None) -> list[tuple[str, nn.Module, int | None]]:
        """``(name, module, bits override)`` of the layers to palettize (default: the selector's choice)."""
        chosen = as_selector(select).select(model)
        if not chosen:
            raise ValueError(f"no module of {type(model).__name__} matches the selector; nothing to palettize")
        return [(item.name, item.module, item.bits_override) for item in chosen]

    def check(self, bits: int) -> None:
        """Method-specific checks of the whole call (after the bit width and granularity checks)."""

    def apply(self, model: nn.Module, layers: Sequence[PaletteLayer], group_size: int | None) -> None:
        """Palettize ``layers`` of ``model`` in place; ``group_size`` output channels share a LUT
        (``None``: one LUT per layer)."""
        raise NotImplementedError


PALETTIZERS: Registry[Palettizer] = Registry("palettization method")


def _snap_all(layers: Sequence[PaletteLayer], group_size: int | None, lut_of) -> None:
    """Snap each layer's weight onto ``lut_of(layer, weight, axis)`` ([G, K] LUT rows per channel group)."""
    for layer in layers:
        weight, axis = layer.module.weight, out_axis(layer.module) or 0
        lut = lut_of(layer, weight, axis)
        with torch.no_grad():
            weight.copy_(snap(weight, lut, channel_groups(tuple(weight.shape), group_size, weight.device, axis)))


@PALETTIZERS.register("kmeans")
@dataclass
class KMeansPalettizer(Palettizer):
    """Post-training: the 1-D k-means of each layer (or LUT group), then a snap to it. 1-8 bits.

    ``kmeans_method``: the k-means solver (see :mod:`qready.quant.palettize.kmeans`)."""

    kmeans_method: KMeansMethod = "auto"
    post_training: ClassVar[bool] = True

    def apply(self, model: nn.Module, layers: Sequence[PaletteLayer], group_size: int | None) -> None:
        _snap_all(layers, group_size,
                  lambda layer, weight, axis: kmeans_lut(weight, layer.bits, group_size, self.kmeans_method, axis))


@PALETTIZERS.register("dkm")
@dataclass
class DKMPalettizer(Palettizer):
    """Training-time: a :class:`~qready.quant.palettize.dkm.DKMWeight` parametrization on each weight;
    train, then :func:`~qready.quant.palettize.finalize_palettized`. 1-4 bits.

    ``tau``: temperature relative to each group's weight variance; ``iters``: centroid iterations per
    step; ``impl``: ``"unique"`` (memory-efficient) or ``"naive"`` (reference); ``chunk``: distinct values
    per attention chunk; ``kmeans_method``: solver of the initial centroids."""

    tau: float = 0.05
    iters: int = 3
    impl: DKMImpl = "unique"
    chunk: int = CHUNK
    kmeans_method: KMeansMethod = "auto"
    supported_bits: ClassVar[tuple[int, ...]] = DKM_BITS

    def apply(self, model: nn.Module, layers: Sequence[PaletteLayer], group_size: int | None) -> None:
        shared: dict[int, DKMWeight] = {}  # a tied weight (embedding and LM head) gets one set of centroids
        for layer in layers:
            weight = layer.module.weight
            if id(weight) not in shared:
                shared[id(weight)] = DKMWeight(
                    weight, layer.bits, group_size=group_size, tau=self.tau, iters=self.iters, impl=self.impl,
                    chunk=self.chunk, kmeans_method=self.kmeans_method, axis=out_axis(layer.module) or 0)
            parametrize.register_parametrization(layer.module, "weight", shared[id(weight)])


class Representatives(Protocol):
    """What ``method="cluster"`` needs from a trained regularizer."""

    bits: int
    layer_names: list[str]

    def representatives(self, name: str) -> torch.Tensor: ...


@PALETTIZERS.register("cluster")
@dataclass
class ClusterPalettizer(Palettizer):
    """Snap each layer of a trained ``cluster`` regularizer (``reg``, :mod:`qready.regularizers.cluster`)
    onto its learned representatives. 1-8 bits, one LUT per layer."""

    reg: Representatives | None = None
    grouped: ClassVar[bool] = False

    def check(self, bits: int) -> None:
        if self.reg is None or not callable(getattr(self.reg, "representatives", None)):
            raise ValueError("method='cluster' needs reg=, a trained 'cluster' regularizer")
        if self.reg.bits != bits:
            raise ValueError(f"bits={bits} but the cluster regularizer has bits={self.reg.bits}")

    def layers(self, model: nn.Module, select: Selector | dict | None) -> list[tuple[str, nn.Module, int | None]]:
        if select is not None:
            raise ValueError("method='cluster' palettizes the regularizer's layers; leave select=None")
        assert self.reg is not None
        return [(name, model.get_submodule(name), None) for name in self.reg.layer_names]

    def apply(self, model: nn.Module, layers: Sequence[PaletteLayer], group_size: int | None) -> None:
        assert self.reg is not None
        reg = self.reg
        _snap_all(layers, None,
                  lambda layer, weight, axis: reg.representatives(layer.name).detach().reshape(1, -1).to(weight.device))
