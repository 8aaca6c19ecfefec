"""Palettization: every selected weight becomes ``2^b`` representatives (a LUT) and ``b``-bit indices.

Four methods, one entry point (:func:`palettize`):

* ``"kmeans"``: post-training; the 1-D k-means of each layer (or LUT group) and a snap to it. 1-8 bits.
* ``"dkm"``: training-time; a :class:`~qready.quant.palettize.dkm.DKMWeight` parametrization is attached to each
  selected weight; train the returned model (e.g. with :func:`qready.train.fit`), then
  :func:`finalize_palettized` snaps the weights to their centroids and removes the parametrizations.
  1-4 bits.
* ``"cluster"``: snaps each layer onto the learned representatives of a trained ``cluster``
  regularizer (:mod:`qready.regularizers.cluster`). 1-8 bits.
* ``"gptq"``: post-training; the ``"kmeans"`` LUTs, then GPTQ's error-compensating snap on calibration
  batches (``calib=``; :mod:`qready.quant.palettize.gptq`). 1-8 bits.

After ``"kmeans"``/``"cluster"`` or :func:`finalize_palettized` each layer has at most ``2^b``
distinct values per LUT group, which :func:`qready.export.save_packed` stores as indices + LUT.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import fields
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...checks import check_int
from ..parametrized import remove_weight_parametrization
from ..select import Selector
from ..spec import check_bits
from ..validate import check_finite
from .dkm import DKMWeight
from .methods import PALETTIZERS, PaletteLayer, Palettizer

log = logging.getLogger("qready.palettize")

# the vocabulary of QuantSpec.granularity: one LUT per tensor, per output channel, or per group of channels
PALETTE_GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")


def _build_method(method: str | Palettizer, options: dict[str, Any]) -> Palettizer:
    if isinstance(method, Palettizer):
        if options:
            raise TypeError(f"options {sorted(options)} go into the palettizer object itself")
        return method
    cls = PALETTIZERS.get(method)
    allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"method={method!r} has no option {unknown[0]!r}; its options: {', '.join(allowed) or 'none'}")
    return cls(**options)


def _check_granularity(name: str, palettizer: Palettizer, granularity: str, group_size: object) -> None:
    if granularity not in PALETTE_GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(PALETTE_GRANULARITIES)}; got {granularity!r}")
    if granularity in ("channel", "group") and not palettizer.grouped:
        raise ValueError(f"method={name!r} has one set of representatives per layer: use granularity='tensor'")
    if granularity == "group":
        check_int("group_size (with granularity='group')", group_size, minimum=1)
    elif group_size is not None:
        raise ValueError("group_size is only used with granularity='group'")


def palettize(
    model: nn.Module,
    bits: int = 2,
    method: str | Palettizer = "dkm",
    select: Selector | dict | None = None,
    *,
    granularity: Literal["tensor", "channel", "group"] = "tensor",
    group_size: int | None = None,
    inplace: bool = False,
    **options: Any,
) -> nn.Module:
    """Palettize the selected weights of ``model`` (a copy unless ``inplace``).

    Args:
        model: any ``nn.Module``.
        bits: index bits ``b`` (``2^b`` representatives per LUT): 1-4 for ``"dkm"``, 1-8 otherwise.
        method: a name of :data:`PALETTIZERS` -- ``"dkm"`` (attach DKM; train; :func:`finalize_palettized`),
            ``"kmeans"`` (post-training), ``"gptq"`` (post-training, k-means LUTs with error feedback on
            ``calib``) or ``"cluster"`` (snap onto ``reg``'s learned representatives) --
            or a :class:`Palettizer` object.
        select: which modules (a :class:`Selector` or its keyword arguments); an int ``first_last``
            palettizes the first/last layer at that many bits. Not used with ``"cluster"``.
        granularity: one LUT per ``"tensor"`` (layer), per output ``"channel"``, or per ``"group"`` of
            ``group_size`` output channels (along
            each layer's output-channel axis, see :mod:`qready.quant.layers`).
        inplace: modify ``model`` itself.
        options: the method's own options (its dataclass fields), e.g. ``tau``, ``iters``, ``impl``,
            ``chunk``, ``kmeans_method`` for ``"dkm"``; ``kmeans_method`` for ``"kmeans"``; ``reg`` for
            ``"cluster"``; ``calib``, ``calib_batches``, ``damp``, ``block_size``, ``act_order``,
            ``sequential``, ``kmeans_method`` for ``"gptq"``.
    Returns:
        the palettized model (for ``"dkm"``: with parametrizations attached, to be trained).

    >>> import torch, qready
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 8))
    >>> pal = qready.palettize(net, bits=2, method="kmeans")
    >>> pal[0].weight.unique().numel() <= 4
    True
    """
    palettizer = _build_method(method, options)
    name = method if isinstance(method, str) else type(method).__name__
    check_bits(bits, f"bits (method={name!r})", palettizer.supported_bits)
    _check_granularity(name, palettizer, granularity, group_size)
    palettizer.check(bits)
    check_finite(model)
    out = model if inplace else copy.deepcopy(model)
    layers = []
    for layer_name, module, override in palettizer.layers(out, select):
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"module {layer_name!r} already has a parametrization on its weight (palettized or "
                             "quantized twice?); finalize it first")
        layer_bits = bits if override is None else check_bits(
            override, f"first_last bits of {layer_name!r} ({name})", palettizer.supported_bits)
        layers.append(PaletteLayer(layer_name, module, layer_bits))
    palettizer.apply(out, layers, {"tensor": None, "channel": 1, "group": group_size}[granularity])
    log.debug("palettized %d modules with %s at %d bits", len(layers), name, bits)
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
            remove_weight_parametrization(module, leave_parametrized=False)
            module.weight.copy_(values)
        done += 1
    if done == 0:
        raise ValueError(f"{type(model).__name__} has no DKM parametrization to finalize "
                         "(was it palettized with method='dkm'?)")
    return model
