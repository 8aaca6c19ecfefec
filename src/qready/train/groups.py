"""Optimizer parameter groups: the model, each module loss term, and the caller's extra groups, with
every parameter in exactly one group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn


def build_param_groups(
    model: nn.Module, terms: Sequence[tuple[str, Any]], extra_groups: Sequence[Mapping[str, Any]] | None
) -> tuple[list[dict[str, Any]], list[Tensor]]:
    """Optimizer groups ``[model, *term groups, *extra groups]`` with each parameter in exactly one.

    Also returns the extra-group parameters owned by neither the model nor a term module (their
    values are checkpointed separately).
    """
    claimed: dict[int, int] = {}
    extras: list[dict[str, Any]] = []
    for i, group in enumerate(extra_groups or ()):
        if not isinstance(group, Mapping) or "params" not in group:
            raise ValueError(f"param_groups[{i}] must be a dict with a 'params' entry")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"param_groups[{i}]['params'] holds a {type(p).__name__}, not a tensor")
            if id(p) in claimed:
                raise ValueError(f"a parameter appears in both param_groups[{claimed[id(p)]}] and param_groups[{i}]")
            claimed[id(p)] = i
        extras.append({**group, "params": params})

    groups: list[dict[str, Any]] = []
    model_ids = {id(p) for p in model.parameters()}
    model_params = [p for p in model.parameters() if id(p) not in claimed]
    if model_params:
        groups.append({"params": model_params})
    seen = set(claimed) | model_ids
    owned = set(model_ids)
    for _, term in terms:
        if isinstance(term, nn.Module):
            params = []
            for p in term.parameters():
                owned.add(id(p))
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
            if params:
                groups.append({"params": params})
    groups.extend(g for g in extras if g["params"])
    outside = [p for g in extras for p in g["params"] if id(p) not in owned]
    if not groups:
        raise ValueError("nothing to optimize: the model, loss terms and param_groups have no parameters")
    return groups, outside
