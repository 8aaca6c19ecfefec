"""The training loop every qready method uses.

Extension points:

* **Loss terms** (:class:`LossTerm`): ``term(model, task_loss) -> scalar`` added to the task loss.
  ``nn.Module`` terms get their parameters optimized (one param group per term) and their state
  checkpointed; optional ``active(epoch) -> bool`` switches a term on/off per epoch; ``needs_graph``
  asserts the task loss still has its autograd graph (it is always passed undetached).
* **Step strategies** (:class:`StepStrategy`): own the whole update of one batch (SAM-style methods
  call ``ctx.compute_loss()`` twice). :class:`StandardStep` is the default.
* **param_groups**: extra optimizer groups (own lr, parameters outside the model); a parameter is
  never in two groups -- an explicit group wins over the model and loss-term groups.
* **callbacks** ``cb(epoch, metrics, model)`` after each epoch; they may add entries to ``metrics``
  (logged and checkpointed) and raise :class:`StopTraining` to end training after this epoch.

Under ``torchrun`` (an initialised process group of more than one process) ``fit`` trains with DDP; see
:mod:`qready.train.distributed` for what runs where.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn

from ..evaluate.metrics import batch_to_device, evaluate
from . import distributed
from .checkpoint import CheckpointError, checkpoint_exists, load_checkpoint, save_checkpoint
from .config import TrainConfig, build_optimizer, build_scheduler
from .guards import NonFiniteError, check_finite, first_nonfinite

logger = logging.getLogger("qready.train")

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
RESERVED_METRICS = frozenset(
    {"epoch", "train_loss", "train_acc", "task_loss", "val_loss", "val_acc", "lr", "skipped_steps", "time_s"}
)
RESERVED_META = frozenset(
    {"epoch", "metrics", "history", "train_config", "loss_terms", "step_strategy",
     "qready_version", "format_version", "files"}
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

    ``compute_loss()`` runs forward + task loss + active loss terms and returns ``(total, parts)``
    where ``parts`` maps ``"task"`` and each term name to its detached value. ``step`` is the global
    0-based step index (``epoch * steps_per_epoch + batch index``). Train accuracy and per-term
    metrics come from the first ``compute_loss()`` call of the step. ``model`` is the unwrapped module
    even under DDP; ``net`` is what the forward runs through (the DDP wrapper, or ``model``).
    """

    model: nn.Module
    batch: tuple[Tensor, Tensor]
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


@dataclass
class TrainResult:
    """What :func:`fit` returns. ``history`` holds one metrics dict per epoch (resumed ones included)."""

    history: list[dict]
    final: dict
    model: nn.Module
    run_dir: Path | None = None
    stopped_early: bool = False


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------- helpers


