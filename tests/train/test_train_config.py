"""TrainConfig validation and the optimizer/scheduler built from it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qready.train import TrainConfig, build_optimizer, build_scheduler


def test_defaults_and_frozen() -> None:
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.optimizer, cfg.schedule, cfg.nonfinite) == (10, "adam", "cosine", "skip")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.1  # type: ignore[misc]


def test_optimizer_message_names_field_and_choices() -> None:
    with pytest.raises(ValueError) as e:
        TrainConfig(optimizer="rmsprop")
    assert str(e.value) == "TrainConfig.optimizer must be one of 'sgd', 'adam', 'adamw'; got 'rmsprop'"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"epochs": 0}, "TrainConfig.epochs"),
        ({"epochs": 2.5}, "TrainConfig.epochs"),
        ({"batch_size": 0}, "TrainConfig.batch_size"),
        ({"lr": 0.0}, "TrainConfig.lr"),
        ({"lr": float("nan")}, "TrainConfig.lr"),
        ({"momentum": 1.0}, "TrainConfig.momentum"),
        ({"nesterov": True}, "TrainConfig.nesterov"),  # adam
        ({"optimizer": "sgd", "nesterov": True, "momentum": 0.0}, "TrainConfig.nesterov"),
        ({"weight_decay": -1.0}, "TrainConfig.weight_decay"),
        ({"schedule": "linear"}, "'none', 'cosine', 'step'"),
        ({"schedule": "step"}, "TrainConfig.milestones"),
        ({"schedule": "step", "milestones": (5, 3)}, "TrainConfig.milestones"),
        ({"milestones": (3,)}, "TrainConfig.milestones"),  # cosine
        ({"gamma": 0.0, "schedule": "step", "milestones": (1,)}, "TrainConfig.gamma"),
        ({"warmup_epochs": 11}, "TrainConfig.warmup_epochs"),
        ({"grad_clip": 0.0}, "TrainConfig.grad_clip"),
        ({"label_smoothing": 1.0}, "TrainConfig.label_smoothing"),
        ({"nonfinite": "ignore"}, "'skip', 'stop'"),
    ],
)
def test_invalid_fields(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match="TrainConfig") as e:
        TrainConfig(**kwargs)
    assert needle in str(e.value)


def test_milestones_list_becomes_tuple_and_round_trip() -> None:
    cfg = TrainConfig(schedule="step", milestones=[2, 4], lr=1)
    assert cfg.milestones == (2, 4)
    assert isinstance(cfg.lr, float)
    assert TrainConfig(**cfg.to_dict()) == cfg


def test_build_optimizer_kinds() -> None:
    p = [torch.nn.Parameter(torch.zeros(3))]
    sgd = build_optimizer(p, TrainConfig(optimizer="sgd", lr=0.1, nesterov=True, weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9
    assert isinstance(build_optimizer(p, TrainConfig(optimizer="adam")), torch.optim.Adam)
    adamw = build_optimizer(p, TrainConfig(optimizer="adamw"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.0
    groups = build_optimizer([{"params": p, "lr": 0.5}], TrainConfig(lr=0.1))
    assert groups.param_groups[0]["lr"] == 0.5


def _lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine() -> None:
    lrs = _lrs(TrainConfig(epochs=4, lr=1.0, warmup_epochs=1), steps_per_epoch=4)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 12)))


def test_step_and_none_schedules() -> None:
    lrs = _lrs(TrainConfig(epochs=4, lr=1.0, schedule="step", milestones=(1, 3), gamma=0.5), 2)
    assert lrs == pytest.approx([1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25])
    assert _lrs(TrainConfig(epochs=2, lr=0.3, schedule="none"), 3) == pytest.approx([0.3] * 6)


def test_scheduler_rejects_bad_steps() -> None:
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], TrainConfig())
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_scheduler(opt, TrainConfig(), 0)
