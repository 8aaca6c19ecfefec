"""Per-epoch statistics, their JSON form, the one-line epoch summary and the progress bar."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor


def jsonable(value: Any) -> Any:
    """Metrics as plain JSON: 1-element tensors/numpy scalars -> float, NaN/Inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def write_lines(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    os.replace(tmp, path)


def progress_bar(enabled: bool) -> Progress:
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


class EpochStats:
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

    def add(self, loss: float, record: Mapping[str, Any], logs: Mapping[str, float], y: Tensor | None,
            n: int) -> None:
        """One step of ``n`` samples; ``y`` is ``None`` for an unlabeled batch (no accuracy)."""
        self.n += n
        self.loss_sum += loss * n
        parts = record.get("parts")
        if parts is not None:
            self.task_sum += float(parts["task"]) * n
            for name, value in parts.items():
                if name != "task":
                    self._mean_add(f"term/{name}", float(value))
            out = record["outputs"]
            if y is not None and out.dim() == 2:
                target = y.argmax(dim=1) if y.dim() == 2 else y
                self.correct += int((out.argmax(dim=1) == target).sum())
                self.acc_n += n
        for name, value in logs.items():
            self._mean_add(name, value)

    def _mean_add(self, key: str, value: float) -> None:
        self.sums[key] += value
        self.counts[key] += 1

    @classmethod
    def combine(cls, parts: Sequence[EpochStats]) -> EpochStats:
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


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``, ``4000`` -> ``"1h06m"``, ``9`` -> ``"9s"``."""
    seconds = max(int(round(seconds)), 0)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_epoch(m: Mapping[str, Any], epochs: int) -> str:
    """One line per epoch: losses, accuracies, learning rate, its duration and the ETA of the run
    (this epoch's duration times the epochs left)."""
    def num(key: str, fmt: str) -> str:
        v = m.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "n/a"

    parts = [f"epoch {m['epoch'] + 1}/{epochs}", f"train_loss={num('train_loss', '.4f')}",
             f"train_acc={num('train_acc', '.2f')}%"]
    if m.get("val_acc") is not None:
        parts += [f"val_loss={num('val_loss', '.4f')}", f"val_acc={num('val_acc', '.2f')}%"]
    parts += [f"lr={num('lr', '.3g')}", f"({num('time_s', '.1f')}s)"]
    left = epochs - m["epoch"] - 1
    if left > 0 and isinstance(m.get("time_s"), (int, float)):
        parts.append(f"ETA {format_duration(left * m['time_s'])}")
    if m.get("skipped_steps"):
        parts.append(f"skipped={m['skipped_steps']}")
    return " ".join(parts)
