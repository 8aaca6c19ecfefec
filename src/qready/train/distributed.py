"""Data-parallel training under ``torchrun``: process-group setup, DDP wrapping, and the few collectives
:func:`qready.train.fit` needs so that N processes train like one process on the N-times-larger batch.

How ``fit`` behaves when a process group with more than one process is initialised:

* **Model**: wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`maybe_wrap_ddp`)
  for the forward passes; the DDP reducer averages the model's gradients. Loss terms, callbacks,
  step strategies (``ctx.model``) and checkpoints see the unwrapped module, so state-dict keys have
  no ``module.`` prefix.
* **Loss-term and extra parameters** (learnable margins, temperatures, representatives,
  ``param_groups`` tensors outside the model) are *not* put inside DDP: a term that is inactive in
  some epoch would leave DDP waiting for gradients that never come. Instead :class:`GradSync` hooks
  average each such gradient over the processes as soon as it is accumulated (post-accumulate-grad
  hooks), in the same backward pass as DDP's own reduction, and skip it under
  :meth:`StepContext.no_sync <qready.train.StepContext.no_sync>` like DDP does.
* **Gradient penalties** (terms with ``needs_graph``, e.g. ``grad_l1``): the penalty of the global
  batch is ``‖∇_W L‖₁`` of the *average* gradient, not the average of the per-process norms, and DDP
  only averages ``.grad`` at the end of ``backward()``. :func:`global_gradients` therefore makes every
  gradient of a model parameter computed *inside* such a term (``torch.autograd.grad``) the
  differentiable mean over processes (:class:`AllReduceMean`, whose backward is again the mean), so the
  double backward gives exactly the single-process gradient. Activation gradients need no exchange
  (each sample's activation gradient only depends on its own loss).
* **Data**: the train loader must shard the data (:func:`qready.data.make_loaders` uses a
  :class:`~torch.utils.data.DistributedSampler` when distributed); ``fit`` calls ``set_epoch`` every
  epoch, so the data order is a function of the seed and the epoch.
* **Side effects**: only rank 0 logs, shows progress, evaluates on ``val_loader``, writes
  ``metrics.jsonl`` and checkpoints (the others wait at a barrier); epoch metrics are reduced over all
  processes and the validation result is broadcast, so callbacks on every rank see the same metrics.
  A NaN/Inf loss on any process makes every process skip (or stop) together.
* **BatchNorm** statistics stay per process, as in plain DDP (buffers are broadcast from rank 0 at each
  forward and checkpointed from rank 0).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

logger = logging.getLogger("qready.train")

BACKENDS: tuple[str, ...] = ("gloo", "nccl")


def is_distributed() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, and always when not distributed."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {value!r}") from None


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> torch.device | None:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1``.

    ``backend``: ``"nccl"`` or ``"gloo"``; ``None`` picks NCCL when CUDA is available, else gloo.
    Returns this process's device (``cuda:LOCAL_RANK``, made current, or ``cpu``), or ``None`` for a
    single process (nothing is initialised; the caller keeps its default device). Calling it again in an
    initialised process returns the device without re-initialising.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} or None; got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA; use backend='gloo' on CPU")
    local = _env_int("LOCAL_RANK", 0)
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def cleanup_distributed() -> None:
    """Leave the process group (no-op when none is initialised).

    DDP wrappers still alive hold the group through their reducers, and a process that destroys its
    group while a peer is still communicating can abort the peer; so collect garbage first and wait for
    every rank (best effort: a rank that already failed must not hang the others here)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    try:
        dist.barrier()
    except RuntimeError:
        pass
    dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def maybe_wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DDP when distributed (parameters and buffers broadcast from rank 0), else
    ``model`` itself. ``device`` is where the model lives (one CUDA device per process, or CPU)."""
    if not is_distributed():
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("distributed training needs a model with trainable parameters (DDP has nothing to sync)")
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_enabled(net: nn.Module) -> bool:
    """Whether gradients are being averaged now: distributed and not inside ``net.no_sync()``."""
    return is_distributed() and bool(getattr(net, "require_backward_grad_sync", True))


def no_sync(net: nn.Module) -> contextlib.AbstractContextManager:
    """``net.no_sync()`` for a DDP wrapper (local gradients only, accumulated and averaged at the next
    synchronised backward), a do-nothing context otherwise."""
    return net.no_sync() if isinstance(net, DistributedDataParallel) else contextlib.nullcontext()


def _flag_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_agree(flag: bool, device: torch.device) -> bool:
    """``flag`` AND-ed over all processes (``flag`` itself when not distributed)."""
    if not is_distributed():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=_flag_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() == 0.0)


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (``obj`` when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite each tensor in place with rank ``src``'s values (no-op when not distributed)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t.data, src=src)


class AllReduceMean(torch.autograd.Function):
    """``y = mean over processes of x`` (same shape on every process). Its backward is the same mean of
    the incoming gradients, written with this function again, so it can be differentiated twice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.detach().clone()
        dist.all_reduce(out)
        return out.div_(dist.get_world_size())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return AllReduceMean.apply(grad)


@contextlib.contextmanager
def global_gradients(net: nn.Module) -> Iterator[None]:
    """Inside this context every gradient of one of ``net``'s parameters (``torch.autograd.grad``, also
    with ``create_graph=True``) is the differentiable mean over processes, i.e. the gradient of the
    global-batch loss. Used by ``fit`` around ``needs_graph`` loss terms; does nothing when gradients are
    not being synchronised (single process, or inside ``no_sync``)."""
    if not sync_enabled(net):
        yield
        return
    handles = [p.register_hook(AllReduceMean.apply) for p in unwrap(net).parameters() if p.requires_grad]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class GradSync:
    """Average the gradients of ``params`` (tensors DDP does not manage) over the processes right after
    each backward accumulates them, unless ``net`` is inside ``no_sync()``. Call :meth:`remove` when done.

    With gradient accumulation (several backward passes before a step) the already averaged part is
    identical on every process, so averaging the sum again averages only the new part.
    """

    def __init__(self, params: Sequence[Tensor], net: nn.Module) -> None:
        self.net = net
        self.handles = [p.register_post_accumulate_grad_hook(self._average) for p in params if p.requires_grad]

    def _average(self, p: Tensor) -> None:
        if p.grad is not None and sync_enabled(self.net):
            dist.all_reduce(p.grad)
            p.grad.div_(dist.get_world_size())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def set_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader's sampler(s) that have it (e.g. ``DistributedSampler``)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    seen: list[Any] = []
    for obj in (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        if callable(getattr(obj, "set_epoch", None)) and all(obj is not s for s in seen):
            obj.set_epoch(epoch)
            seen.append(obj)


def is_sharded(loader: Any) -> bool:
    """Whether the loader draws from a ``DistributedSampler`` (each process gets its own part of the data)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    return any(isinstance(obj, DistributedSampler) for obj in candidates)
