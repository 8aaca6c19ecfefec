"""SAQ: LSQ QAT alone vs LSQ + SAQ (sharpness-aware quantized step), mixed precision vs uniform bits at
equal BOPs, and the cost of a SAQ step.

Quality: digits (dwcnn) and MNIST-1D (cnn1d), per seed a float model is trained with the setup's
schedule (``benchmarks/common.py``), then for W2A2, W3A3 and W4A4 it is prepared with
``prepare_qat(method="lsq", first_last=8, calib=8 train batches)``, fine-tuned for the same number
of epochs with Adam (lr 1e-3 for weights and steps, cosine) either with the standard step (LSQ) or
with ``SAQStep(rho)`` for each ρ of the grid, finalized and evaluated on the test split. The SAQ
paper's ρ = 0.3-0.4 was for ResNets on CIFAR/ImageNet; the grid brackets it. SAQ costs two passes
per step: it gets the same number of epochs, not the same compute.

Mixed precision: target = BOPs of the uniform W3A3 model (first/last layer at 8 bits, as above);
``search_mixed_precision`` (bits {2,3,4,5} per searched layer, weights and inputs, sharpness-aware
loss with ρ = 0.05 on 4 training batches) picks a configuration within the target, which is
prepared with ``prepare_mixed`` and fine-tuned like the uniform models, with LSQ alone and with
SAQ at ``MIXED_RHO`` (fixed in advance, not chosen on the test set).

Cost: median time of one step (forward + backward + SGD step) on ResNet-20, batch 32 of random
3x32x32 inputs, CPU, 1 thread, LSQ W4A4 with the standard step vs the SAQ step (ρ = 0.3), timed in
interleaved rounds.

    python -m benchmarks.saq [--quick] [--workers N]
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
    save_results,
    train,
)
from qready.evaluate import evaluate
from qready.models import create_model
from qready.quant import Selector, finalize, prepare_qat, qat_param_groups
from qready.sharpness import SAQ, SAQStep, bops, prepare_mixed, search_mixed_precision
from qready.sharpness.bops import LAYER_TYPES
from qready.train import TrainConfig, fit

SETTINGS: dict[str, tuple[int, int]] = {"W2A2": (2, 2), "W3A3": (3, 3), "W4A4": (4, 4)}
RHOS = (0.05, 0.2, 0.5)
MIXED_RHO = 0.2
LR = 1e-3
FIRST_LAST = 8


def _finetune(qmodel: nn.Module, setup_name: str, seed: int, epochs: int, rho: float | None) -> float:
    """Fine-tune a prepared QAT model (standard step, or SAQ at ``rho``); test accuracy after finalize."""
    setup = SETUPS[setup_name]
    _, train_loader, test_loader = loaders(setup, seed)
    cfg = TrainConfig(epochs=epochs, lr=LR, batch_size=setup.batch_size, optimizer="adam", schedule="cosine")
    strategy = SAQStep(rho=rho) if rho is not None else None
    fit(qmodel, train_loader, cfg, param_groups=qat_param_groups(qmodel, lr=LR), step_strategy=strategy, seed=seed,
        progress=False)
    return evaluate(finalize(qmodel), test_loader)["accuracy"]


def _uniform(model: nn.Module, setup_name: str, seed: int, w_bits: int, a_bits: int, epochs: int,
             rho: float | None) -> float:
    _, train_loader, _ = loaders(SETUPS[setup_name], seed)
    qmodel = prepare_qat(model, method="lsq", w_bits=w_bits, a_bits=a_bits, first_last=FIRST_LAST, calib=train_loader)
    return _finetune(qmodel, setup_name, seed, epochs, rho)


def _mixed(model: nn.Module, setup_name: str, seed: int, epochs: int) -> dict:
    """Search a configuration within the uniform-W3A3 BOPs, then fine-tune it with LSQ and with SAQ."""
    splits, train_loader, _ = loaders(SETUPS[setup_name], seed)
    shape = tuple(splits.input_shape)
    select = Selector(types=LAYER_TYPES, first_last=FIRST_LAST)
    layers = [item.name for item in Selector(types=LAYER_TYPES).select(model)]
    edge = {layers[0], layers[-1]}
    uniform = {n: FIRST_LAST if n in edge else 3 for n in layers}
    target = bops(model, shape, uniform, uniform).total
    t0 = time.perf_counter()
    found = search_mixed_precision(model, train_loader, shape, target, select=select, rho=0.05, batches=4)
    search_s = time.perf_counter() - t0
    out = {"config": found.config, "bops": found.bops, "target": target, "search_s": search_s}
    for key, rho in (("lsq", None), ("saq", MIXED_RHO)):
        _, calib, _ = loaders(SETUPS[setup_name], seed)  # a fresh loader: the same calibration batches as _uniform
        qmodel = prepare_mixed(model, found.config, method="lsq", calib=calib)
        out[key] = _finetune(qmodel, setup_name, seed, epochs, rho)
    return out


def quality_job(setup_name: str, seed: int, base_epochs: int, qat_epochs: int, settings: Sequence[str],
                rhos: Sequence[float]) -> dict:
    """One dataset and seed: ``{"fp": acc, "W3A3/lsq": acc, "W3A3/saq0.2": acc, ..., "mixed": {...}}``."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, final = train(SETUPS[setup_name], seed, epochs=base_epochs)
    row: dict = {"fp": final["val_acc"]}
    for setting in settings:
        w, a = SETTINGS[setting]
        row[f"{setting}/lsq"] = _uniform(model, setup_name, seed, w, a, qat_epochs, None)
        for rho in rhos:
            row[f"{setting}/saq{rho}"] = _uniform(model, setup_name, seed, w, a, qat_epochs, rho)
    if "W3A3" in settings:
        row["mixed"] = _mixed(model, setup_name, seed, qat_epochs)
        if MIXED_RHO not in rhos:
            row[f"W3A3/saq{MIXED_RHO}"] = _uniform(model, setup_name, seed, 3, 3, qat_epochs, MIXED_RHO)
    print(f"{setup_name} seed {seed}: FP {row['fp']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def quality(setups: Sequence[str], seeds: Sequence[int], base_epochs: dict, qat_epochs: int, settings: Sequence[str],
            rhos: Sequence[float], workers: int) -> dict:
    """``{setup: {key: [value per seed]}}``."""
    jobs = [(s, seed) for s in setups for seed in seeds]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {job: pool.submit(quality_job, job[0], job[1], base_epochs[job[0]], qat_epochs, settings, rhos)
                   for job in jobs}
        done = {job: f.result() for job, f in futures.items()}
    results: dict = {s: {} for s in setups}
    for (setup_name, _), row in done.items():
        for key, value in row.items():
            results[setup_name].setdefault(key, []).append(value)
    return results


