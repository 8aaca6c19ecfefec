"""Gradient-ℓ1 regularization: does one trained model survive PTQ at many bit widths, and what does
double backprop cost?

Quality: digits (dwcnn) and MNIST-1D (cnn1d), one model per (setting, seed), each swept through PTQ
at W8A8, W6A6, W4A4, W4A8, W3A8 and weight-only W4, W3 (per-channel symmetric min-max weights,
per-tensor asymmetric min-max activations). Settings: the plain baseline and grad-ℓ1 over a λ grid,
applied (as in the paper) only in the last third of the epochs. The held ‖∇_W L‖₁ column is the
penalised quantity measured after training on the first test batch (BatchNorm in train mode).

Both modes of the penalty's gradient are trained: ``exact`` (double backprop, the penalty added to the
loss) and ``finite_difference`` (one extra forward + backward per step, through ``GradL1.step_strategy``).

Cost: step time with the penalty / plain step (forward + backward + optimizer), ResNet-20 on
``[32, 3, 32, 32]`` on the CPU, plain, exact and finite-difference steps interleaved so that load
changes hit all alike.

    python -m benchmarks.grad_l1 [--quick] [--compare-modes] [--threads N] [--add-seeds S ...] [--keep-cost]

``--add-seeds`` trains only the given seeds and merges them into the saved results (rows of other
seeds kept); ``--keep-cost`` keeps the saved step-cost table instead of timing again.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qready.models import create_model
from qready.regularizers import GradL1

from . import common

BITS = ["W8A8", "W6A6", "W4A4", "W4A8", "W3A8", 4, 3]
COLUMNS = ["FP", "W8A8", "W6A6", "W4A4", "W4A8", "W3A8", "W4", "W3"]


@dataclass(frozen=True)
class Setting:
    """One training recipe: λ_w, λ_a, the fraction of the epochs (at the end) with the penalty, the mode."""

    label: str
    weight: float = 0.0
    act_weight: float = 0.0
    last_fraction: float = 1 / 3
    mode: str = "exact"

    def fit_kwargs(self, model, epochs: int) -> dict:
        """``loss_terms`` (exact mode) or ``step_strategy`` (finite-difference mode) for ``fit``."""
        if self.weight == 0 and self.act_weight == 0:
            return {}
        last = max(1, round(epochs * self.last_fraction))
        reg = GradL1(model, weight=self.weight, act_weight=self.act_weight, last_epochs=last, epochs=epochs,
                     mode=self.mode)
        return {"loss_terms": [reg]} if self.mode == "exact" else {"step_strategy": reg.step_strategy()}


# λ grid from pilots (seed 0): applied in the last third of a cosine schedule, λ_w up to 10 leaves FP
# accuracy intact (the learning rate is small by then) while from the start λ_w = 0.03 already collapses
# MNIST-1D training; 0.1 -> 10 spans "barely moves ‖∇L‖₁" to "halves it".
FULL_SETTINGS = [
    Setting("baseline"),
    Setting("λw=0.1", 0.1),
    Setting("λw=1", 1.0),
    Setting("λw=10", 10.0),
    Setting("λw=1 λa=0.1", 1.0, 0.1),
    Setting("fd λw=1", 1.0, mode="finite_difference"),
    Setting("fd λw=1 λa=0.1", 1.0, 0.1, mode="finite_difference"),
]
# on a busy machine (``--compare-modes``): the baseline and the two λ settings in both modes only
COMPARE_SETTINGS = [FULL_SETTINGS[i] for i in (0, 2, 4, 5, 6)]
QUICK_SETTINGS = [Setting("baseline"), Setting("λw=1", 1.0), Setting("fd λw=1", 1.0, mode="finite_difference")]


def held_grad_l1(model, setup: common.Setup, seed: int) -> float:
    """Σ_l ‖∇_{W_l} L‖₁ on the first test batch (BatchNorm in train mode, statistics restored)."""
    _, _, test_loader = common.loaders(setup, seed)
    x, y = next(iter(test_loader))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    value = GradL1(model).penalty(model, F.cross_entropy(model(x), y)).item()
    model.load_state_dict(state)
    model.eval()
    return value


def quality(setup_name: str, seeds: list[int], settings: list[Setting], epochs: int | None) -> list[dict]:
    """One row per (setting, seed): PTQ accuracies, held ‖∇_W L‖₁ and training time."""
    setup = common.SETUPS[setup_name]
    n_epochs = epochs or setup.epochs
    rows = []
    for seed in seeds:
        for setting in settings:
            splits, _, _ = common.loaders(setup, seed)
            model = common.new_model(setup, splits, seed)
            start = time.perf_counter()
            model, final = common.train(setup, seed, model=model, epochs=n_epochs,
                                        **setting.fit_kwargs(model, n_epochs))
            train_s = time.perf_counter() - start
            acc = common.ptq_accuracies(model, setup, seed, BITS, ("minmax",))
            row = {"setup": setup_name, "setting": setting.label, "mode": setting.mode, "seed": seed,
                   "weight": setting.weight,
                   "act_weight": setting.act_weight, "epochs": n_epochs,
                   "penalty_epochs": max(1, round(n_epochs * setting.last_fraction)) if setting.weight or
                   setting.act_weight else 0,
                   "accuracy": {k.split("/")[0]: v for k, v in acc.items()},
                   "held_grad_l1": held_grad_l1(model, setup, seed), "train_s": train_s}
            rows.append(row)
            print(f"{setup_name} seed {seed} {setting.label}: " +
                  " ".join(f"{k}={v:.1f}" for k, v in row["accuracy"].items()) +
                  f" |∇W L|1={row['held_grad_l1']:.2f} ({train_s:.0f}s)", flush=True)
    return rows


def step_cost(steps: int, act_weight: float = 0.0) -> dict:
    """Median step times (s): plain, grad-ℓ1 exact and finite-difference; ResNet-20, batch 32 of 3x32x32,
    SGD, the three steps interleaved. Each mode is used the documented way, on its own copy of the
    model (so no mode carries another's activation hooks): exact as a loss term, finite difference
    through ``GradL1.step``."""
    torch.manual_seed(0)
    base = create_model("resnet20", num_classes=10, in_channels=3).train()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    models = {mode: copy.deepcopy(base) for mode in ("plain", "exact", "fd")}
    opts = {mode: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for mode, m in models.items()}
    exact = GradL1(models["exact"], weight=0.01, act_weight=act_weight)
    fd = GradL1(models["fd"], weight=0.01, act_weight=act_weight, mode="finite_difference")

    def plain() -> None:
        opts["plain"].zero_grad(set_to_none=True)
        F.cross_entropy(models["plain"](x), y).backward()
        opts["plain"].step()

    def with_exact() -> None:
        opts["exact"].zero_grad(set_to_none=True)
        loss = F.cross_entropy(models["exact"](x), y)
        (loss + exact(models["exact"], loss=loss)).backward()
        opts["exact"].step()

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(models["fd"](x), y)
        loss.backward()
        return loss

    def with_fd() -> None:
        fd.step(models["fd"], closure, opts["fd"])

    times = common.interleaved_medians({"plain": plain, "exact": with_exact, "fd": with_fd}, repeats=steps, warmup=3)
    exact.remove()
    fd.remove()
    p = times["plain"]
    return {"act_weight": act_weight, "threads": torch.get_num_threads(), "plain_s": p,
            "grad_l1_s": times["exact"], "ratio": times["exact"] / p, "fd_s": times["fd"], "fd_ratio": times["fd"] / p,
            "steps": steps, "load_avg_1min": os.getloadavg()[0]}


def paired_deltas(rows: list[dict], settings: list[Setting]) -> list[list[str]]:
    """Per (setup, setting): mean ± std over seeds of accuracy minus the same seed's baseline."""
    base = {(r["setup"], r["seed"]): r["accuracy"] for r in rows if r["setting"] == settings[0].label}
    lines = []
    for setup_name in dict.fromkeys(r["setup"] for r in rows):
        for setting in settings[1:]:
            sel = [r for r in rows if r["setup"] == setup_name and r["setting"] == setting.label]
            if sel:
                lines.append([setup_name, setting.label, *(
                    common.mean_std([r["accuracy"][c] - base[(setup_name, r["seed"])][c] for r in sel])
                    for c in COLUMNS)])
    return lines


def mode_deltas(rows: list[dict], settings: list[Setting]) -> list[list[str]]:
    """Per (setup, finite-difference setting): accuracy minus the exact-mode run of the same λ and seed."""
    def key(r: dict) -> tuple:
        return r["setup"], r["seed"], r["weight"], r["act_weight"]

    exact = {key(r): r for r in rows if r["mode"] == "exact" and (r["weight"] or r["act_weight"])}
    lines = []
    for setup_name in dict.fromkeys(r["setup"] for r in rows):
        for setting in settings:
            sel = [r for r in rows if r["setup"] == setup_name and r["setting"] == setting.label
                   and r["mode"] != "exact" and key(r) in exact]
            if sel:
                lines.append([setup_name, setting.label, *(
                    common.mean_std([r["accuracy"][c] - exact[key(r)]["accuracy"][c] for r in sel]) for c in COLUMNS),
                    common.mean_std([r["held_grad_l1"] - exact[key(r)]["held_grad_l1"] for r in sel])])
    return lines


def markdown(rows: list[dict], settings: list[Setting], costs: list[dict]) -> str:
    lines = []
    for setup_name in dict.fromkeys(r["setup"] for r in rows):
        for setting in settings:
            sel = [r for r in rows if r["setup"] == setup_name and r["setting"] == setting.label]
            if not sel:
                continue
            cells = [common.mean_std([r["accuracy"][c] for r in sel]) for c in COLUMNS]
            lines.append([setup_name, setting.label, f"{sel[0]['penalty_epochs']}/{sel[0]['epochs']}", *cells,
                          common.mean_std([r["held_grad_l1"] for r in sel]),
                          f"{statistics.mean(r['train_s'] for r in sel):.0f}"])
    seeds = sorted({r["seed"] for r in rows})
    header = ["setup", "setting", "penalty epochs", *COLUMNS, "held ‖∇W L‖₁", "train s"]
    out = [f"# Gradient-ℓ1 regularization: PTQ accuracy (%) over seeds {seeds}, mean ± std\n",
           "Per-channel symmetric min-max weights, per-tensor asymmetric min-max activations; one trained "
           "model per row, swept through every bit width. `W4`/`W3`: weights only.\n",
           common.markdown_table(header, lines), "",
           "## Paired difference to the baseline of the same seed (accuracy points, mean ± std over seeds)\n",
           common.markdown_table(["setup", "setting", *COLUMNS], paired_deltas(rows, settings)), "",
           "## Finite difference minus exact, same λ and seed (accuracy points, mean ± std over seeds)\n",
           "Where the spread over seeds covers 0, the two modes are equal within seed noise.\n",
           common.markdown_table(["setup", "setting", *COLUMNS, "held ‖∇W L‖₁"], mode_deltas(rows, settings)), "",
           "## Cost: ResNet-20, batch 32 of 3x32x32, CPU, median of interleaved steps (SGD step included)\n",
           "The machine's 1-minute load average is shown: timings on a shared machine are noisy.\n"]
    out.append(common.markdown_table(
        ["term", "threads", "plain step ms", "exact step ms", "exact ratio", "finite-difference step ms",
         "fd ratio", "load avg"],
        [["weights" if c["act_weight"] == 0 else "weights + activations", str(c["threads"]),
          f"{1000 * c['plain_s']:.1f}", f"{1000 * c['grad_l1_s']:.1f}", f"{c['ratio']:.2f}×",
          f"{1000 * c['fd_s']:.1f}", f"{c['fd_ratio']:.2f}×", f"{c['load_avg_1min']:.1f}"] for c in costs]))
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, 2 settings, short timing")
    parser.add_argument("--compare-modes", action="store_true",
                        help="only the baseline and λw=1 (± λa=0.1) in both modes")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--add-seeds", type=int, nargs="+", metavar="S",
                        help="train only these seeds and merge them into the saved results")
    parser.add_argument("--keep-cost", action="store_true", help="keep the saved step-cost table (no timing)")
    parser.add_argument("--cost-steps", type=int, default=15, help="interleaved timing repeats (default 15)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for training (default 1: the small models gain nothing from more)")
    args = parser.parse_args()
    timing_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else list(range(args.seeds))
    settings = QUICK_SETTINGS if args.quick else COMPARE_SETTINGS if args.compare_modes else FULL_SETTINGS
    epochs = 3 if args.quick else None
    name = "grad_l1_quick" if args.quick else "grad_l1"
    saved_path = common.RESULTS / f"{name}.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {"rows": [], "cost": []}
    if args.add_seeds:
        seeds = args.add_seeds
    rows = [row for setup in ("digits", "mnist1d") for row in quality(setup, seeds, settings, epochs)]
    if args.add_seeds:
        labels = {s.label for s in settings}
        rows = [r for r in saved["rows"] if r["seed"] not in seeds and r["setting"] in labels] + rows
    steps = 5 if args.quick else args.cost_steps
    costs = saved["cost"] if args.keep_cost else []
    for threads in [] if args.keep_cost else sorted({1, timing_threads}):
        torch.set_num_threads(threads)
        for act_weight in (0.0, 0.01):
            c = step_cost(steps, act_weight)
            costs.append(c)
            print(f"cost ({threads} thread(s), act_weight={act_weight}): plain {1000 * c['plain_s']:.1f} ms, "
                  f"exact {1000 * c['grad_l1_s']:.1f} ms ({c['ratio']:.2f}x), finite difference "
                  f"{1000 * c['fd_s']:.1f} ms ({c['fd_ratio']:.2f}x) (load average {c['load_avg_1min']:.1f})",
                  flush=True)
    payload = {"bits": [str(b) for b in BITS], "settings": [s.__dict__ for s in settings], "rows": rows,
               "cost": costs, "quick": args.quick, "train_threads": args.threads, "timing_threads": timing_threads}
    paths = common.save_results(name, payload, markdown(rows, settings, costs))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