def _term_name(term: Any) -> str:
    name = getattr(term, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(term, nn.Module) or not hasattr(term, "__name__"):
        return type(term).__name__
    return str(term.__name__)


def _named_terms(loss_terms: Iterable[Any]) -> list[tuple[str, Any]]:
    named: list[tuple[str, Any]] = []
    used = {"task"}
    for term in loss_terms:
        if not callable(term):
            raise TypeError(f"loss term {term!r} is not callable")
        base = _term_name(term)
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        named.append((name, term))
    return named


def _is_active(term: Any, epoch: int) -> bool:
    active = getattr(term, "active", None)
    if active is None:
        return True
    return bool(active(epoch)) if callable(active) else bool(active)


def _build_param_groups(
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


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _steps_per_epoch(loader: Iterable) -> int:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError as e:
        raise ValueError("train_loader must define len() (the per-step lr schedule needs the number of "
                         "steps per epoch)") from e
    if n < 1:
        raise ValueError("train_loader is empty")
    return n


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that decide a DataLoader's shuffling (deduplicated)."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": py_state[0],
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss": py_state[2],
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
         npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _jsonable(value: Any) -> Any:
    """Metrics as plain JSON: 1-element tensors/numpy scalars -> float, NaN/Inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def _write_lines(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    os.replace(tmp, path)


def _progress(enabled: bool) -> Progress:
    console = Console()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )


def _describe_nonfinite(total: Tensor, parts: Mapping[str, Tensor]) -> str:
    bad = [f"{'task loss' if k == 'task' else f'loss term {k!r}'}={float(v)}"
           for k, v in parts.items() if not math.isfinite(float(v))]
    return f"loss is {float(total.detach())} (non-finite: {', '.join(bad) or 'the sum'})"


def _make_compute_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    criterion: nn.Module,
    terms: Sequence[tuple[str, Any]],
    record: dict[str, Any],
    net: nn.Module | None = None,
) -> Callable[[], tuple[Tensor, dict[str, Tensor]]]:
    """``model`` is what terms see; the forward runs through ``net`` (its DDP wrapper) when given."""
    forward = net if net is not None else model

    def compute_loss() -> tuple[Tensor, dict[str, Tensor]]:
        out = forward(x)
        task = criterion(out, y)
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


class _EpochStats:
    """Running sums for one epoch's metrics."""

    def __init__(self) -> None:
        self.n = 0
        self.loss_sum = 0.0
        self.task_sum = 0.0
        self.correct = 0
        self.acc_n = 0
        self.skipped = 0
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, loss: float, record: Mapping[str, Any], logs: Mapping[str, float], y: Tensor) -> None:
        n = int(y.shape[0]) if y.dim() > 0 else 1
        self.n += n
        self.loss_sum += loss * n
        parts = record.get("parts")
        if parts is not None:
            self.task_sum += float(parts["task"]) * n
            for name, value in parts.items():
                if name != "task":
                    self._mean_add(f"term/{name}", float(value))
            out = record["outputs"]
            if out.dim() == 2:
                target = y.argmax(dim=1) if y.dim() == 2 else y
                self.correct += int((out.argmax(dim=1) == target).sum())
                self.acc_n += n
        for name, value in logs.items():
            self._mean_add(name, value)

    def _mean_add(self, key: str, value: float) -> None:
        self.sums[key] += value
        self.counts[key] += 1

    @classmethod
    def combine(cls, parts: Sequence[_EpochStats]) -> _EpochStats:
        """The stats of all processes' batches together (``skipped`` steps are global: the same on each)."""
        out = cls()
        for part in parts:
            out.n += part.n
            out.loss_sum += part.loss_sum
            out.task_sum += part.task_sum
            out.correct += part.correct
            out.acc_n += part.acc_n
            for key, value in part.sums.items():
                out.sums[key] += value
                out.counts[key] += part.counts[key]
        out.skipped = max(part.skipped for part in parts)
        return out

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "train_loss": self.loss_sum / self.n if self.n else None,
            "train_acc": 100.0 * self.correct / self.acc_n if self.acc_n else None,
            "task_loss": self.task_sum / self.n if self.n else None,
        }
        out.update({k: self.sums[k] / self.counts[k] for k in sorted(self.sums)})
        out["skipped_steps"] = self.skipped
        return out


# ------------------------------------------------------------------------------------------- fit


def _restore(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    terms: Sequence[tuple[str, Any]],
    outside: Sequence[Tensor],
    generators: Sequence[torch.Generator],
    cfg: TrainConfig,
) -> tuple[list[dict], int]:
    ckpt = load_checkpoint(path, map_location="cpu")
    state_file = ckpt.path / "train_state.pt"
    if ckpt.train_state is None or not isinstance(ckpt.meta.get("epoch"), int):
        raise CheckpointError(f"{ckpt.path} is a weights-only checkpoint ({state_file} or the epoch in "
                              "meta.json is missing); it cannot be resumed")
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint file {ckpt.path / 'model.safetensors'} does not fit the model: {e}") from e
    ts = ckpt.train_state
    extra = ts.get("extra") or {}
    try:
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        saved_terms = extra.get("loss_terms", [])
        if len(saved_terms) != len(terms):
            raise ValueError(f"it holds {len(saved_terms)} loss term(s), this run has {len(terms)}")
        for (_, term), sd in zip(terms, saved_terms, strict=True):
            if isinstance(term, nn.Module) and sd is not None:
                term.load_state_dict(sd)
        saved_outside = extra.get("outside_params", [])
        if len(saved_outside) != len(outside):
            raise ValueError(f"it holds {len(saved_outside)} extra parameter(s), this run has {len(outside)}")
        with torch.no_grad():
            for p, v in zip(outside, saved_outside, strict=True):
                p.copy_(v)
        by_rank = extra.get("rng_by_rank")
        same_world = isinstance(by_rank, list) and len(by_rank) == distributed.world_size()
        _set_rng_state(by_rank[distributed.rank()] if same_world else extra["rng"])
        saved_gens = extra.get("loader_generators", [])
        if len(saved_gens) == len(generators):
            for g, s in zip(generators, saved_gens, strict=True):
                g.set_state(s)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {state_file} does not match this run "
                              f"(model/loss terms/param_groups/optimizer must be the same): {e}") from e
    saved_cfg = ckpt.meta.get("train_config")
    if isinstance(saved_cfg, dict):
        diff = sorted(k for k, v in cfg.to_dict().items() if k in saved_cfg and saved_cfg[k] != v)
        if diff and distributed.is_main_process():
            logger.warning("resuming %s with a different TrainConfig (%s); the schedule continues from the "
                           "saved step with the new settings", path, ", ".join(diff))
    history = list(ckpt.meta.get("history", []))
    if distributed.is_main_process():
        logger.info("resumed from %s after epoch %d/%d", ckpt.path, ckpt.meta["epoch"] + 1, cfg.epochs)
    return history, ckpt.meta["epoch"] + 1


