"""The training loop every qready method uses.

Extension points:

* **Objective** (:class:`~qready.train.objective.Objective`): the task loss, ``objective(model, inputs,
  targets) -> (loss, outputs)``; cross-entropy by default, :class:`~qready.train.distill.Distill` for
  label-free fine-tuning (``TrainConfig.objective`` or the ``objective`` argument).
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

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..batching import inputs_size, move_inputs, split_batch
from ..evaluate.fidelity import fidelity
from ..evaluate.metrics import evaluate
from . import distributed
from .checkpoint import checkpoint_exists, save_checkpoint
from .config import TrainConfig, build_optimizer, build_scheduler
from .groups import build_param_groups
from .guards import NonFiniteError, check_finite, first_nonfinite
from .objective import Objective, build_objective
from .state import loader_generators, restore, rng_state, seed_everything
from .stats import EpochStats, format_epoch, jsonable, progress_bar, write_lines
from .step import (
    LossTerm,
    StandardStep,
    StepContext,
    StepStrategy,
    StopTraining,
    is_active,
    make_compute_loss,
    named_terms,
)

logger = logging.getLogger("qready.train")

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
RESERVED_META = frozenset(
    {"epoch", "metrics", "history", "train_config", "loss_terms", "step_strategy",
     "qready_version", "format_version", "files"}
)

__all__ = ["LossTerm", "StandardStep", "StepContext", "StepStrategy", "StopTraining", "TrainResult", "fit",
           "seed_everything"]


@dataclass
class TrainResult:
    """What :func:`fit` returns. ``history`` holds one metrics dict per epoch (resumed ones included)."""

    history: list[dict]
    final: dict
    model: nn.Module
    run_dir: Path | None = None
    stopped_early: bool = False


@dataclass
class _Run:
    """The state of one :func:`fit` call shared by its per-batch and end-of-epoch functions."""

    model: nn.Module
    net: nn.Module
    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    scheduler: Any
    strategy: StepStrategy
    objective: Objective
    terms: list[tuple[str, Any]]
    outside: list[Tensor]
    generators: list[torch.Generator]
    device: torch.device
    steps_per_epoch: int
    main: bool
    user_meta: dict[str, Any]
    run_path: Path | None
    ckpt_path: Path | None
    history: list[dict]

    @property
    def distributed(self) -> bool:
        return self.net is not self.model


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


def _check_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    user_meta = dict(meta or {})
    clash = sorted(RESERVED_META & user_meta.keys())
    if clash:
        raise ValueError(f"meta keys {clash} are reserved for the training loop")
    try:
        json.dumps(user_meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serializable: {e}") from e
    return user_meta


def fit(
    model: nn.Module,
    train_loader: Iterable,
    cfg: TrainConfig,
    *,
    val_loader: Iterable | None = None,
    loss_terms: Sequence[LossTerm] = (),
    objective: Objective | None = None,
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
    """Train ``model`` with its objective (+ ``loss_terms``) for ``cfg.epochs`` epochs.

    The objective is ``objective`` when given, else the one ``cfg.objective`` names: cross-entropy
    (labelled batches) or distillation from a frozen copy of ``model`` as passed in (any batch form,
    labels ignored). Batches take any form of :mod:`qready.batching`.

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
    ``task_loss``, ``train_acc`` (percent; labelled batches), ``val_loss``/``val_acc`` (``None`` without
    ``val_loader`` or labels), with a distillation objective ``val_kl``/``val_agreement`` (nats, percent:
    the drift of the model from its teacher on ``val_loader``), ``lr`` (first param group, at the epoch start), ``term/<name>`` (mean of each
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
    user_meta = _check_meta(meta)
    strategy = step_strategy if step_strategy is not None else StandardStep()
    if not callable(getattr(strategy, "step", None)):
        raise TypeError(f"step_strategy must have a step(ctx) method; got {type(strategy).__name__}")

    main = distributed.is_main_process()
    if seed is not None:
        seed_everything(seed + distributed.rank())
    dev = _resolve_device(model, device)
    if device is not None:
        model.to(dev)
    try:
        check_finite(model)  # every step would be skipped: refuse before the first one
    except ValueError as e:
        raise NonFiniteError(f"cannot train: {e}") from None
    objective = objective if objective is not None else build_objective(cfg, model)
    if not callable(objective):
        raise TypeError(f"objective must be callable (model, inputs, targets) -> (loss, outputs); got {objective!r}")
    terms = named_terms(loss_terms)
    for _, term in terms:
        if isinstance(term, nn.Module):
            term.to(dev)
    groups, outside = build_param_groups(model, terms, param_groups)
    optimizer = build_optimizer(groups, cfg)
    steps_per_epoch = _steps_per_epoch(train_loader)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    generators = loader_generators(train_loader)

    run_path = Path(run_dir) if run_dir is not None else None
    ckpt_path = run_path / CHECKPOINT_DIR if run_path is not None else None
    history: list[dict] = []
    start = 0
    if run_path is not None and ckpt_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
        if resume and checkpoint_exists(ckpt_path):
            history, start = restore(ckpt_path, model, optimizer, scheduler, terms, outside, generators, cfg)
        elif resume and main:
            logger.warning("resume=True but there is no checkpoint at %s; starting from scratch", ckpt_path)
        if main:
            write_lines(run_path / METRICS_FILE, history)

    net = distributed.maybe_wrap_ddp(model, dev)
    run = _Run(model=model, net=net, cfg=cfg, optimizer=optimizer, scheduler=scheduler, strategy=strategy,
               objective=objective, terms=terms,
               outside=outside, generators=generators, device=dev, steps_per_epoch=steps_per_epoch, main=main,
               user_meta=user_meta, run_path=run_path, ckpt_path=ckpt_path, history=history)
    sync = _setup_distributed(run, train_loader) if run.distributed else None
    was_training = model.training
    stopped = False
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            if seed is not None:
                for g in generators:
                    g.manual_seed(seed + epoch)
            distributed.set_epoch(train_loader, epoch)
            active = [(n, t) for n, t in terms if is_active(t, epoch)]
            lr = float(optimizer.param_groups[0]["lr"])
            stats = EpochStats()
            model.train()
            with progress_bar(progress and main) as bar:
                task_id = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, loss=math.nan)
                for i, batch in enumerate(train_loader):
                    value = _train_batch(run, batch, epoch, i, active, stats)
                    bar.update(task_id, advance=1, loss=value)
            stopped = _end_epoch(run, epoch, stats, lr, time.perf_counter() - t0, val_loader, callbacks)
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


