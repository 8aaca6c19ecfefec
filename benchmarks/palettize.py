"""Palettization: accuracy of k-means PTQ, DKM and learned representatives at 1/2/3 bits, packed file
sizes, and the memory and time of one DKM training step on a large layer.

Quality: digits (dwcnn) and MNIST-1D (cnn1d). Per seed, a base model is trained from scratch ("FP"),
and two R² bases are that model fine-tuned for ``R2_EPOCHS`` epochs with ``soft_min_max`` or ``linf``
(λ = 0.01). Each base is then palettized per layer at b bits by

* ``kmeans``: exact 1-D k-means of each layer, snapped (post-training, no data);
* ``kmeans+BN``: the same, then BatchNorm statistics re-estimated on 20 training batches;
* ``dkm``: DKM parametrization (τ = 0.05 relative, 3 iterations) fine-tuned with ``fit``, then
  ``finalize_palettized`` and BatchNorm re-estimation;
* ``cluster``: the ``cluster`` regularizer (hard, normalised, λ = 10) fine-tuned with ``fit``, then a
  snap onto its learned representatives and BatchNorm re-estimation.

Fine-tuning uses the setup's optimizer (Adam, cosine) for ``FT_EPOCHS`` epochs at ``FT_LR``. Cells are
test accuracy (%) mean ± std over seeds. Sizes: each palettized model saved with ``save_packed`` versus
the fp32 safetensors of the same model; plus ResNet-20 and VGG-16 (CIFAR shapes, random weights,
2-bit k-means).

Memory: one training step (forward, backward, SGD step; batch 64) of a ``Linear(1024, 1024)`` layer
(1,048,576 weights) palettized at 4 bits, for our DKM, our naive DKM (N × 16 attention) and coremltools'
``DKMPalettizer`` (when it imports and runs), each in a fresh subprocess. Peak memory is the resident
set: the kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` right before
the measured (second) step and read after it, minus the resident set before it; glibc is told to
return large blocks to the kernel at once (``MALLOC_MMAP_THRESHOLD_``) so the resident set follows
the live allocations. Time per step is the median of 3 steps.

    python -m benchmarks.palettize [--quick]

Everything runs on one intra-op thread (faster for these tiny models, less noisy on shared cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from benchmarks.common import (
    SETUPS,
    loaders,
    markdown_table,
    mean_std,
    new_model,
    save_results,
    time_per_call,
    train,
)
from qready.evaluate import evaluate
from qready.export import save_packed
from qready.models import create_model
from qready.quant import finalize_palettized, palettize, recalibrate_batchnorm
from qready.regularizers import build

BITS = (1, 2, 3)
METHODS = ("kmeans", "kmeans+BN", "dkm", "cluster")
BASES = {"FP": None, "R² soft_min_max": "soft_min_max", "R² linf": "linf"}
R2_WEIGHT = 0.01
R2_EPOCHS = 5
CLUSTER_WEIGHT = 10.0
FT_LR = 0.003
FT_EPOCHS = 3
BN_BATCHES = 20
MEMORY_IMPLS = ("none", "ours", "naive", "coremltools")


def fp32_bytes(model: nn.Module, folder: Path) -> int:
    path = folder / "fp32.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, path)
    return path.stat().st_size


def packed_bytes(model: nn.Module, folder: Path, bits: int) -> int:
    return save_packed(model, folder / "model.qready", spec_or_bits=bits)["bytes"]


def palettized(method: str, base: nn.Module, setup_name: str, seed: int, bits: int, epochs: int) -> nn.Module:
    """The palettized copy of ``base`` by ``method`` (fine-tuned for ``dkm`` and ``cluster``)."""
    setup = SETUPS[setup_name]
    if method == "kmeans":
        return palettize(base, bits, "kmeans").eval()
    if method == "dkm":
        model, _ = train(setup, seed, model=palettize(base, bits, "dkm"), epochs=epochs, lr=FT_LR)
        model = finalize_palettized(model)
    elif method == "cluster":
        model = copy.deepcopy(base)
        reg = build("cluster", model, weight=CLUSTER_WEIGHT, bits=bits)
        model, _ = train(setup, seed, model=model, loss_terms=[reg], epochs=epochs, lr=FT_LR)
        model = palettize(model, bits, "cluster", reg=reg)
    else:
        model = palettize(base, bits, "kmeans")
    _, train_loader, _ = loaders(setup, seed)
    recalibrate_batchnorm(model, train_loader, BN_BATCHES)
    return model.eval()


def quality(setup_name: str, seeds: list[int], base_epochs: int | None, r2_epochs: int, ft_epochs: int,
            folder: Path) -> dict:
    """Accuracies ``acc[base][method][bits] -> [per seed]`` and mean packed sizes."""
    setup = SETUPS[setup_name]
    acc: dict = {b: {"base": [], **{m: {bits: [] for bits in BITS} for m in METHODS}} for b in BASES}
    sizes: dict = {m: {bits: [] for bits in BITS} for m in METHODS}
    fp_size = None
    for seed in seeds:
        splits, _, test_loader = loaders(setup, seed)
        fp_model, _ = train(setup, seed, model=new_model(setup, splits, seed), epochs=base_epochs)
        for base_name, reg_name in BASES.items():
            t0 = time.perf_counter()
            model = copy.deepcopy(fp_model)
            if reg_name:
                terms = [build(reg_name, model, weight=R2_WEIGHT)]
                model, _ = train(setup, seed, model=model, loss_terms=terms, epochs=r2_epochs, lr=FT_LR)
            acc[base_name]["base"].append(evaluate(model, test_loader)["accuracy"])
            fp_size = fp_size or fp32_bytes(model, folder)
            for method in METHODS:
                for bits in BITS:
                    pal = palettized(method, model, setup_name, seed, bits, ft_epochs)
                    acc[base_name][method][bits].append(evaluate(pal, test_loader)["accuracy"])
                    sizes[method][bits].append(packed_bytes(pal, folder, bits))
            print(f"{setup_name} seed {seed} {base_name}: {time.perf_counter() - t0:.0f}s", flush=True)
    return {"accuracy": acc, "packed_bytes": sizes, "fp32_bytes": fp_size}


def zoo_sizes(names: list[str], folder: Path) -> dict:
    """fp32 vs 2-bit packed bytes of CIFAR-shaped zoo models (random init, k-means)."""
    out = {}
    for name in names:
        torch.manual_seed(0)
        model = create_model(name, num_classes=10).eval()
        out[name] = {"fp32_bytes": fp32_bytes(model, folder),
                     "packed_bytes": packed_bytes(palettize(model, 2, "kmeans"), folder, 2)}
    return out


# ---- memory: one DKM step on a 1M-weight layer, one subprocess per implementation -------------------

def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _prepare(impl: str, layer: nn.Module) -> tuple[nn.Module, object]:
    """The model to step and an optional coremltools palettizer (``step()`` after each update)."""
    model = nn.Sequential(layer)
    if impl == "none":
        return model, None
    if impl in ("ours", "naive"):
        return palettize(model, 4, "dkm", impl="unique" if impl == "ours" else "naive", inplace=True), None
    from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig

    config = DKMPalettizerConfig.from_dict({"global_config": {"n_bits": 4}})
    palettizer = DKMPalettizer(model, config)
    prepared = palettizer.prepare()
    return prepared, palettizer


def training_step(impl: str, layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One SGD step of ``layer`` palettized by ``impl`` on ``x`` (loss: mean squared output), as a function."""
    model, palettizer = _prepare(impl, layer)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
        if palettizer is not None:
            palettizer.step()

    return step