# --------------------------------------------------------------------------- cost


def step_cost(repeats: int, rho: float = 0.3) -> dict:
    """ResNet-20 LSQ W4A4: one standard SGD step vs one SAQ step (median seconds, interleaved rounds)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    criterion = nn.CrossEntropyLoss()

    def qmodel() -> nn.Module:
        torch.manual_seed(0)
        return prepare_qat(create_model("resnet20", num_classes=10), method="lsq", w_bits=4, a_bits=4, calib=[x]).train()

    plain, sharp = qmodel(), qmodel()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_sharp = torch.optim.SGD(sharp.parameters(), lr=0.01, momentum=0.9)
    saq = SAQ(sharp, rho=rho)

    def lsq_step() -> None:
        opt_plain.zero_grad(set_to_none=True)
        criterion(plain(x), y).backward()
        opt_plain.step()

    def closure() -> torch.Tensor:
        loss = criterion(sharp(x), y)
        loss.backward()
        return loss

    steps: dict[str, Callable[[], object]] = {"LSQ W4A4 step": lsq_step, "SAQ step": lambda: saq.step(closure, opt_sharp)}
    medians = interleaved_medians(steps, repeats)
    return {"lsq_s": medians["LSQ W4A4 step"], "saq_s": medians["SAQ step"],
            "ratio": medians["SAQ step"] / medians["LSQ W4A4 step"], "repeats": repeats, "rho": rho}


# --------------------------------------------------------------------------- report


def _paired(results: dict, key: str, base: str) -> str:
    """Mean paired difference ``key - base`` over seeds and how many seeds improved."""
    diffs = [a - b for a, b in zip(results[key], results[base], strict=True)]
    wins = sum(d > 0 for d in diffs)
    return f"{statistics.mean(diffs):+.2f} ({wins}/{len(diffs)})"


def markdown(results: dict, cost: dict, meta: dict) -> str:
    parts = ["# SAQ: sharpness-aware quantization\n",
             f"Settings: {meta}. Test accuracy (%) of the finalized model, mean ± std over seeds; first and last "
             f"layer at {FIRST_LAST} bits; LSQ fine-tuning from the trained float model, the same epochs with and "
             "without SAQ.\n"]
    rhos, settings = meta["rhos"], meta["settings"]
    for setup_name, res in results.items():
        parts.append(f"## {setup_name} ({SETUPS[setup_name].model}), FP {mean_std(res['fp'])}\n")
        header = ["setting", "LSQ", *[f"LSQ+SAQ ρ={r}" for r in rhos]]
        lines = [[s, mean_std(res[f"{s}/lsq"]), *[mean_std(res[f"{s}/saq{r}"]) for r in rhos]] for s in settings]
        parts.append(markdown_table(header, lines))
        parts.append("Paired difference SAQ − LSQ, mean over seeds (seeds improved / seeds):\n")
        lines = [[s, "", *[_paired(res, f"{s}/saq{r}", f"{s}/lsq") for r in rhos]] for s in settings]
        parts.append(markdown_table(header, lines))
        if "mixed" in res:
            mixed = res["mixed"]
            parts.append(f"### Mixed precision vs uniform W3A3 at equal BOPs ({setup_name})\n")
            header = ["seed", "config (bits per layer)", "BOPs / target", "search (s)", "uniform W3A3 LSQ",
                      "mixed LSQ", f"uniform W3A3 SAQ ρ={MIXED_RHO}", f"mixed SAQ ρ={MIXED_RHO}"]
            lines = []
            for i, m in enumerate(mixed):
                config = " ".join(f"{n}:{b}" for n, b in m["config"].items())
                lines.append([meta["seeds"][i], config, f"{m['bops'] / m['target']:.3f}", f"{m['search_s']:.1f}",
                              f"{res['W3A3/lsq'][i]:.2f}", f"{m['lsq']:.2f}", f"{res[f'W3A3/saq{MIXED_RHO}'][i]:.2f}",
                              f"{m['saq']:.2f}"])
            lines.append(["mean", "", "", "", mean_std(res["W3A3/lsq"]), mean_std([m["lsq"] for m in mixed]),
                          mean_std(res[f"W3A3/saq{MIXED_RHO}"]), mean_std([m["saq"] for m in mixed])])
            parts.append(markdown_table(header, lines))
    parts.append("## Cost: one step, ResNet-20 LSQ W4A4, batch 32, CPU, 1 thread\n")
    parts.append(markdown_table(["step", "median (ms)"], [
        ["LSQ (standard step)", f"{cost['lsq_s'] * 1e3:.1f}"],
        [f"LSQ + SAQ (ρ={cost['rho']})", f"{cost['saq_s'] * 1e3:.1f}"],
        ["ratio SAQ / LSQ", f"{cost['ratio']:.2f}"],
    ]))
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="digits, 1 seed, W3A3, ρ = 0.2, 3+1 epochs: a smoke check")
    parser.add_argument("--workers", type=int, default=2, help="processes for the quality jobs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        setups, seeds, settings, rhos, qat_epochs = ["digits"], [0], ["W3A3"], (MIXED_RHO,), 1
        base_epochs = {"digits": 3}
    else:
        setups, seeds, settings, rhos, qat_epochs = ["digits", "mnist1d"], [0, 1, 2], list(SETTINGS), RHOS, 5
        base_epochs = {s: SETUPS[s].epochs for s in setups}
    t0 = time.perf_counter()
    results = quality(setups, seeds, base_epochs, qat_epochs, settings, rhos, args.workers)
    print(f"quality done in {time.perf_counter() - t0:.0f} s", flush=True)
    cost = step_cost(3 if args.quick else 15)
    meta = {"seeds": seeds, "settings": settings, "rhos": list(rhos), "base_epochs": base_epochs,
            "qat_epochs": qat_epochs, "lr": LR, "first_last": FIRST_LAST, "mixed_rho": MIXED_RHO,
            "search": {"bits": [2, 3, 4, 5], "rho": 0.05, "batches": 4, "target": "uniform W3A3 BOPs"}, "threads": 1}
    name = "saq_quick" if args.quick else "saq"
    json_path, md_path = save_results(name, {"settings": meta, "quality": results, "step_cost": cost},
                                      markdown(results, cost, meta))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
