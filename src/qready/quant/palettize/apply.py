"""Palettization: every selected weight becomes ``2^b`` representatives (a LUT) and ``b``-bit indices.

Three methods, one entry point (:func:`palettize`):

* ``"kmeans"``: post-training; the 1-D k-means of each layer (or LUT group) and a snap to it. 1-8 bits.
* ``"dkm"``: training-time; a :class:`~qready.quant.palettize.dkm.DKMWeight` parametrization is attached to each
  selected weight; train the returned model (e.g. with :func:`qready.train.fit`), then
  :func:`finalize_palettized` snaps the weights to their centroids and removes the parametrizations.
  1-4 bits.
* ``"cluster"``: snaps each layer onto the learned representatives of a trained ``cluster``
  regularizer (:mod:`qready.regularizers.cluster`). 1-8 bits.

After ``"kmeans"``/``"cluster"`` or :func:`finalize_palettized` each layer has at most ``2^b``
distinct values per LUT group, which :func:`qready.export.save_packed` stores as indices + LUT.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layers import out_axis
from ..select import Selector, as_selector
from ..spec import WEIGHT_BITS, check_bits
from ..validate import check_finite
from .codebook import channel_groups, kmeans_lut, snap
from .dkm import CHUNK, DKM_BITS, DKMImpl, DKMWeight
from .kmeans import KMeansMethod

log = logging.getLogger("qready.palettize")

PALETTIZE_METHODS: tuple[str, ...] = ("dkm", "kmeans", "cluster")
PALETTE_GRANULARITIES: tuple[str, ...] = ("layer", "group")
METHOD_BITS: dict[str, tuple[int, ...]] = {"dkm": DKM_BITS, "kmeans": WEIGHT_BITS, "cluster": WEIGHT_BITS}


class Representatives(Protocol):
    """What ``method="cluster"`` needs from a trained regularizer."""

    bits: int
    layer_names: list[str]

    def representatives(self, name: str) -> torch.Tensor: ...


def _check_options(method: str, bits: object, granularity: str, group_size: object, reg: object) -> None:
    if method not in PALETTIZE_METHODS:
        raise ValueError(f"method must be one of {list(PALETTIZE_METHODS)}; got {method!r}")
    check_bits(bits, f"bits (method={method!r})", METHOD_BITS[method])
    if granularity not in PALETTE_GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(PALETTE_GRANULARITIES)}; got {granularity!r}")
    if granularity == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int with granularity='group'; got {group_size!r}")
        if method == "cluster":
            raise ValueError("method='cluster' has one set of representatives per layer: use granularity='layer'")
    elif group_size is not None:
        raise ValueError("group_size is only used with granularity='group'")
    if method == "cluster":
        if reg is None or not callable(getattr(reg, "representatives", None)):
            raise ValueError("method='cluster' needs reg=, a trained 'cluster' regularizer")
        if reg.bits != bits:
            raise ValueError(f"bits={bits} but the cluster regularizer has bits={reg.bits}")
    elif reg is not None:
        raise ValueError(f"reg= is only used with method='cluster' (got method={method!r})")


def _layers(model: nn.Module, method: str, select: Selector | dict | None, reg: Representatives | None
            ) -> list[tuple[str, nn.Module, int | None]]:
    """``(name, module, bits override)`` of the layers to palettize."""
    if method == "cluster":
        if select is not None:
            raise ValueError("method='cluster' palettizes the regularizer's layers; leave select=None")
        return [(name, model.get_submodule(name), None) for name in reg.layer_names]
    chosen = as_selector(select).select(model)
    if not chosen:
        raise ValueError(f"no module of {type(model).__name__} matches the selector; nothing to palettize")
    return [(item.name, item.module, item.bits_override) for item in chosen]


def palettize(
    model: nn.Module,
    bits: int = 2,
    method: Literal["dkm", "kmeans", "cluster"] = "dkm",
    select: Selector | dict | None = None,
    *,
    granularity: Literal["layer", "group"] = "layer",
    group_size: int | None = None,
    tau: float = 0.05,
    iters: int = 3,
    reg: Representatives | None = None,
    kmeans_method: KMeansMethod = "auto",
    impl: DKMImpl = "unique",
    chunk: int = CHUNK,
    inplace: bool = False,
) -> nn.Module:
    """Palettize the selected weights of ``model`` (a copy unless ``inplace``).

    Args:
        model: any ``nn.Module``.
        bits: index bits ``b`` (``2^b`` representatives per LUT): 1-4 for ``"dkm"``, 1-8 otherwise.
        method: ``"dkm"`` (attach DKM; train; :func:`finalize_palettized`), ``"kmeans"`` (post-training)
            or ``"cluster"`` (snap onto ``reg``'s learned representatives).
        select: which modules (a :class:`Selector` or its keyword arguments); an int ``first_last``
            palettizes the first/last layer at that many bits. Not used with ``"cluster"``.
        granularity: one LUT per ``"layer"``, or per ``"group"`` of ``group_size`` output channels (along
            each layer's output-channel axis, see :mod:`qready.quant.layers`).
        tau: DKM temperature relative to each group's weight variance (see :class:`DKMWeight`).
        iters: DKM centroid iterations per step.
        reg: the trained ``cluster`` regularizer (``method="cluster"``).
        kmeans_method: k-means solver for ``"kmeans"`` and DKM's initial centroids.
        impl: DKM implementation, ``"unique"`` (memory-efficient) or ``"naive"`` (reference).
        chunk: DKM attention chunk (distinct values per chunk).
        inplace: modify ``model`` itself.
    Returns:
        the palettized model (for ``"dkm"``: with parametrizations attached, to be trained).
    """
    _check_options(method, bits, granularity, group_size, reg)
    check_finite(model)
    out = model if inplace else copy.deepcopy(model)
    layers = _layers(out, method, select, reg)
    size = group_size if granularity == "group" else None
    for name, module, override in layers:
        layer_bits = bits if override is None else check_bits(override, f"first_last bits of {name!r} ({method})",
                                                              METHOD_BITS[method])
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"module {name!r} already has a parametrization on its weight (palettized or "
                             "quantized twice?); finalize it first")
        weight, axis = module.weight, out_axis(module) or 0
        if method == "dkm":
            parametrize.register_parametrization(
                module, "weight",
                DKMWeight(weight, layer_bits, group_size=size, tau=tau, iters=iters, impl=impl, chunk=chunk,
                          kmeans_method=kmeans_method, axis=axis))
            continue
        if method == "kmeans":
            lut = kmeans_lut(weight, layer_bits, size, kmeans_method, axis)
        else:
            lut = reg.representatives(name).detach().reshape(1, -1).to(weight.device)
        with torch.no_grad():
            weight.copy_(snap(weight, lut, channel_groups(tuple(weight.shape), size, weight.device, axis)))
    log.debug("palettized %d modules with %s at %d bits", len(layers), method, bits)
    return out


def finalize_palettized(model: nn.Module) -> nn.Module:
    """Snap every DKM-parametrized weight of ``model`` to its nearest centroid and remove the
    parametrization (in place; returns ``model``). Each such layer then has at most ``2^b`` distinct
    values per LUT group."""
    done = 0
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        chain = module.parametrizations["weight"]
        if not any(isinstance(p, DKMWeight) for p in chain):
            continue
        if len(chain) != 1:
            raise ValueError(f"module {name!r} has other parametrizations chained with DKM; remove them first")
        with torch.no_grad():
            values = chain[0].snap(chain.original)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight.copy_(values)
        done += 1
    if done == 0:
        raise ValueError(f"{type(model).__name__} has no DKM parametrization to finalize "
                         "(was it palettized with method='dkm'?)")
    return model