def fit(
    model: nn.Module,
    train_loader: Iterable,
    cfg: TrainConfig,
    *,
    val_loader: Iterable | None = None,
    loss_terms: Sequence[LossTerm] = (),
    step_strategy: StepStrategy | None = None,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int | None = None,
    meta: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callable[[int, dict, nn.Module], Any]] = (),
    progress: bool = True,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train ``model`` with cross-entropy (+ ``loss_terms``) for ``cfg.epochs`` epochs.

    Each epoch: train, evaluate on ``val_loader``, call ``callbacks``, append the metrics as one JSON
    line to ``run_dir/metrics.jsonl`` and save ``run_dir/checkpoint`` (model weights, optimizer,
    scheduler, loss-term state, RNG states). ``resume=True`` continues from that checkpoint (starting
    fresh, with a warning, when there is none); a fresh run truncates ``metrics.jsonl``. With ``seed``,
    everything is seeded once and the DataLoader's shuffling generator is re-seeded with
    ``seed + epoch`` at each epoch start, so data order is a function of (seed, epoch) and a resumed
    run matches an uninterrupted one bit for bit on deterministic hardware. ``meta`` (JSON) is stored
    in every checkpoint's ``meta.json`` (e.g. model and data names). With ``device`` the model and
    module loss terms are moved there; otherwise the model's device is used.

    Metrics per epoch (0-based ``epoch``): ``train_loss`` (total incl. terms, sample-weighted),
    ``task_loss``, ``train_acc`` (percent), ``val_loss``/``val_acc`` (``None`` without
    ``val_loader``), ``lr`` (first param group, at the epoch start), ``term/<name>`` (mean of each
    active term), the means of ``StepContext.log`` values (``grad_norm`` for :class:`StandardStep`),
    ``skipped_steps`` and ``time_s``; NaN/Inf are written as ``null``. Weights (or loss-term state)
    that become NaN/Inf raise :class:`NonFiniteError` before anything is checkpointed, whatever
    ``cfg.nonfinite`` says.

    Distributed (a process group of W > 1 processes, e.g. under ``torchrun``): the model is trained
    through DDP, process ``r`` is seeded with ``seed + r``, ``train_loader`` should shard the data
    (``DistributedSampler``; its ``set_epoch`` is called every epoch) and the metrics cover all
    processes. Only rank 0 logs, evaluates, writes files and checkpoints; on resume every process
    loads the checkpoint. See :mod:`qready.train.distributed`.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig; got {type(cfg).__name__}")
    if resume and run_dir is None:
        raise ValueError("resume=True needs a run_dir holding the checkpoint")
    user_meta = dict(meta or {})
    clash = sorted(RESERVED_META & user_meta.keys())
    if clash:
        raise ValueError(f"meta keys {clash} are reserved for the training loop")
    try:
        json.dumps(user_meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serializable: {e}") from e
    strategy = step_strategy if step_strategy is not None else StandardStep()
    if not callable(getattr(strategy, "step", None)):
        raise TypeError(f"step_strategy must have a step(ctx) method; got {type(strategy).__name__}")

    main = distributed.is_main_process()
    if seed is not None:
        seed_everything(seed + distributed.rank())
    dev = _resolve_device(model, device)
    if device is not None:
        model.to(dev)
    terms = _named_terms(loss_terms)
    for _, term in terms:
        if isinstance(term, nn.Module):
            term.to(dev)
    groups, outside = _build_param_groups(model, terms, param_groups)
    optimizer = build_optimizer(groups, cfg)
    steps_per_epoch = _steps_per_epoch(train_loader)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    generators = _loader_generators(train_loader)

    run_path = Path(run_dir) if run_dir is not None else None
    ckpt_path = run_path / CHECKPOINT_DIR if run_path is not None else None
    history: list[dict] = []
    start = 0
    if run_path is not None and ckpt_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
        if resume and checkpoint_exists(ckpt_path):
            history, start = _restore(ckpt_path, model, optimizer, scheduler, terms, outside, generators, cfg)
        elif resume and main:
            logger.warning("resume=True but there is no checkpoint at %s; starting from scratch", ckpt_path)
        if main:
            _write_lines(run_path / METRICS_FILE, history)

    net = distributed.maybe_wrap_ddp(model, dev)
    sync: distributed.GradSync | None = None
    if net is not model:
        if main and not distributed.is_sharded(train_loader):
            logger.warning("distributed training with a train_loader that has no DistributedSampler: every "
                           "process trains on the same batches")
        term_tensors = [t for _, term in terms if isinstance(term, nn.Module) for t in term.state_dict().values()]
        distributed.broadcast_tensors([*term_tensors, *outside])
        term_params = [p for _, term in terms if isinstance(term, nn.Module) for p in term.parameters()]
        sync = distributed.GradSync(list({id(p): p for p in [*term_params, *outside]}.values()), net)
    was_training = model.training
    stopped = False
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            if seed is not None:
                for g in generators:
                    g.manual_seed(seed + epoch)
            distributed.set_epoch(train_loader, epoch)
            active = [(n, t) for n, t in terms if _is_active(t, epoch)]
            lr = float(optimizer.param_groups[0]["lr"])
            stats = _EpochStats()
            model.train()
            with _progress(progress and main) as bar:
                task_id = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, loss=math.nan)
                for i, batch in enumerate(train_loader):
                    x, y = batch_to_device(batch, dev)
                    record: dict[str, Any] = {}
                    ctx = StepContext(
                        model=model,
                        batch=(x, y),
                        optimizer=optimizer,
                        compute_loss=_make_compute_loss(
                            model, x, y, criterion, active, record, net if net is not model else None
                        ),
                        epoch=epoch,
                        step=epoch * steps_per_epoch + i,
                        grad_clip=cfg.grad_clip,
                        net=net,
                    )
                    value = math.nan
                    try:
                        value = float(strategy.step(ctx))
                        if not math.isfinite(value):
                            raise NonFiniteError(f"the step strategy returned loss {value} "
                                                 "(its update was already applied)")
                    except NonFiniteError as e:
                        optimizer.zero_grad(set_to_none=True)
                        where = f"epoch {epoch + 1}/{cfg.epochs}, step {i + 1}/{steps_per_epoch}"
                        if cfg.nonfinite == "stop":
                            last = f"; the last checkpoint ({ckpt_path}) is untouched" if ckpt_path else ""
                            raise NonFiniteError(
                                f"{where}: {e}; stopping because TrainConfig.nonfinite='stop'{last}"
                            ) from e
                        if main:
                            logger.warning("%s: %s; skipping this update (TrainConfig.nonfinite='skip')", where, e)
                        stats.skipped += 1
                    else:
                        stats.add(value, record, ctx.logs, y)
                    with warnings.catch_warnings():
                        # a skipped first update makes torch warn about step order; harmless here
                        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                        scheduler.step()
                    bar.update(task_id, advance=1, loss=value)

            if net is not model:
                stats = _EpochStats.combine(distributed.gather_objects(stats))
            val = evaluate(model, val_loader, device=dev) if val_loader is not None and main else None
            val = distributed.broadcast_object(val)
            _check_weights(model, terms, outside, epoch, cfg, ckpt_path, dev)
            metrics: dict[str, Any] = {"epoch": epoch, **stats.metrics()}
            metrics["val_loss"] = val["loss"] if val is not None else None
            metrics["val_acc"] = val["accuracy"] if val is not None else None
            metrics["lr"] = lr
            metrics["time_s"] = time.perf_counter() - t0
            if stats.skipped and main:
                logger.warning("epoch %d/%d: %d of %d steps skipped for non-finite loss/gradients",
                               epoch + 1, cfg.epochs, stats.skipped, steps_per_epoch)
            for cb in callbacks:
                try:
                    cb(epoch, metrics, model)
                except StopTraining:
                    stopped = True
            stopped = not distributed.all_agree(not stopped, dev)
            clean = _jsonable(metrics)
            history.append(clean)
            if main:
                logger.info("%s", _format_epoch(clean, cfg.epochs))
            rng_by_rank = distributed.gather_objects(_rng_state()) if net is not model else None
            if run_path is not None and ckpt_path is not None and main:
                with open(run_path / METRICS_FILE, "a") as f:
                    f.write(json.dumps(clean, allow_nan=False) + "\n")
                save_checkpoint(
                    ckpt_path,
                    model,
                    meta={
                        **user_meta,
                        "epoch": epoch,
                        "metrics": clean,
                        "history": history,
                        "train_config": cfg.to_dict(),
                        "loss_terms": [n for n, _ in terms],
                        "step_strategy": type(strategy).__name__,
                    },
                    optimizer=optimizer,
                    scheduler=scheduler,
                    extra_state={
                        "rng": _rng_state(),
                        "loader_generators": [g.get_state() for g in generators],
                        "loss_terms": [t.state_dict() if isinstance(t, nn.Module) else None for _, t in terms],
                        "outside_params": [p.detach().to("cpu", copy=True) for p in outside],
                        **({"rng_by_rank": rng_by_rank} if rng_by_rank is not None else {}),
                    },
                )
            distributed.barrier()
            if stopped:
                if main:
                    logger.info("training stopped by a callback after epoch %d/%d", epoch + 1, cfg.epochs)
                break
    finally:
        model.train(was_training)
        if sync is not None:
            sync.remove()
    return TrainResult(
        history=history,
        final=dict(history[-1]) if history else {},
        model=model,
        run_dir=run_path,
        stopped_early=stopped,
    )


