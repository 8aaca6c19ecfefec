"""Build a sharpness-aware step strategy from a recipe block, e.g. ``compress.sharpness``::

    sharpness: {kind: saq, rho: 0.3}                      # SAQStep(rho=0.3)
    sharpness: {kind: sam, rho: 0.05, warmup_epochs: 2}   # SAMStep(rho=RhoSchedule(0.05, 2))
    sharpness: {kind: asam, rho: 0.5, eta: 0.01}          # SAMStep(rho=0.5, adaptive=True)
    sharpness: {kind: saq, rho: 0.3, adaptive: true, act_clip: true, norm: false, bias: false}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .ascent import RhoSchedule
from .sam import SAMStep
from .saq import SAQStep

KINDS: tuple[str, ...] = ("sam", "asam", "saq")
_COMMON = ("kind", "rho", "warmup_epochs", "eta")
_KEYS = {"sam": _COMMON, "asam": _COMMON, "saq": (*_COMMON, "adaptive", "act_clip", "norm", "bias")}
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, "saq": 0.3}


def build_step(config: Mapping[str, Any] | None) -> SAMStep | SAQStep | None:
    """The step strategy described by ``config`` (None for None). Raises ValueError naming the key."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise ValueError(f"sharpness must be a mapping like {{kind: saq, rho: 0.3}}; got {config!r}")
    kind = config.get("kind")
    if kind not in KINDS:
        raise ValueError(f"sharpness.kind must be one of {list(KINDS)}; got {kind!r}")
    unknown = [k for k in config if k not in _KEYS[kind]]
    if unknown:
        raise ValueError(f"sharpness.{unknown[0]} is not an option of kind {kind!r}; allowed: {', '.join(_KEYS[kind])}")
    rho = config.get("rho", DEFAULT_RHO[kind])
    warmup = config.get("warmup_epochs", 0)
    schedule = RhoSchedule(rho, warmup) if warmup else rho
    eta = config.get("eta", 0.01)
    if kind == "saq":
        return SAQStep(schedule, adaptive=config.get("adaptive", False), eta=eta,
                       act_clip=config.get("act_clip", False), norm=config.get("norm", False),
                       bias=config.get("bias", False))
    return SAMStep(schedule, adaptive=kind == "asam", eta=eta)
