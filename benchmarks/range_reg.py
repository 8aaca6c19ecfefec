"""R² range regularization: PTQ accuracy with and without ``linf`` / ``margin`` / ``soft_min_max``, and
the cost of one training step.

Quality: digits (dwcnn) and MNIST-1D (cnn1d), each trained from scratch per seed with no regularizer
and with each penalty at every λ of ``--lambdas``; then per-channel weight-only PTQ at W8/W4/W3/W2 with
min-max and MSE ranges. Cells are test accuracy (%) as mean ± std over seeds, plus the mean over layers
of max|w| and of max − min after training.
Cost: median time of one SGD step (forward + backward + step) on ResNet-20, batch 32 of random
3x32x32 inputs, CPU, with each regularizer relative to the plain step. The configurations are timed in
interleaved rounds so that load from other processes affects all of them alike.

    python -m benchmarks.range_reg [--quick]

Everything runs on one intra-op thread: much faster for these tiny models, and far less noisy when
the cores are shared with other processes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from benchmarks.common import (
    SETUPS,
    interleaved_medians,
    loaders,
    markdown_table,
    mean_std,
    new_model,
    ptq_accuracies,
    save_results,
    train,
)
from qready.models import create_model
from qready.regularizers import build
from qready.regularizers.stats import layer_stats

METHODS = ("linf", "margin", "soft_min_max")
BITS = (8, 4, 3, 2)
RANGES = ("minmax", "mse")
CELLS = ["FP"] + [f"W{b}/{r}" for r in RANGES for b in BITS]


def config_label(method: str, lam: float | None) -> str:
    return "none" if method == "none" else f"{method} λ={lam:g}"


def train_and_measure(setup_name: str, seed: int, method: str, lam: float | None, epochs: int | None) -> dict:
    """Train one model, sweep PTQ and return ``{cell: accuracy, "max_abs": ..., "range": ...}``."""
    setup = SETUPS[setup_name]
    splits, _, _ = loaders(setup, seed)
    model = new_model(setup, splits, seed)
    terms = [] if method == "none" else [build(method, model, weight=lam)]
    model, _ = train(setup, seed, model=model, loss_terms=terms, epochs=epochs)
    out = ptq_accuracies(model, setup, seed, BITS, RANGES)
    stats = layer_stats(model)
    out["max_abs"] = statistics.mean(s["max_abs"] for s in stats)
    out["range"] = statistics.mean(s["range"] for s in stats)
    return out


def quality(setups: Sequence[str], seeds: Sequence[int], lambdas: Sequence[float], epochs: int | None) -> dict:
    """``{setup: {config label: {cell: [value per seed]}}}``."""
    configs = [("none", None)] + [(m, lam) for lam in lambdas for m in METHODS]
    results: dict = {}
    for setup_name in setups:
        per_config: dict = {config_label(m, lam): {} for m, lam in configs}
        for seed in seeds:
            for method, lam in configs:
                start = time.perf_counter()
                measured = train_and_measure(setup_name, seed, method, lam, epochs)
                for cell, value in measured.items():
                    per_config[config_label(method, lam)].setdefault(cell, []).append(value)
                print(f"{setup_name} seed {seed} {config_label(method, lam)}: W2/mse {measured['W2/mse']:.2f} "
                      f"max|w| {measured['max_abs']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        results[setup_name] = per_config
    return results


def _sgd_step(model: nn.Module, reg: nn.Module | None, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    params = list(model.parameters()) + (list(reg.parameters()) if reg is not None else [])
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        if reg is not None:
            loss = loss + reg(model)
        loss.backward()
        opt.step()

    return step


def cost(repeats: int) -> dict:
    """Median step time of each configuration (seconds) and its ratio to the plain step."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    steps: dict[str, Callable[[], None]] = {}
    for name in ("plain", *METHODS):
        model = create_model("resnet20", num_classes=10)
        steps[name] = _sgd_step(model, None if name == "plain" else build(name, model, weight=0.01), x, y)
    medians = interleaved_medians(steps, repeats)
    return {name: {"median_s": m, "ratio": m / medians["plain"]} for name, m in medians.items()}


def markdown(results: dict, costs: dict, settings: dict) -> str:
    parts = ["# R² range regularization\n",
             f"Settings: {settings}. Accuracy (%) on the test split, mean ± std over seeds; per-channel "
             "symmetric weight-only PTQ; max abs(w) and max − min are means over layers after training.\n"]
    for setup_name, per_config in results.items():
        lines = [[label] + [mean_std(cells[c]) for c in CELLS]
                 + [f"{statistics.mean(cells['max_abs']):.3f}", f"{statistics.mean(cells['range']):.3f}"]
                 for label, cells in per_config.items()]
        parts.append(f"## {setup_name} ({SETUPS[setup_name].model})\n")
        parts.append(markdown_table(["config", *CELLS, "max abs(w)", "max − min"], lines))
    parts.append("## Cost: one SGD step, ResNet-20, batch 32, CPU (target ≤ 1.10×)\n")
    parts.append(markdown_table(["regularizer", "median step (ms)", "ratio to plain"],
                                [[name, f"{c['median_s'] * 1e3:.1f}", f"{c['ratio']:.3f}"] for name, c in costs.items()]))
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, digits only: a smoke check")
    parser.add_argument("--lambdas", type=float, nargs="+", default=None, help="λ values (default 0.01 0.1)")
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else [0, 1, 2]
    epochs = 3 if args.quick else None
    setups = ["digits"] if args.quick else ["digits", "mnist1d"]
    lambdas = args.lambdas or ([0.01] if args.quick else [0.01, 0.1])
    torch.set_num_threads(1)
    results = quality(setups, seeds, lambdas, epochs)
    costs = cost(repeats=5 if args.quick else 20)
    settings = {"seeds": seeds, "lambdas": lambdas, "epochs": epochs or {s: SETUPS[s].epochs for s in setups},
                "bits": list(BITS), "ranges": list(RANGES), "threads": 1}
    name = "range_reg_quick" if args.quick else "range_reg"
    json_path, md_path = save_results(name, {"settings": settings, "quality": results, "cost": costs},
                                      markdown(results, costs, settings))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
