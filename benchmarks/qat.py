"""QAT back-ends (STE, LSQ, EWGS): accuracy after fine-tuning from a plain FP model and from R²-trained
ones, and the cost of a QAT step (vs a float step, and vs Brevitas' equivalent layer).

Quality: digits (dwcnn) and MNIST-1D (cnn1d), per seed three start models are trained with the setup's
schedule -- plain, R² ``linf`` and R² ``soft_min_max`` (λ = 0.01) -- then each is prepared with
``prepare_qat`` at W2A4, W3A3, W4A4 and W2 (weight-only) for every method, activation quantizers
initialised on 8 training batches, first/last layer at 8 bits (the LSQ paper's protocol), fine-tuned
with Adam (lr 1e-3 for weights and quantizer parameters, cosine schedule) and finalized. EWGS
re-estimates δ from the Hessian trace before the first epoch and after every epoch
(:class:`~qready.quant.EWGSDeltaUpdater`, 1 batch, 4 Hutchinson probes). Cells: test accuracy (%) of
the finalized model, mean ± std over seeds; "init" tables give the accuracy right after
``prepare_qat`` (calibrated quantizers, no fine-tuning).
Cost: median time of one SGD step (forward + backward + step) on ResNet-20, batch 32 of random
3x32x32 inputs, CPU, for each QAT method at W4A4 relative to the float step; then one conv layer
(64->64, 3x3, input 32x64x16x16) forward + backward with 4-bit per-channel weight quantization (and
W4A4), ours vs Brevitas ``QuantConv2d`` (skipped with a message when Brevitas is not installed;
it is not a qready dependency). Configurations are timed in interleaved rounds so that load from
other processes affects all of them alike.

    python -m benchmarks.qat [--quick] [--workers N]

Every process uses one intra-op thread; the quality jobs (one per dataset and seed) run in
``--workers`` processes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import torch
from torch import nn

from benchmarks.common import (
    SETUPS,
    interleaved_medians,
    loaders,
    markdown_table,
    mean_std,
    new_model,
    save_results,
)
from qready.evaluate import evaluate
from qready.models import create_model
from qready.quant import EWGSDeltaUpdater, finalize, prepare_qat, qat_param_groups
from qready.regularizers import build
from qready.train import TrainConfig, fit

SETTINGS: dict[str, tuple[int, int | None]] = {"W2A4": (2, 4), "W3A3": (3, 3), "W4A4": (4, 4), "W2": (2, None)}
STARTS = ("fp", "linf", "soft_min_max")
METHODS = ("ste", "lsq", "ewgs")
LR = 1e-3
R2_WEIGHT = 0.01


def _fit(model: nn.Module, setup_name: str, seed: int, epochs: int, lr: float, **kwargs) -> nn.Module:
    setup = SETUPS[setup_name]
    _, train_loader, _ = loaders(setup, seed)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=setup.batch_size, optimizer="adam", schedule="cosine")
    return fit(model, train_loader, cfg, seed=seed, progress=False, **kwargs).model


def start_model(setup_name: str, seed: int, start: str, epochs: int) -> nn.Module:
    """A float model trained from scratch, plain or with an R² regularizer."""
    setup = SETUPS[setup_name]
    splits, _, _ = loaders(setup, seed)
    model = new_model(setup, splits, seed)
    terms = [] if start == "fp" else [build(start, model, weight=R2_WEIGHT)]
    return _fit(model, setup_name, seed, epochs, setup.lr, loss_terms=terms)


def qat_run(model: nn.Module, setup_name: str, seed: int, method: str, setting: str, epochs: int) -> tuple[float, float]:
    """``(accuracy after prepare_qat, accuracy after fine-tuning and finalize)``."""
    _, train_loader, test_loader = loaders(SETUPS[setup_name], seed)
    w_bits, a_bits = SETTINGS[setting]
    qmodel = prepare_qat(model, method=method, w_bits=w_bits, a_bits=a_bits, first_last=8, calib=train_loader)
    init = evaluate(qmodel, test_loader)["accuracy"]
    callbacks = []
    if method == "ewgs":
        updater = EWGSDeltaUpdater(train_loader, max_batches=1, samples=4, seed=seed)
        updater.update(qmodel)
        callbacks.append(updater)
    qmodel = _fit(qmodel, setup_name, seed, epochs, LR, param_groups=qat_param_groups(qmodel, lr=LR),
                  callbacks=callbacks)
    return init, evaluate(finalize(qmodel), test_loader)["accuracy"]


def quality_job(setup_name: str, seed: int, base_epochs: int, qat_epochs: int, settings: Sequence[str],
                starts: Sequence[str]) -> dict:
    """Every start x method x setting for one dataset and seed: ``{start: {"fp": acc, (method, setting): ...}}``."""
    torch.set_num_threads(1)
    _, _, test_loader = loaders(SETUPS[setup_name], seed)
    out: dict = {}
    for start in starts:
        t0 = time.perf_counter()
        model = start_model(setup_name, seed, start, base_epochs)
        row: dict = {"fp": evaluate(model, test_loader)["accuracy"]}
        for method in METHODS:
            for setting in settings:
                row[f"{method}/{setting}"] = qat_run(model, setup_name, seed, method, setting, qat_epochs)
        out[start] = row
        print(f"{setup_name} seed {seed} start {start}: FP {row['fp']:.2f}, EWGS W2A4 "
              f"{row.get('ewgs/W2A4', (0, float('nan')))[1]:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def quality(setups: Sequence[str], seeds: Sequence[int], base_epochs: dict, qat_epochs: int,
            settings: Sequence[str], starts: Sequence[str], workers: int) -> dict:
    """``{setup: {start: {"fp": [per seed], "method/setting": [(init, final) per seed]}}}``."""
    jobs = [(s, seed) for s in setups for seed in seeds]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {job: pool.submit(quality_job, job[0], job[1], base_epochs[job[0]], qat_epochs, settings, starts)
                   for job in jobs}
        done = {job: f.result() for job, f in futures.items()}
    results: dict = {s: {start: {} for start in starts} for s in setups}
    for (setup_name, _), per_start in done.items():
        for start, row in per_start.items():
            for key, value in row.items():
                results[setup_name][start].setdefault(key, []).append(value)
    return results


# --------------------------------------------------------------------------- cost


def _sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        opt.step()

    return step


def step_cost(repeats: int) -> dict:
    """ResNet-20 SGD step: float and each method at W4A4 (seconds and ratio to float)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    steps = {"float": _sgd_step(create_model("resnet20", num_classes=10), x, y)}
    for method in METHODS:
        qmodel = prepare_qat(create_model("resnet20", num_classes=10), method=method, w_bits=4, a_bits=4, calib=[x])
        steps[f"{method} W4A4"] = _sgd_step(qmodel, x, y)
    medians = interleaved_medians(steps, repeats)
    return {name: {"median_s": m, "ratio": m / medians["float"]} for name, m in medians.items()}