def _setup_distributed(run: _Run, train_loader: Iterable) -> distributed.GradSync:
    """Same loss-term state and extra parameters on every process; their gradients averaged by hooks."""
    if run.main and not distributed.is_sharded(train_loader):
        logger.warning("distributed training with a train_loader that has no DistributedSampler: every "
                       "process trains on the same batches")
    modules = [term for _, term in run.terms if isinstance(term, nn.Module)]
    teacher = getattr(run.objective, "teacher", None)  # a distillation teacher: rank 0's copy everywhere
    if isinstance(teacher, nn.Module):
        modules.append(teacher.to(run.device))
    distributed.broadcast_tensors([*(t for m in modules for t in m.state_dict().values()), *run.outside])
    term_params = [p for _, term in run.terms if isinstance(term, nn.Module) for p in term.parameters()]
    return distributed.GradSync(list({id(p): p for p in [*term_params, *run.outside]}.values()), run.net)


def _train_batch(run: _Run, batch: Any, epoch: int, i: int, active: Sequence[tuple[str, Any]],
                 stats: EpochStats) -> float:
    """One update (the step strategy), non-finite handling per ``TrainConfig.nonfinite``, the scheduler
    step and the statistics; returns the step's loss (NaN when skipped)."""
    cfg = run.cfg
    x, y = split_batch(batch)
    x, y = move_inputs(x, run.device), (y.to(run.device) if y is not None else None)
    record: dict[str, Any] = {}
    ctx = StepContext(
        model=run.model,
        batch=(x, y),
        optimizer=run.optimizer,
        compute_loss=make_compute_loss(run.model, x, y, run.objective, active, record,
                                       run.net if run.distributed else None),
        epoch=epoch,
        step=epoch * run.steps_per_epoch + i,
        grad_clip=cfg.grad_clip,
        net=run.net,
    )
    value = math.nan
    try:
        value = float(run.strategy.step(ctx))
        if not math.isfinite(value):
            raise NonFiniteError(f"the step strategy returned loss {value} (its update was already applied)")
    except NonFiniteError as e:
        run.optimizer.zero_grad(set_to_none=True)
        where = f"epoch {epoch + 1}/{cfg.epochs}, step {i + 1}/{run.steps_per_epoch}"
        if cfg.nonfinite == "stop":
            last = f"; the last checkpoint ({run.ckpt_path}) is untouched" if run.ckpt_path else ""
            raise NonFiniteError(f"{where}: {e}; stopping because TrainConfig.nonfinite='stop'{last}") from e
        if run.main:
            logger.warning("%s: %s; skipping this update (TrainConfig.nonfinite='skip')", where, e)
        stats.skipped += 1
    else:
        stats.add(value, record, ctx.logs, y, inputs_size(x))
    with warnings.catch_warnings():
        # a skipped first update makes torch warn about step order; harmless here
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        run.scheduler.step()
    return value


