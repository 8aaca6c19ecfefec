"""Pretrained ImageNet MobileNetV2, label-free: PTQ fidelity before and after a short distillation
fine-tune with R², and DKM palettization fine-tuned by distillation.

Model: torchvision's ImageNet MobileNetV2 (``mobilenet_v2-b0353104.pth``) loaded unchanged into the
zoo's ``mobilenet_v2``. Data: crops of natural photographs (``benchmarks/photos.py``) split by photo
into fine-tuning/calibration crops and held-out evaluation crops; no labels anywhere.

Rows: (a) the pretrained model; (b) after a label-free fine-tune with distillation to the frozen
float model only (the control); (c) distillation + each R² form (``linf``, ``margin``,
``soft_min_max``); (d) DKM palettization at 4/3/2 bits fine-tuned by distillation (next to
post-training k-means at the same bits). Fine-tunes use ``qready.train.fit`` with the ``Distill``
objective, SGD with momentum and a cosine schedule, BatchNorm statistics and dropout frozen (eval mode).
Columns: weight-only PTQ per channel (min-max and MSE ranges) at W8/W6/W4/W3, W8A8 and W4A8 (MSE
weight ranges, per-tensor MSE activation ranges calibrated on fine-tuning crops). Every cell compares
with the **original** float model on the held-out crops (``qready.evaluate.fidelity``): top-1
agreement on all crops / on the crops where the float model is confident (p ≥ 0.5), KL(float ‖ model)
in nats, output SQNR in dB. ``drift``: the fine-tuned float model against the original. Fine-tune
cost: process CPU time and wall time.

W8 study: the per-layer view of ``qready.evaluate.inspect.diagnose`` (KL of quantizing each layer
alone at W8), and W8 KL with the first depthwise layer kept in float and/or MSE ranges.

    python -m benchmarks.pretrained [--quick] [--steps N] [--lr LR] [--threads T]

Skips (exit 0, with a message) when the MobileNetV2 weights package or scikit-image is absent.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import RESULTS, markdown_table, save_results
from benchmarks.photos import PhotoSets, photo_sets, pretrained_mobilenet_v2
from qready import QuantSpec, ptq
from qready.evaluate.fidelity import FidelityMeter
from qready.evaluate.inspect import diagnose
from qready.models import freeze_batchnorm
from qready.quant.palettize import finalize_palettized, palettize
from qready.regularizers import build
from qready.train import TrainConfig, fit
from qready.train.distill import Distill

FIRST_DEPTHWISE = r"^features\.1\.conv\.0\.0$"
KEEP_FIRST_DEPTHWISE = {"exclude": (FIRST_DEPTHWISE,)}  # its 288 weights stay float
WEIGHT_BITS = (8, 6, 4, 3)
RANGES = ("minmax", "mse")
R2_FORMS = ("margin", "linf", "soft_min_max")  # in run order
DKM_BITS = (4, 3, 2)
EVAL_BATCH = 56
METRICS = ("agreement", "agreement_confident", "kl", "sqnr_db")


def columns() -> list[tuple[str, dict]]:
    """``(label, ptq keyword arguments)`` of every column."""
    cols = [(f"W{b}/{r}", {"spec": QuantSpec(bits=b, granularity="channel", range=r)})
            for r in RANGES for b in WEIGHT_BITS]
    act = QuantSpec(bits=8, symmetric=False, granularity="tensor", range="mse")
    for b in (8, 4):
        cols.append((f"W{b}A8", {"spec": QuantSpec(bits=b, granularity="channel", range="mse"), "act_spec": act}))
    for b in (4, 3):  # the 288 weights of the first depthwise layer kept in float
        cols.append((f"W{b}/mse*", {"spec": QuantSpec(bits=b, granularity="channel", range="mse"),
                                    "select": KEEP_FIRST_DEPTHWISE}))
    return cols


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode outputs ``[N, 1000]`` in batches."""
    model.eval()
    return torch.cat([model(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])


def fidelity_to(reference: torch.Tensor, model: nn.Module, x: torch.Tensor) -> dict:
    """Fidelity of ``model`` on ``x`` to the reference outputs (rounded for the tables)."""
    meter = FidelityMeter()
    meter.update(reference, logits(model, x))
    result = meter.result()
    return {k: (None if result[k] is None or math.isinf(result[k]) else round(float(result[k]), 4))
            for k in (*METRICS, "confident_n")}  # SQNR of identical outputs (inf) is stored as None


def ptq_columns(model: nn.Module, sets: PhotoSets, reference: torch.Tensor, calib: list[torch.Tensor],
                cols: Sequence[tuple[str, dict]]) -> dict[str, dict]:
    """``{column label: fidelity}`` of PTQ copies of ``model``."""
    out = {}
    for label, kwargs in cols:
        qmodel = ptq(model, calib=calib if "act_spec" in kwargs else None, **kwargs)
        out[label] = fidelity_to(reference, qmodel, sets.eval)
    return out


def fine_tune(model: nn.Module, sets: PhotoSets, args: argparse.Namespace,
              make_terms: Callable[[nn.Module], list], prepare: Callable[[nn.Module], nn.Module] | None = None,
              steps: int | None = None) -> tuple[nn.Module, dict]:
    """Distillation fine-tune of a copy of ``model`` (teacher: ``model`` itself, frozen) with the loss
    terms ``make_terms(copy)``; ``prepare`` (e.g. DKM palettization) runs after the teacher is taken.
    Returns the model and ``{cpu_s, wall_s, steps}``."""
    student = copy.deepcopy(model)
    objective = Distill(student)
    if prepare is not None:
        student = prepare(student)
    freeze_batchnorm(student)  # BatchNorm statistics and dropout in eval mode
    terms = make_terms(student)
    steps = steps or args.steps
    per_epoch = math.ceil(len(sets.tune) / args.batch)
    epochs = math.ceil(steps / per_epoch)
    optimizer = getattr(args, "optimizer", "sgd")
    cfg = TrainConfig(epochs=epochs, batch_size=args.batch, optimizer=optimizer, lr=args.lr,
                      momentum=0.9 if optimizer == "sgd" else 0.0, schedule="cosine", nonfinite="stop")
    loader = DataLoader(sets.tune, batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    cpu, wall = time.process_time(), time.perf_counter()
    fit(student, loader, cfg, objective=objective, loss_terms=terms, seed=0, progress=False)
    cost = {"cpu_s": round(time.process_time() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1),
            "steps": epochs * per_epoch}
    return student.eval(), cost


def w8_study(model: nn.Module, sets: PhotoSets, reference: torch.Tensor) -> dict:
    """Where the W8 error comes from, and remedies: per-layer KL (``diagnose``), first depthwise layer
    in float, MSE ranges, and both."""
    diag = diagnose(model, [sets.eval[::4]], bits=(8,), num_batches=1)  # every 4th held-out crop
    layers = sorted(diag.layers, key=lambda layer: -layer["fidelity"][8]["kl"])
    top = [{"layer": layer["name"], "kl": round(layer["fidelity"][8]["kl"], 4),
            "max_abs_over_std": round(layer["max_abs_over_std"], 2)} for layer in layers[:5]]
    remedies = {}
    for label, spec_range, exclude in [
        ("all layers, min-max", "minmax", ()),
        ("first depthwise layer only, min-max", "minmax", None),
        ("first depthwise layer in float, min-max", "minmax", (FIRST_DEPTHWISE,)),
        ("all layers, MSE", "mse", ()),
        ("first depthwise layer in float, MSE", "mse", (FIRST_DEPTHWISE,)),
    ]:
        select = {"include": (FIRST_DEPTHWISE,)} if exclude is None else {"exclude": exclude}
        qmodel = ptq(model, QuantSpec(bits=8, granularity="channel", range=spec_range), select=select)
        remedies[label] = fidelity_to(reference, qmodel, sets.eval)
    return {"top_layers": top, "remedies": remedies}


def run(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    """Measure everything; ``save(partial results)`` after each row."""
    torch.set_num_threads(args.threads)
    model = pretrained_mobilenet_v2()
    sets = photo_sets(size=args.size, tune_crops=args.tune_crops, eval_crops=args.eval_crops, seed=0)
    print(sets.describe(), flush=True)
    reference = logits(model, sets.eval)
    calib = [sets.tune[i:i + 16] for i in range(0, min(len(sets.tune), 4 * 16), 16)]  # activation ranges
    cols = columns()
    rows: dict[str, dict] = {}
    dkm: dict[str, dict] = {}
    res = {"setup": {"data": sets.describe(), "tune_photos": sets.tune_photos, "eval_photos": sets.eval_photos,
                     "steps": args.steps, "dkm_steps": args.dkm_steps, "batch": args.batch, "lr": args.lr,
                     "optimizer": "sgd momentum 0.9, cosine", "lambdas": args.lam, "threads": args.threads},
           "rows": rows, "dkm": dkm, "w8_study": None}

    def progress(name: str) -> None:
        print(f"{name}: done", flush=True)
        save(res)

    def record(name: str, m: nn.Module, cost: dict | None) -> None:
        start = time.perf_counter()
        drift = fidelity_to(reference, m, sets.eval)
        pairs = zip(m.state_dict().values(), model.state_dict().values(), strict=True)
        if m is not model and all(torch.equal(a, b) for a, b in pairs):
            ptq_cells = rows["(a) pretrained"]["ptq"]  # weights bit-identical to (a): same PTQ models
        else:
            ptq_cells = ptq_columns(m, sets, reference, calib, cols)
        rows[name] = {"drift": drift, "cost": cost, "ptq": ptq_cells}
        progress(name)
        print(f"{name}: drift KL {rows[name]['drift']['kl']}, W4/mse {rows[name]['ptq']['W4/mse']} "
              f"({time.perf_counter() - start:.0f}s eval)", flush=True)

    previous = RESULTS / "pretrained.json"
    old = json.loads(previous.read_text()) if args.reuse and previous.is_file() else None
    if old is not None and old["setup"]["data"] == sets.describe() and old["w8_study"] is not None:
        rows["(a) pretrained"] = old["rows"]["(a) pretrained"]  # no fine-tune: independent of the settings
        res["w8_study"] = old["w8_study"]
    else:
        record("(a) pretrained", model, None)
    # most informative first, so that a run cut short still answers the main questions
    for form in R2_FORMS:
        tuned, cost = fine_tune(model, sets, args,
                                lambda m, f=form: [build(f, m, weight=args.lam[f], select=KEEP_FIRST_DEPTHWISE)])
        record(f"(c) distill + {form} λ={args.lam[form]:g}", tuned, cost)
        if form == "margin":
            tuned, cost = fine_tune(model, sets, args, lambda m: [])
            record("(b) distill only", tuned, cost)
            if res["w8_study"] is None:
                res["w8_study"] = w8_study(model, sets, reference)
                progress("W8 study")
    for bits in DKM_BITS:
        kmeans = palettize(model, bits=bits, method="kmeans", select=KEEP_FIRST_DEPTHWISE)
        tuned, cost = fine_tune(model, sets, args, lambda m: [],
                                prepare=lambda m, b=bits: palettize(m, bits=b, method="dkm", select=KEEP_FIRST_DEPTHWISE,
                                                                    inplace=True),
                                steps=args.dkm_steps)
        dkm[str(bits)] = {"kmeans": fidelity_to(reference, kmeans, sets.eval),
                     "dkm": fidelity_to(reference, finalize_palettized(tuned), sets.eval), "cost": cost}
        progress(f"DKM {bits} bits")
    return res


def _cell(f: dict) -> str:
    conf = "-" if f["agreement_confident"] is None else f"{f['agreement_confident']:.1f}"
    sqnr = "∞" if f["sqnr_db"] is None else f"{f['sqnr_db']:.1f}"
    return f"{f['agreement']:.1f} / {conf} / {f['kl']:.3f} / {sqnr}"


def markdown(res: dict, targets: list[str]) -> str:
    s = res["setup"]
    labels = [label for label, _ in columns()]
    lines = [
        "# Pretrained MobileNetV2, label-free: PTQ fidelity, R² and DKM fine-tuned by distillation\n",
        f"Data: {s['data']}. Evaluation photos: {', '.join(s['eval_photos'])}.",
        f"Fine-tunes: {s['steps']} steps (DKM: {s['dkm_steps']}) of batch {s['batch']}, {s['optimizer']}, "
        f"lr {s['lr']:g}, BatchNorm and dropout frozen, `Distill` (KL to the frozen float model); "
        f"{s['threads']} CPU thread(s).",
        "Cells: top-1 agreement % (all / confident crops) / KL(float ‖ model) nats / output SQNR dB, against the "
        "original float model on the held-out crops. `*`: the first depthwise layer (`features.1.conv.0.0`, "
        "288 weights) kept in float. R² penalties leave that layer out too (see the W8 study).\n",
    ]
    header = ["row", "drift KL", "CPU s", *labels]
    body = []
    for name, row in sorted(res["rows"].items()):
        cpu = "-" if row["cost"] is None else f"{row['cost']['cpu_s']:.0f}"
        body.append([name, f"{row['drift']['kl']:.4f}", cpu, *(_cell(row["ptq"][c]) for c in labels)])
    lines += [markdown_table(header, body), ""]
    if res["dkm"]:
        lines.append("## DKM palettization fine-tuned by distillation (vs post-training k-means)\n")
        lines.append("One LUT per layer; the first depthwise layer stays float.\n")
        dkm_rows = [[f"{b} bits", _cell(v["kmeans"]), _cell(v["dkm"]), f"{v['cost']['cpu_s']:.0f}"]
                    for b, v in res["dkm"].items()]
        lines += [markdown_table(["LUT", "k-means (no fine-tune)", "DKM + distill", "CPU s"], dkm_rows), ""]
    study = res["w8_study"]
    if study is not None:
        lines.append("## W8: where the error comes from\n")
        lines.append("Largest KL from quantizing one layer alone at W8 (min-max, per channel), from `diagnose` on "
                     "every 4th held-out crop:\n")
        lines += [markdown_table(["layer", "KL", "max abs w / σ"],
                                 [[t["layer"], f"{t['kl']:.4f}", f"{t['max_abs_over_std']:.1f}"]
                                  for t in study["top_layers"]]), ""]
        lines += [markdown_table(["W8 variant (all held-out crops)", "cell"],
                                 [[k, _cell(v)] for k, v in study["remedies"].items()]), ""]
    missing = [r for r in ("(a)", "(b)", "(c) distill + linf", "(c) distill + margin", "(c) distill + soft_min_max")
               if not any(n.startswith(r) for n in res["rows"])]
    missing += [f"(d) DKM {b} bits" for b in DKM_BITS if str(b) not in res["dkm"]]
    missing += [] if study is not None else ["W8 study"]
    if missing:
        lines.append(f"**Incomplete run** (stopped before these were measured): {', '.join(missing)}.\n")
    diverged = [n for n, row in res["rows"].items() if row["drift"]["kl"] > 1.0]
    if diverged:
        lines.append(f"**Diverged fine-tunes** (drift KL > 1 nat: the float model itself no longer matches the "
                     f"original, so its PTQ cells say nothing about R²): {', '.join(sorted(diverged))}.\n")
    lines.append("## Targets\n")
    lines += [f"- {t}" for t in targets] or ["- (not measured yet)"]
    return "\n".join(lines) + "\n"


def _check(text: str, value: float | None, ok: bool) -> str:
    return f"{text}: measured {value} — {'met' if ok else 'NOT met'}"


def targets(res: dict) -> list[str]:
    """The issue's targets that the results so far can decide, each with the measured value."""
    out = []
    rows = res["rows"]
    if "(a) pretrained" in rows:
        pre_w8 = rows["(a) pretrained"]["ptq"]["W8/minmax"]["kl"]
        out.append(_check("W8 weight-only KL ≤ 0.02 (pretrained, min-max)", pre_w8, pre_w8 <= 0.02))
    if res["w8_study"] is not None:
        remedies = {k: v for k, v in res["w8_study"]["remedies"].items() if "only" not in k}  # whole-model variants
        label, best = min(remedies.items(), key=lambda kv: kv[1]["kl"])
        out.append(_check(f"W8 weight-only KL ≤ 0.02 with the best remedy ({label})", best["kl"], best["kl"] <= 0.02))
    r2_rows = [n for n in rows if n.startswith("(c)")]
    if not r2_rows:
        return out
    best_r2 = max(r2_rows, key=lambda n: rows[n]["ptq"]["W4/mse*"]["agreement_confident"] or 0)
    r2 = rows[best_r2]["ptq"]
    w4 = max((r2[c] for c in ("W4/minmax", "W4/mse", "W4/mse*")), key=lambda f: f["agreement_confident"] or 0)
    w4a8 = r2["W4A8"]["agreement_confident"] or 0
    w3 = max(r2[c]["agreement_confident"] or 0 for c in ("W3/minmax", "W3/mse", "W3/mse*"))
    drift = rows[best_r2]["drift"]["kl"]
    return out + [
        _check(f"W4 weight-only ≥ 90 % confident agreement after R² (best row: {best_r2})", w4["agreement_confident"],
               (w4["agreement_confident"] or 0) >= 90),
        _check("W4 weight-only KL ≤ 0.3 after R² (same cell)", w4["kl"], w4["kl"] <= 0.3),
        _check("W4A8 ≥ 85 % confident agreement after R²", w4a8, w4a8 >= 85),
        _check("W3 ≥ 75 % confident agreement after R² (stretch)", w3, w3 >= 75),
        _check("that fine-tuned float model within KL ≤ 0.05 of the original", drift, drift <= 0.05),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few crops and steps")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dkm-steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)  # 0.003 diverged (results of 2026-12-01)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--tune-crops", type=int, default=12)
    parser.add_argument("--eval-crops", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--linf", type=float, default=0.05)
    parser.add_argument("--margin", type=float, default=0.05)
    parser.add_argument("--soft-min-max", type=float, default=0.05)
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from results/<name>.json")
    parser.add_argument("--name", default="pretrained", help="results file name (default: pretrained)")
    parser.add_argument("--reuse", action="store_true",
                        help="take row (a) and the W8 study from results/pretrained.json when its data match")
    args = parser.parse_args()
    if args.render:
        res = json.loads((RESULTS / f"{args.name}.json").read_text())
        (RESULTS / f"{args.name}.md").write_text(markdown(res, targets(res)))
        return
    if args.quick:
        args.steps, args.dkm_steps, args.tune_crops, args.eval_crops, args.size = 4, 2, 2, 2, 96
    args.lam = {"linf": args.linf, "margin": args.margin, "soft_min_max": args.soft_min_max}

    def save(res: dict) -> None:
        text = markdown(res, targets(res))
        if args.quick:
            print(text)
        else:
            save_results(args.name, {**res, "targets": targets(res)}, text)

    save(run(args, save))


if __name__ == "__main__":
    main()