def _fwd_bwd(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()

    return step


def brevitas_cost(repeats: int) -> dict | str:
    """One conv layer forward + backward: float, ours and Brevitas (seconds and ratio to float)."""
    try:
        from brevitas.nn import QuantConv2d
        from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat
    except ImportError:
        return "Brevitas is not installed (pip install brevitas); the comparison was skipped."
    torch.manual_seed(0)
    x = torch.randn(32, 64, 16, 16)

    def conv() -> nn.Conv2d:
        torch.manual_seed(0)
        return nn.Conv2d(64, 64, 3, padding=1, bias=False)

    def brevitas(scaling: str, act: bool) -> nn.Module:
        extra = {"input_quant": Int8ActPerTensorFloat, "input_bit_width": 4,
                 "input_scaling_impl_type": "parameter_from_stats"} if act else {}
        layer = QuantConv2d(64, 64, 3, padding=1, bias=False, weight_quant=Int8WeightPerChannelFloat,
                            weight_bit_width=4, weight_scaling_impl_type=scaling, **extra)
        layer.weight.data.copy_(conv().weight.data)
        return layer

    layers = {
        "float Conv2d": conv(),
        "ours STE W4 (per-channel min-max)": prepare_qat(conv(), method="ste", w_bits=4),
        "Brevitas W4 (per-channel stats)": brevitas("stats", act=False),
        "ours LSQ W4 (learned per-channel step)": prepare_qat(conv(), method="lsq", w_bits=4),
        "Brevitas W4 (learned per-channel scale)": brevitas("parameter_from_stats", act=False),
        "ours LSQ W4A4": prepare_qat(conv(), method="lsq", w_bits=4, a_bits=4, calib=[x]),
        "Brevitas W4A4 (learned scales)": brevitas("parameter_from_stats", act=True),
    }
    medians = interleaved_medians({name: _fwd_bwd(layer, x) for name, layer in layers.items()}, repeats)
    return {name: {"median_s": m, "ratio": m / medians["float Conv2d"]} for name, m in medians.items()}


# --------------------------------------------------------------------------- report


def _cell(values: list, which: int) -> str:
    return mean_std([v[which] for v in values])


def r2_ewgs_summary(results: dict) -> list[str]:
    """One line per dataset and 2-bit setting: EWGS from each R² start minus EWGS from the plain start."""
    lines = []
    for setup_name, per_start in results.items():
        for setting in ("W2A4", "W2"):
            key = f"ewgs/{setting}"
            if "fp" not in per_start or key not in per_start["fp"]:
                continue
            base = statistics.mean(v[1] for v in per_start["fp"][key])
            for start in STARTS[1:]:
                if key in per_start.get(start, {}):
                    gain = statistics.mean(v[1] for v in per_start[start][key]) - base
                    lines.append(f"- {setup_name} EWGS {setting}: {start} start {gain:+.2f} points vs plain start")
    return lines


def markdown(results: dict, step: dict, layer: dict | str, settings: dict) -> str:
    parts = ["# QAT back-ends: STE, LSQ, EWGS\n",
             f"Settings: {settings}. Test accuracy (%) of the finalized model, mean ± std over seeds; first and "
             "last layer at 8 bits; 'A' = activation bits (inputs of every quantized layer).\n"]
    cols = list(settings["settings"])
    for setup_name, per_start in results.items():
        parts.append(f"## {setup_name} ({SETUPS[setup_name].model})\n")
        for which, title in ((1, "after QAT fine-tuning + finalize"), (0, "init: right after prepare_qat")):
            lines = []
            for start, row in per_start.items():
                for method in METHODS:
                    lines.append([start, mean_std(row["fp"]), method]
                                 + [_cell(row[f"{method}/{c}"], which) for c in cols])
            parts.append(f"### {title}\n")
            parts.append(markdown_table(["start", "start FP", "method", *cols], lines))
    parts.append("## R² + EWGS at 2 bits (mean difference of the finalized accuracy)\n")
    parts.append("\n".join(r2_ewgs_summary(results)) + "\n")
    parts.append("## Cost: one SGD step, ResNet-20, batch 32, CPU, 1 thread\n")
    parts.append(markdown_table(["configuration", "median step (ms)", "ratio to float"],
                                [[n, f"{c['median_s'] * 1e3:.1f}", f"{c['ratio']:.2f}"] for n, c in step.items()]))
    parts.append("## Cost: one conv layer (64->64, 3x3, input 32x64x16x16) forward + backward, CPU, 1 thread\n")
    if isinstance(layer, str):
        parts.append(layer + "\n")
    else:
        parts.append(markdown_table(["layer", "median (ms)", "ratio to float"],
                                    [[n, f"{c['median_s'] * 1e3:.2f}", f"{c['ratio']:.2f}"] for n, c in layer.items()]))
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="digits, 1 seed, plain + linf starts, W2A4/W4A4, 3+1 epochs: a smoke check")
    parser.add_argument("--workers", type=int, default=2, help="processes for the quality jobs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        setups, seeds, starts, settings, qat_epochs = ["digits"], [0], STARTS[:2], ["W2A4", "W4A4"], 1
        base_epochs = {"digits": 3}
    else:
        setups, seeds, starts, settings, qat_epochs = ["digits", "mnist1d"], [0, 1, 2], STARTS, list(SETTINGS), 5
        base_epochs = {s: SETUPS[s].epochs for s in setups}
    t0 = time.perf_counter()
    results = quality(setups, seeds, base_epochs, qat_epochs, settings, starts, args.workers)
    print(f"quality done in {time.perf_counter() - t0:.0f} s", flush=True)
    repeats = 5 if args.quick else 20
    step = step_cost(repeats)
    layer = brevitas_cost(repeats)
    meta = {"seeds": seeds, "starts": list(starts), "settings": settings, "base_epochs": base_epochs,
            "qat_epochs": qat_epochs, "lr": LR, "r2_weight": R2_WEIGHT, "first_last": 8, "threads": 1}
    name = "qat_quick" if args.quick else "qat"
    json_results = {s: {st: {k: v for k, v in row.items()} for st, row in per.items()} for s, per in results.items()}
    json_path, md_path = save_results(name, {"settings": meta, "quality": json_results, "step_cost": step,
                                             "layer_cost": layer}, markdown(results, step, layer, meta))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
