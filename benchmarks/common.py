"""Shared pieces of the benchmarks: the small real-data setups, training, PTQ evaluation, timing and
writing results (JSON + markdown) to ``benchmarks/results/``."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qready.data import load_dataset, make_loaders
from qready.evaluate import sweep
from qready.evaluate.report import markdown_table  # noqa: F401  (re-exported for the benchmarks)
from qready.models import create_model
from qready.quant import QuantSpec
from qready.train import TrainConfig, fit, seed_everything

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Setup:
    """A small real-data task: dataset, model and the training schedule that fits it."""

    dataset: str
    model: str
    epochs: int
    lr: float
    batch_size: int = 64
    data_options: dict = field(default_factory=dict)
    model_args: dict = field(default_factory=dict)


SETUPS: dict[str, Setup] = {
    "digits": Setup("digits", "dwcnn", epochs=15, lr=0.01),
    "mnist1d": Setup("mnist1d", "cnn1d", epochs=20, lr=0.005, batch_size=128, data_options={"num_samples": 4000}),
}


def loaders(setup: Setup, seed: int):
    """``(splits, train_loader, test_loader)`` with seeded, fixed splits and data order."""
    splits = load_dataset(setup.dataset, seed=seed, **setup.data_options)
    train_loader, test_loader = make_loaders(splits, setup.batch_size, seed=seed)
    return splits, train_loader, test_loader


def new_model(setup: Setup, splits, seed: int) -> nn.Module:
    """A freshly initialised model for ``setup`` (seeded)."""
    seed_everything(seed)
    return create_model(setup.model, num_classes=splits.num_classes, in_channels=splits.input_shape[0],
                        **setup.model_args)


def train(setup: Setup, seed: int, *, model: nn.Module | None = None, loss_terms: Sequence = (),
          epochs: int | None = None, lr: float | None = None, **fit_kwargs) -> tuple[nn.Module, dict]:
    """Train (a new model, or ``model``) on ``setup`` with optional loss terms; returns ``(model, final)``."""
    splits, train_loader, test_loader = loaders(setup, seed)
    model = model if model is not None else new_model(setup, splits, seed)
    cfg = TrainConfig(epochs=epochs or setup.epochs, lr=lr or setup.lr, batch_size=setup.batch_size,
                      optimizer="adam", schedule="cosine")
    result = fit(model, train_loader, cfg, val_loader=test_loader, loss_terms=list(loss_terms), seed=seed,
                 progress=False, **fit_kwargs)
    return result.model, result.final


def ptq_accuracies(model: nn.Module, setup: Setup, seed: int, bits: Sequence, ranges: Sequence[str] = ("minmax", "mse"),
                   granularity: str = "channel") -> dict[str, float]:
    """``{"FP": acc, "W4/minmax": acc, "W4A8/mse": acc, ...}`` from PTQ sweeps on the test split."""
    _, train_loader, test_loader = loaders(setup, seed)
    out: dict[str, float] = {}
    for rng in ranges:
        rows = sweep(model, test_loader, bits=bits, spec=QuantSpec(bits=8, granularity=granularity, range=rng),
                     calib=train_loader, include_fp=not out)
        for row in rows:
            out["FP" if row["label"] == "FP" else f"{row['label']}/{rng}"] = row["accuracy"]
    return out


def time_per_call(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each step, timed round-robin after a warm-up (so a busy machine
    slows every variant alike and the ratios stay fair)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def mean_std(values: Sequence[float]) -> str:
    """``"mean ± std"`` with two decimals (std over seeds; 0 for one value)."""
    values = list(values)
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def save_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md``; returns both paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps({"meta": meta, **payload}, indent=2))
    md_path.write_text(markdown)
    return json_path, md_path