def _end_epoch(run: _Run, epoch: int, stats: EpochStats, lr: float, seconds: float,
               val_loader: Iterable | None, callbacks: Sequence[Callable[[int, dict, nn.Module], Any]]) -> bool:
    """Combine statistics over processes, validate, check weights, run callbacks, log, append the metrics
    line and checkpoint. Returns whether a callback stopped training (agreed over processes)."""
    cfg, model, main = run.cfg, run.model, run.main
    if run.distributed:
        stats = EpochStats.combine(distributed.gather_objects(stats))
    val = _validate(run, val_loader) if val_loader is not None and main else None
    val = distributed.broadcast_object(val)
    _check_weights(model, run.terms, run.outside, epoch, cfg, run.ckpt_path, run.device)
    metrics: dict[str, Any] = {"epoch": epoch, **stats.metrics()}
    metrics["val_loss"] = val["loss"] if val is not None else None
    metrics["val_acc"] = val["accuracy"] if val is not None else None
    if val is not None and "kl" in val:
        metrics["val_kl"], metrics["val_agreement"] = val["kl"], val["agreement"]
    metrics["lr"] = lr
    metrics["time_s"] = seconds
    if stats.skipped and main:
        logger.warning("epoch %d/%d: %d of %d steps skipped for non-finite loss/gradients",
                       epoch + 1, cfg.epochs, stats.skipped, run.steps_per_epoch)
    stopped = False
    for cb in callbacks:
        try:
            cb(epoch, metrics, model)
        except StopTraining:
            stopped = True
    stopped = not distributed.all_agree(not stopped, run.device)
    clean = jsonable(metrics)
    run.history.append(clean)
    if main:
        logger.info("%s", format_epoch(clean, cfg.epochs))
    rng_by_rank = distributed.gather_objects(rng_state()) if run.distributed else None
    if run.run_path is not None and run.ckpt_path is not None and main:
        with open(run.run_path / METRICS_FILE, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        _save(run, epoch, clean, rng_by_rank)
    distributed.barrier()
    return stopped


def _validate(run: _Run, val_loader: Iterable) -> dict[str, Any]:
    """Accuracy and loss on ``val_loader``; with a teacher (distillation), the fidelity to it instead
    (``kl``, ``agreement``; accuracy and loss only for labelled batches)."""
    teacher = getattr(run.objective, "teacher", None)
    if teacher is None:
        return evaluate(run.model, val_loader, device=run.device)
    return fidelity(teacher, run.model, val_loader)  # inputs follow each model's device


def _save(run: _Run, epoch: int, metrics: dict, rng_by_rank: list | None) -> None:
    """Checkpoint weights, optimizer, scheduler, loss-term state and every RNG state after ``epoch``."""
    assert run.ckpt_path is not None
    save_checkpoint(
        run.ckpt_path,
        run.model,
        meta={
            **run.user_meta,
            "epoch": epoch,
            "metrics": metrics,
            "history": run.history,
            "train_config": run.cfg.to_dict(),
            "loss_terms": [n for n, _ in run.terms],
            "step_strategy": type(run.strategy).__name__,
        },
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        extra_state={
            "rng": rng_state(),
            "loader_generators": [g.get_state() for g in run.generators],
            "loss_terms": [t.state_dict() if isinstance(t, nn.Module) else None for _, t in run.terms],
            "outside_params": [p.detach().to("cpu", copy=True) for p in run.outside],
            **({"rng_by_rank": rng_by_rank} if rng_by_rank is not None else {}),
        },
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
