"""What makes a run resumable bit for bit: seeding, the RNG states of python/numpy/torch and of the
DataLoader's shuffling generators, and restoring all of it (plus optimizer, scheduler and loss-term
state) from a checkpoint."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint
from .config import TrainConfig

logger = logging.getLogger("qready.train")


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that decide a DataLoader's shuffling (deduplicated)."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: Mapping[str, Any]) -> None:
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


def restore(
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
        set_rng_state(by_rank[distributed.rank()] if same_world else extra["rng"])
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
