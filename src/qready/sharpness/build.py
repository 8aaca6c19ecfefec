"""Sharpness-aware step strategies from a typed config (a recipe's ``sharpness`` or ``compress.sharpness``
block), one registered builder per kind::

    sharpness: {kind: saq, rho: 0.3}                      # SAQStep(rho=0.3)
    sharpness: {kind: sam, rho: 0.05, warmup_epochs: 2}   # SAMStep(rho=RhoSchedule(0.05, 2))
    sharpness: {kind: asam, rho: 0.5, eta: 0.01}          # SAMStep(rho=0.5, adaptive=True)
    sharpness: {kind: saq, rho: 0.3, adaptive: true, act_clip: true, norm: false, bias: false}

A new kind is one function registered in :data:`SHARPNESS_KINDS` (plus its default ρ and any options of
its own in :data:`KIND_OPTIONS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..registry import Registry
from .ascent import RhoSchedule
from .sam import SAMStep
from .saq import SAQStep

SHARPNESS_KINDS: Registry[SAMStep | SAQStep] = Registry("sharpness kind")
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, "saq": 0.3}
KIND_OPTIONS = {"saq": ("adaptive", "act_clip", "norm", "bias")}  # options only some kinds take


@dataclass(frozen=True)
class SharpnessConfig:
    """A sharpness-aware step: ``kind`` (a name of :data:`SHARPNESS_KINDS`), radius ``rho`` (default per
    kind), ``warmup_epochs`` with ρ = 0, ASAM's ``eta``; SAQ only: ``adaptive`` (ASAM-style ε), and what
    else is perturbed: activation clip values (``act_clip``), BatchNorm affine (``norm``), biases (``bias``)."""

    kind: str
    rho: float | None = None
    warmup_epochs: int = 0
    eta: float = 0.01
    adaptive: bool = False
    act_clip: bool = False
    norm: bool = False
    bias: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SHARPNESS_KINDS:
            raise ValueError(f"sharpness.kind must be one of {SHARPNESS_KINDS.names()}; got {self.kind!r}")
        restricted = {name for options in KIND_OPTIONS.values() for name in options}
        for f in dataclasses.fields(self):
            misplaced = f.name in restricted and f.name not in KIND_OPTIONS.get(self.kind, ())
            if misplaced and getattr(self, f.name) != f.default:
                raise ValueError(f"sharpness.{f.name} is not an option of kind {self.kind!r}")

    @property
    def radius(self) -> float | RhoSchedule:
        """ρ, or its warm-up schedule."""
        rho = DEFAULT_RHO.get(self.kind, 0.05) if self.rho is None else self.rho
        return RhoSchedule(rho, self.warmup_epochs) if self.warmup_epochs else rho

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> SharpnessConfig:
        """From a recipe mapping; an unknown key is a ``ValueError`` naming it and the allowed keys."""
        if not isinstance(config, Mapping):
            raise ValueError(f"sharpness must be a mapping like {{kind: saq, rho: 0.3}}; got {config!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in config if k not in names]
        if unknown:
            raise ValueError(f"sharpness.{unknown[0]} is not an option; allowed: {', '.join(names)}")
        if "kind" not in config:
            raise ValueError(f"sharpness.kind is required: one of {SHARPNESS_KINDS.names()}")
        return cls(**config)


@SHARPNESS_KINDS.register("sam")
def _sam(config: SharpnessConfig) -> SAMStep:
    return SAMStep(config.radius, adaptive=False, eta=config.eta)


@SHARPNESS_KINDS.register("asam")
def _asam(config: SharpnessConfig) -> SAMStep:
    return SAMStep(config.radius, adaptive=True, eta=config.eta)


@SHARPNESS_KINDS.register("saq")
def _saq(config: SharpnessConfig) -> SAQStep:
    return SAQStep(config.radius, adaptive=config.adaptive, eta=config.eta, act_clip=config.act_clip,
                   norm=config.norm, bias=config.bias)


def build_step(config: SharpnessConfig | Mapping[str, Any] | None) -> SAMStep | SAQStep | None:
    """The step strategy described by ``config`` (None for None). Raises ValueError naming the key."""
    if config is None:
        return None
    if not isinstance(config, SharpnessConfig):
        config = SharpnessConfig.from_mapping(config)
    builder: Callable[[SharpnessConfig], SAMStep | SAQStep] = SHARPNESS_KINDS.get(config.kind)
    return builder(config)
