"""One training step: the loss-term and step-strategy protocols, the step context, the default step,
and the loss computation every strategy calls (forward + task loss + active loss terms)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..batching import Inputs
from . import distributed
from .guards import NonFiniteError
from .objective import Objective

RESERVED_METRICS = frozenset(
    {"epoch", "train_loss", "train_acc", "task_loss", "val_loss", "val_acc", "lr", "skipped_steps", "time_s"}
)
@runtime_checkable
class LossTerm(Protocol):
    """A scalar added to the task loss, e.g. a regularizer (usually an ``nn.Module``).

    Optional attributes: ``name: str`` (metric key ``term/<name>``; defaults to the class or function
    name), ``active(epoch) -> bool`` (skipped for epochs where it is False), ``needs_graph: bool``
    (the task loss passed in must still have its graph, e.g. for ``autograd.grad(...,
    create_graph=True)``). Terms are called in order, each with the task loss only.
    """

    def __call__(self, model: nn.Module, loss: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class StepStrategy(Protocol):
    """Performs the optimizer update for one batch and returns the step's total loss.

    ``ctx.compute_loss()`` raises :class:`NonFiniteError` for a NaN/Inf loss and
    ``ctx.clip_gradients()`` for a NaN/Inf gradient norm; the loop then skips or stops per
    ``TrainConfig.nonfinite``. A strategy must not have updated the weights when such an error leaves
    it: one that perturbs weights (SAM) restores them in a ``finally`` block.
    """

    def step(self, ctx: StepContext) -> Tensor: ...


class StopTraining(Exception):
    """Raised by a callback to end :func:`fit` after the current epoch (logged and checkpointed)."""


@dataclass
class StepContext:
    """Everything a :class:`StepStrategy` needs for one batch.

    ``compute_loss()`` runs the objective (forward + task loss) and the active loss terms and returns
    ``(total, parts)`` where ``parts`` maps ``"task"`` and each term name to its detached value.
    ``batch`` is ``(inputs, targets)`` on the training device (``targets`` ``None`` when unlabeled). ``step`` is the global
    0-based step index (``epoch * steps_per_epoch + batch index``). Train accuracy and per-term
    metrics come from the first ``compute_loss()`` call of the step. ``model`` is the unwrapped module
    even under DDP; ``net`` is what the forward runs through (the DDP wrapper, or ``model``).
    """

    model: nn.Module
    batch: tuple[Inputs, Tensor | None]
    optimizer: torch.optim.Optimizer
    compute_loss: Callable[[], tuple[Tensor, dict[str, Tensor]]]
    epoch: int
    step: int
    grad_clip: float | None = None
    logs: dict[str, float] = field(default_factory=dict)
    net: nn.Module | None = field(default=None, repr=False)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Under DDP: a context in which forward + backward keep gradients local (not averaged over
        processes; e.g. the ascent pass of SAM); they are averaged at the next synchronised backward.
        Does nothing for a single process."""
        return distributed.no_sync(self.net) if self.net is not None else contextlib.nullcontext()

    @property
    def params(self) -> list[Tensor]:
        """Every parameter the optimizer updates."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def clip_gradients(self) -> float:
        """Clip to ``grad_clip`` (when set) and return the total gradient 2-norm before clipping.

        Raises :class:`NonFiniteError` when the norm is NaN/Inf (call before ``optimizer.step()``).
        """
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(grads, self.grad_clip)
        else:
            dev = grads[0].grad.device
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.detach()).to(dev) for p in grads])
            )
        value = float(norm)
        if not math.isfinite(value):
            raise NonFiniteError(f"gradient norm is {value}")
        return value

    def log(self, name: str, value: float | Tensor) -> None:
        """Record a per-step scalar; its epoch mean appears in the metrics under ``name``."""
        if name in RESERVED_METRICS or name.startswith("term/"):
            raise ValueError(f"step log name {name!r} is reserved for the loop's own metrics")
        self.logs[name] = float(value.detach()) if isinstance(value, Tensor) else float(value)


class StandardStep:
    """zero_grad -> compute_loss -> backward -> clip (optional) -> optimizer.step; logs ``grad_norm``."""

    def step(self, ctx: StepContext) -> Tensor:
        ctx.optimizer.zero_grad(set_to_none=True)
        total, _ = ctx.compute_loss()
        total.backward()
        ctx.log("grad_norm", ctx.clip_gradients())
        ctx.optimizer.step()
        return total.detach()


def term_name(term: Any) -> str:
    name = getattr(term, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(term, nn.Module) or not hasattr(term, "__name__"):
        return type(term).__name__
    return str(term.__name__)


def named_terms(loss_terms: Iterable[Any]) -> list[tuple[str, Any]]:
    named: list[tuple[str, Any]] = []
    used = {"task"}
    for term in loss_terms:
        if not callable(term):
            raise TypeError(f"loss term {term!r} is not callable")
        base = term_name(term)
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        named.append((name, term))
    return named


def is_active(term: Any, epoch: int) -> bool:
    active = getattr(term, "active", None)
    if active is None:
        return True
    return bool(active(epoch)) if callable(active) else bool(active)


def _describe_nonfinite(total: Tensor, parts: Mapping[str, Tensor]) -> str:
    bad = [f"{'task loss' if k == 'task' else f'loss term {k!r}'}={float(v)}"
           for k, v in parts.items() if not math.isfinite(float(v))]
    return f"loss is {float(total.detach())} (non-finite: {', '.join(bad) or 'the sum'})"


def make_compute_loss(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor | None,
    objective: Objective,
    terms: Sequence[tuple[str, Any]],
    record: dict[str, Any],
    net: nn.Module | None = None,
) -> Callable[[], tuple[Tensor, dict[str, Tensor]]]:
    """``model`` is what terms see; the objective's forward runs through ``net`` (its DDP wrapper) when
    given. ``targets`` is ``None`` for an unlabeled batch."""
    forward = net if net is not None else model

    def compute_loss() -> tuple[Tensor, dict[str, Tensor]]:
        task, out = objective(forward, inputs, targets)
        total = task
        parts: dict[str, Tensor] = {"task": task.detach()}
        for name, term in terms:
            if getattr(term, "needs_graph", False) and not task.requires_grad:
                raise RuntimeError(f"loss term {name!r} needs the task loss graph, but the task loss does "
                                   "not require grad (was compute_loss called under torch.no_grad()?)")
            graph = getattr(term, "needs_graph", False) and net is not None
            with distributed.global_gradients(net) if graph else contextlib.nullcontext():
                value = term(model, task)
            if not isinstance(value, Tensor):
                value = torch.as_tensor(value, dtype=task.dtype, device=task.device)
            if value.numel() != 1:
                raise ValueError(f"loss term {name!r} must return a scalar; got shape {tuple(value.shape)}")
            value = value.reshape(())
            parts[name] = value.detach()
            total = total + value
        finite = bool(torch.isfinite(total.detach()))
        if not distributed.all_agree(finite, total.device):
            raise NonFiniteError(_describe_nonfinite(total, parts) if not finite
                                 else "the loss is non-finite on another process")
        if "parts" not in record:
            record["outputs"] = out.detach()
            record["parts"] = parts
        return total, parts

    return compute_loss