def memory_probe(impl: str) -> dict:
    """Peak resident memory (MB) added by one training step, and the median step time (s)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    step = training_step(impl, nn.Linear(1024, 1024), torch.randn(64, 1024))
    step()  # warm-up: lazy initialisation, allocator caches
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")
    step()
    peak_mb = (_rss_kb("VmHWM") - before) / 1024
    return {"peak_mb": peak_mb, "step_s": time_per_call(step, warmup=0, repeats=3)}


def memory(impls: tuple[str, ...]) -> dict:
    out = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    for impl in impls:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.palettize", "--memory-probe", impl],
                              capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            out[impl] = json.loads(lines[-1])
        else:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            out[impl] = {"skipped": reason[:300]}
            print(f"memory probe {impl!r} skipped: {reason[:300]}", flush=True)
    return out


def equal_accuracy_check(base_epochs: int | None, epochs: int) -> dict:
    """DKM on digits (seed 0, 2 bits) with our implementation and the naive one: same accuracy."""
    setup = SETUPS["digits"]
    base, _ = train(setup, 0, epochs=base_epochs)
    _, _, test_loader = loaders(setup, 0)
    out = {}
    for impl in ("unique", "naive"):
        t0 = time.perf_counter()
        model, _ = train(setup, 0, model=palettize(base, 2, "dkm", impl=impl), epochs=epochs, lr=FT_LR)
        out[impl] = {"accuracy": evaluate(finalize_palettized(model), test_loader)["accuracy"],
                     "seconds": time.perf_counter() - t0}
    return out


# ---- report ------------------------------------------------------------------------------------------

def render(results: dict) -> str:
    parts = ["# Palettization\n", f"Seeds: {results['seeds']}; FP epochs: {results['base_epochs'] or 'setup default'}; "
             f"R² fine-tune epochs: {results['r2_epochs']}; palettization fine-tune epochs: {results['ft_epochs']} "
             f"(lr {FT_LR}). Accuracy (%) mean ± std over seeds; `float` is the base before palettization.\n"]
    for ds, res in results["quality"].items():
        lines = []
        for base_name in BASES:
            acc = res["accuracy"][base_name]
            lines.append([base_name, "float", *[mean_std(acc["base"])] * len(BITS)])
            for method in METHODS:
                lines.append([base_name, method, *[mean_std(acc[method][b]) for b in BITS]])
        parts += [f"\n## {ds}\n", markdown_table(["base", "method", *[f"{b}-bit" for b in BITS]], lines)]
        size_lines = []
        for method in METHODS:
            for bits in BITS:
                mean_bytes = sum(res["packed_bytes"][method][bits]) / len(res["packed_bytes"][method][bits])
                size_lines.append([method, bits, res["fp32_bytes"], round(mean_bytes),
                                   f"{res['fp32_bytes'] / mean_bytes:.1f}×"])
        parts += [f"\nFile sizes ({ds}; packed = mean over runs). These models are tiny, so the safetensors "
                  "header (about 100 bytes per tensor) and the float BatchNorm parameters weigh a lot:\n",
                  markdown_table(["method", "bits", "fp32 safetensors (B)", "packed (B)", "ratio"], size_lines)]
    if results.get("zoo"):
        lines = [[n, z["fp32_bytes"], z["packed_bytes"], f"{z['fp32_bytes'] / z['packed_bytes']:.1f}×"]
                 for n, z in results["zoo"].items()]
        parts += ["\n## 2-bit file sizes, CIFAR-shaped models (k-means, random weights)\n",
                  markdown_table(["model", "fp32 safetensors (B)", "packed (B)", "ratio"], lines)]
    mem = results["memory"]
    lines = []
    for impl, m in mem.items():
        if "skipped" in m:
            lines.append([impl, "skipped", "-", m["skipped"]])
        else:
            lines.append([impl, f"{m['peak_mb']:.1f}", f"{m['step_s'] * 1000:.0f}", ""])
    parts += ["\n## One training step, Linear(1024, 1024) at 4 bits (1,048,576 weights)\n",
              "Peak resident memory added by the step (MB) and median step time (ms), one thread. "
              "`none` is the plain layer without palettization.\n",
              markdown_table(["implementation", "peak MB", "step ms", "note"], lines)]
    if "ours" in mem and "naive" in mem and "skipped" not in mem["ours"] and "skipped" not in mem["naive"]:
        parts.append(f"\nNaive / ours peak memory: {mem['naive']['peak_mb'] / max(mem['ours']['peak_mb'], 1e-9):.1f}×.\n")
    if results.get("equal_accuracy"):
        eq = results["equal_accuracy"]
        parts.append(f"\nSame DKM run (digits, seed 0, 2 bits) with both implementations: ours "
                     f"{eq['unique']['accuracy']:.2f}% ({eq['unique']['seconds']:.0f}s), naive "
                     f"{eq['naive']['accuracy']:.2f}% ({eq['naive']['seconds']:.0f}s).\n")
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, few epochs (smoke run)")
    parser.add_argument("--memory-probe", choices=MEMORY_IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    base_epochs = 3 if args.quick else None
    ft_epochs = 1 if args.quick else FT_EPOCHS
    r2_epochs = 1 if args.quick else R2_EPOCHS
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = {"seeds": seeds, "base_epochs": base_epochs, "r2_epochs": r2_epochs, "ft_epochs": ft_epochs,
                   "quality": {ds: quality(ds, seeds, base_epochs, r2_epochs, ft_epochs, folder)
                               for ds in ("digits", "mnist1d")},
                   "zoo": zoo_sizes(["resnet20"] if args.quick else ["resnet20", "vgg16"], folder)}
    results["memory"] = memory(MEMORY_IMPLS)
    results["equal_accuracy"] = equal_accuracy_check(base_epochs, ft_epochs)
    results["seconds"] = time.perf_counter() - t0
    markdown = render(results)
    save_results("palettize_quick" if args.quick else "palettize", results, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
