"""Checkpoints: a directory holding ``model.safetensors``, ``meta.json`` and optionally ``train_state.pt``.

* ``model.safetensors`` -- the model's ``state_dict`` (every tensor copied to a contiguous CPU tensor,
  so tied/shared and non-contiguous tensors are fine).
* ``meta.json`` -- the caller's ``meta`` plus ``qready_version``, ``format_version`` and the size and
  sha256 of the other files (checked on load, so truncation and bit rot are both detected).
* ``train_state.pt`` -- optimizer/scheduler state and ``extra_state`` (RNG states, ...), written with
  ``torch.save`` and only ever read with ``torch.load(..., weights_only=True)``.

Writes are atomic: everything goes into a temporary sibling directory that is swapped in only once
complete; the previous checkpoint stays in place until then. One writer per path at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .guards import first_nonfinite

logger = logging.getLogger("qready.train")

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the offending file or tensor."""


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``train_state`` is ``None`` for weights-only checkpoints."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    train_state: dict[str, Any] | None
    path: Path

    @property
    def epoch(self) -> int | None:
        """``meta["epoch"]`` when present (the 0-based index of the last completed epoch)."""
        return self.meta.get("epoch")


def _qready_version() -> str:
    try:
        import qready

        version = getattr(qready, "__version__", None)
        if version:
            return str(version)
        from importlib.metadata import version as dist_version

        return dist_version("qready")
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


def _backup_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _resolve(path: str | os.PathLike) -> Path:
    """``path``, or its backup when a save was interrupted between the two renames of the swap."""
    path = Path(path)
    if not path.exists() and _backup_path(path).is_dir():
        logger.warning("checkpoint %s is missing; using the complete previous one at %s",
                       path, _backup_path(path))
        return _backup_path(path)
    return path


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether a checkpoint directory (or the backup left by an interrupted swap) exists at ``path``."""
    return (_resolve(path) / META_FILE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"model.state_dict() entry {key!r} is a {type(value).__name__}, not a tensor; "
                f"{MODEL_FILE} can only hold tensors"
            )
        # A fresh contiguous copy per entry: no shared storage (tied weights) and no strides for
        # safetensors to reject, and later training steps cannot change what is being written.
        out[key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    meta: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint directory at ``path`` and return it.

    ``meta`` must be JSON-serializable. ``train_state.pt`` is written only when ``optimizer``,
    ``scheduler`` or ``extra_state`` is given; ``extra_state`` may hold tensors, numbers, strings and
    nested lists/dicts of them (whatever ``torch.load(weights_only=True)`` accepts). Raises
    :class:`CheckpointError` naming the parameter/buffer when the model holds NaN/Inf; nothing is
    written then.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} exists and is not a directory")
    state = _cpu_state_dict(model)
    bad = first_nonfinite(state.items())
    if bad is not None:
        raise CheckpointError(f"refusing to save a checkpoint of a model with non-finite weights: {bad}")
    meta_out = dict(meta)
    meta_out["qready_version"] = _qready_version()
    meta_out["format_version"] = FORMAT_VERSION
    try:
        json.dumps(meta_out, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint meta is not JSON-serializable (for {META_FILE}): {e}") from e

    train_state: dict[str, Any] | None = None
    if optimizer is not None or scheduler is not None or extra_state is not None:
        train_state = {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra_state,
        }

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        files = [MODEL_FILE]
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
            files.append(STATE_FILE)
        meta_out["files"] = {
            name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files
        }
        (tmp / META_FILE).write_text(json.dumps(meta_out, indent=2, allow_nan=False) + "\n")
        for name in [*files, META_FILE]:
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        # Swap: the old checkpoint is moved aside (never deleted) before the new one takes its
        # name; load_checkpoint falls back to the backup if we die between the two renames.
        backup = _backup_path(path)
        if path.exists():
            if backup.exists():
                shutil.rmtree(backup)
            os.replace(path, backup)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(_backup_path(path), ignore_errors=True)
    return path


def _read_meta(root: Path) -> dict[str, Any]:
    meta_path = root / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {meta_path} is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {meta_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint file {meta_path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def _verify(root: Path, name: str, meta: dict[str, Any]) -> None:
    file = root / name
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    info = meta.get("files", {}).get(name) if isinstance(meta.get("files"), dict) else None
    if not isinstance(info, dict):
        return  # written by something else: nothing to compare with
    size = file.stat().st_size
    if "size" in info and size != info["size"]:
        raise CheckpointError(
            f"checkpoint file {file} is truncated or corrupted: {size} bytes, expected {info['size']}"
        )
    if "sha256" in info and _sha256(file) != info["sha256"]:
        raise CheckpointError(f"checkpoint file {file} is corrupted: sha256 does not match {META_FILE}")


def _read_state_dict(root: Path, meta: dict[str, Any], map_location: str, verify: bool) -> dict:
    if verify:
        _verify(root, MODEL_FILE, meta)
    file = root / MODEL_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    try:
        return load_file(str(file), device=map_location)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {file} cannot be read as safetensors: {e}") from e


def _root(path: str | os.PathLike) -> Path:
    root = _resolve(path)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{Path(path)} is a file, not a checkpoint directory (give the directory written by "
                              "`qready train` or `qready run`, e.g. RUN/checkpoint or RUN/compressed)")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {Path(path)} does not exist")
    return root


def load_checkpoint(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True
) -> Checkpoint:
    """Read a checkpoint directory. Any unreadable part raises :class:`CheckpointError` naming the file.

    ``verify`` checks file sizes and sha256 sums recorded in ``meta.json``.
    """
    root = _root(path)
    location = str(map_location)
    meta = _read_meta(root)
    state_dict = _read_state_dict(root, meta, location, verify)
    train_state = None
    state_file = root / STATE_FILE
    if state_file.exists():
        if verify:
            _verify(root, STATE_FILE, meta)
        try:
            train_state = torch.load(state_file, map_location=location, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint file {state_file} cannot be loaded: {e}") from e
        if not isinstance(train_state, dict):
            raise CheckpointError(f"checkpoint file {state_file} does not hold a dict")
    return Checkpoint(state_dict=state_dict, meta=meta, train_state=train_state, path=root)


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of the checkpoint at ``path`` alone (neither weights nor training state are read,
    so a damaged ``train_state.pt`` does not stop commands that need only the weights)."""
    return _read_meta(_root(path))


def load_model_weights(
    path: str | os.PathLike, model: nn.Module, strict: bool = True, *, verify: bool = True
) -> Any:
    """Load ``model.safetensors`` of the checkpoint at ``path`` into ``model``.

    Returns ``model.load_state_dict``'s missing/unexpected keys; a mismatch under ``strict`` raises
    :class:`CheckpointError`.
    """
    root = _root(path)
    meta = _read_meta(root)
    state_dict = _read_state_dict(root, meta, "cpu", verify)
    try:
        return model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint file {root / MODEL_FILE} does not fit the model: {e}") from e