def _check_weights(
    model: nn.Module,
    terms: Sequence[tuple[str, Any]],
    outside: Sequence[Tensor],
    epoch: int,
    cfg: TrainConfig,
    ckpt_path: Path | None,
    device: torch.device,
) -> None:
    """Raise :class:`NonFiniteError` (nothing is checkpointed) when any trained tensor is NaN/Inf (on any
    process, when distributed)."""
    problem: str | None = None
    try:
        check_finite(model)
    except ValueError as e:
        problem = str(e)
    for name, term in terms:
        if problem is None and isinstance(term, nn.Module):
            bad = first_nonfinite(term.state_dict().items())
            problem = f"loss term {name!r}: {bad}" if bad else None
    if problem is None:
        bad = first_nonfinite((f"param_groups tensor {i}", p) for i, p in enumerate(outside))
        problem = bad
    if not distributed.all_agree(problem is None, device) and problem is None:
        problem = "non-finite values on another process"
    if problem is not None:
        last = f"; the last checkpoint ({ckpt_path}) is untouched" if ckpt_path else ""
        raise NonFiniteError(f"epoch {epoch + 1}/{cfg.epochs}: training diverged, {problem}{last}")


def _format_epoch(m: Mapping[str, Any], epochs: int) -> str:
    def num(key: str, fmt: str) -> str:
        v = m.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "n/a"

    parts = [f"epoch {m['epoch'] + 1}/{epochs}", f"train_loss={num('train_loss', '.4f')}",
             f"train_acc={num('train_acc', '.2f')}%"]
    if m.get("val_acc") is not None:
        parts += [f"val_loss={num('val_loss', '.4f')}", f"val_acc={num('val_acc', '.2f')}%"]
    parts += [f"lr={num('lr', '.3g')}", f"({num('time_s', '.1f')}s)"]
    if m.get("skipped_steps"):
        parts.append(f"skipped={m['skipped_steps']}")
    return " ".join(parts)
