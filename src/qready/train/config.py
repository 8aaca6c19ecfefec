"""Training configuration plus the optimizer and learning-rate schedule built from it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .distill import DISTILL_LOSSES

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
SCHEDULES: tuple[str, ...] = ("none", "cosine", "step")
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "stop")
OBJECTIVES: tuple[str, ...] = ("cross_entropy", "distill")


def _choices(values: Iterable[str]) -> str:
    return ", ".join(repr(v) for v in values)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`qready.train.fit`.

    Epochs are 0-based indices everywhere in the API (``milestones``, ``LossTerm.active``, callbacks,
    ``metrics["epoch"]``); logs and the progress bar show them 1-based. ``batch_size`` is for code that
    builds loaders (``fit`` uses the loader it is given as-is). ``weight_decay`` is passed to every
    optimizer, AdamW included (its torch default of 0.01 is not used). ``milestones`` are the epoch
    indices at which the ``"step"`` schedule multiplies the learning rate by ``gamma``;
    ``warmup_epochs`` ramps it linearly from ``lr / warmup_steps`` to ``lr`` first. ``nonfinite``
    says what happens when a step's loss (or gradient norm) is NaN/Inf: ``"skip"`` drops that update
    with a logged warning, ``"stop"`` raises :class:`~qready.train.NonFiniteError`. ``objective`` is
    what is minimised before loss terms: ``"cross_entropy"`` (needs labels) or ``"distill"`` (no labels:
    match a frozen float copy of the model, with ``distill_loss`` ``"kl"`` at ``temperature``, ``"mse"``
    or ``"cosine"``; see :class:`~qready.train.distill.Distill`).
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: int = 0
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    nonfinite: str = "skip"
    objective: str = "cross_entropy"
    distill_loss: str = "kl"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"TrainConfig.{name} must be {expected}; got {getattr(self, name)!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                fail(name, "a finite number")
            object.__setattr__(self, name, float(value))
            return float(value)

        if not _is_int(self.epochs) or self.epochs < 1:
            fail("epochs", "an integer >= 1")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            fail("batch_size", "an integer >= 1")
        if self.optimizer not in OPTIMIZERS:
            fail("optimizer", f"one of {_choices(OPTIMIZERS)}")
        if number("lr") <= 0:
            fail("lr", "> 0")
        if not 0.0 <= number("momentum") < 1.0:
            fail("momentum", "in [0, 1)")
        if not isinstance(self.nesterov, bool):
            fail("nesterov", "a bool")
        if self.nesterov and self.optimizer != "sgd":
            fail("nesterov", "False unless optimizer='sgd'")
        if self.nesterov and self.momentum == 0.0:
            fail("nesterov", "False when momentum is 0 (Nesterov needs momentum > 0)")
        if number("weight_decay") < 0:
            fail("weight_decay", ">= 0")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"one of {_choices(SCHEDULES)}")
        if isinstance(self.milestones, (list, tuple)):
            object.__setattr__(self, "milestones", tuple(self.milestones))
        else:
            fail("milestones", "a tuple or list of epoch indices")
        ms = self.milestones
        if not all(_is_int(m) and m >= 1 for m in ms) or any(a >= b for a, b in zip(ms, ms[1:], strict=False)):
            fail("milestones", "strictly increasing integers >= 1")
        if self.schedule == "step" and not ms:
            fail("milestones", "non-empty when schedule='step'")
        if self.schedule != "step" and ms:
            fail("milestones", "empty unless schedule='step'")
        if number("gamma") <= 0:
            fail("gamma", "> 0")
        if not _is_int(self.warmup_epochs) or not 0 <= self.warmup_epochs <= self.epochs:
            fail("warmup_epochs", f"an integer in [0, epochs={self.epochs}]")
        if self.grad_clip is not None and number("grad_clip") <= 0:
            fail("grad_clip", "None or a number > 0")
        if not 0.0 <= number("label_smoothing") < 1.0:
            fail("label_smoothing", "in [0, 1)")
        if self.nonfinite not in NONFINITE_POLICIES:
            fail("nonfinite", f"one of {_choices(NONFINITE_POLICIES)}")
        if self.objective not in OBJECTIVES:
            fail("objective", f"one of {_choices(OBJECTIVES)}")
        if self.distill_loss not in DISTILL_LOSSES:
            fail("distill_loss", f"one of {_choices(DISTILL_LOSSES)}")
        if number("temperature") <= 0:
            fail("temperature", "> 0")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (``TrainConfig(**cfg.to_dict())`` round-trips)."""
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def build_optimizer(params_or_groups: Iterable[Any], cfg: TrainConfig) -> Optimizer:
    """The optimizer named by ``cfg.optimizer`` over parameters or param-group dicts.

    ``cfg.lr``/``weight_decay``/``momentum``/``nesterov`` are the defaults; a group's own keys win.
    """
    params = list(params_or_groups)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"TrainConfig.optimizer must be one of {_choices(OPTIMIZERS)}; got {cfg.optimizer!r}")


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of each group's base lr at optimizer step ``step`` (0-based, counted over all epochs)."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        span = total - warmup
        progress = min(max((step - warmup) / span, 0.0), 1.0) if span > 0 else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(1 for m in cfg.milestones if m <= epoch)
    return 1.0


def build_scheduler(optimizer: Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """A per-step :class:`LambdaLR`: linear warm-up, then cosine to 0, step decay or constant.

    Call ``scheduler.step()`` after every optimizer step (skipped steps included).
    """
    if not _is_int(steps_per_epoch) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an integer >= 1; got {steps_per_epoch!r}")

    def factor(step: int) -> float:
        return lr_factor(step, cfg, steps_per_epoch)

    return LambdaLR(optimizer, factor)
