"""The weights an exporter writes: each selected layer's weight once, as a float32 CPU copy."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..quant.select import SelectedModule, Selector


def selected_weights(model: nn.Module, selector: Selector) -> Iterator[tuple[SelectedModule, str, torch.Tensor]]:
    """``(item, state-dict key, weight)`` of every layer ``selector`` picks, tied weights (one tensor shared
    by several layers, e.g. an embedding and an LM head) once; the weight is a detached float32 CPU copy.

    Raises:
        ValueError: a selected weight is still parametrized (a QAT or palettization wrapper), naming the layer.
    """
    seen: set[int] = set()
    for item in selector.select(model):
        if parametrize.is_parametrized(item.module, "weight"):
            raise ValueError(f"the weight of {item.name!r} is parametrized (a QAT or palettization wrapper): "
                             "finalize the model first (qready.finalize / finalize_palettized)")
        if id(item.module.weight) in seen:
            continue
        seen.add(id(item.module.weight))
        key = f"{item.name}.weight" if item.name else "weight"
        yield item, key, item.module.weight.detach().float().cpu()
