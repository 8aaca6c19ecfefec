"""Mixed precision at equal BOPs: uniform bit widths vs the sensitivity search vs the REINFORCE search.

Small nets (digits ``dwcnn``, MNIST-1D ``cnn1d``; 3 seeds): per seed a float model is trained with the
setup's schedule (``benchmarks/common.py``). Budgets: the BOPs of the uniform W3A3 and W4A4 models
(first and last layer at 8 bits, inputs at the weight bits). Each search (candidate bits {2,3,4,5} per
searched layer, weights and inputs, sharpness-aware cross-entropy with ρ = 0.05 on 2 training
batches; REINFORCE: 20 updates of 8 samples, its other defaults) picks a configuration within the budget; it is prepared with ``prepare_mixed(method="lsq")``
and fine-tuned exactly like the uniform models (``benchmarks/saq.py``: LSQ, Adam lr 1e-3, cosine,
5 epochs), then finalized and evaluated on the test split.

Pretrained MobileNetV2 (torchvision's ImageNet weights), weight-only, label-free: crops of natural
photographs (``benchmarks/photos.py``; calibration/search crops and held-out evaluation crops come
from different photos). Budgets: the BOPs of uniform W3 and W4 weights over every Conv/Linear layer
(activations float, counted as 32 bits). Each search minimises the KL divergence from the float
model's outputs (``loss="kl"``, ρ = 0: the plain loss) on one batch of 16 calibration crops over
bits {2,4,8} (REINFORCE: 40 updates of 8 samples, supernet quantizers STE with MSE ranges, per
channel); the configuration is applied with ``ptq_mixed`` (per-channel symmetric MSE weights, as the
uniform PTQ) and, separately, fine-tuned by a short label-free distillation QAT (``prepare_mixed``
with STE per-channel weight quantizers and MSE ranges, so training starts exactly at the PTQ model;
weight-only; teacher: the float model; Adam, cosine, BatchNorm frozen; every configuration, uniform
ones included, gets the same steps on the calibration crops). ``--reuse-searches`` takes the searched
configurations from the saved results (same budgets) and only re-scores them.
Crops are 128 px (a compromise for the 2-core CPU; fidelity is measured at the same resolution for
every configuration, so the comparison stays fair). Fidelity to the float model on the held-out
crops: top-1 agreement, KL, SQNR.

    python -m benchmarks.mixed_search [--quick] [--part small|mobilenet|all]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from benchmarks.common import RESULTS, SETUPS, loaders, markdown_table, mean_std, save_results, train
from benchmarks.saq import _finetune as finetune
from qready.quant import QuantSpec, Selector, prepare_qat, ptq
from qready.sharpness import bops, prepare_mixed, ptq_mixed, search_mixed_precision
from qready.sharpness.bops import LAYER_TYPES, layer_macs
from qready.sharpness.mixed_report import plot_frontier

SEARCHES = ("sensitivity", "reinforce")
BUDGETS = (3, 4)
FIRST_LAST = 8
SMALL = {"bits": (2, 3, 4, 5), "rho": 0.05, "batches": 2}
SMALL_REINFORCE = {"steps": 20, "samples": 8}
UNIFORM_SMALL = BUDGETS
MOBILE = {"bits": (2, 4, 8), "rho": 0.0, "batches": 1, "loss": "kl", "a_bits": None}
MOBILE_SIZE, MOBILE_BATCH = 128, 16
MOBILE_QAT = {"steps": 40, "batch": 16, "lr": 1e-4, "optimizer": "adam"}
UNIFORM_MOBILE = (2, 3, 4, 8)
MOBILE_REINFORCE = {"steps": 40, "samples": 8, "method": "ste", "range_method": "mse", "granularity": "channel"}
WEIGHT_SPEC = QuantSpec(bits=8, granularity="channel", range="mse")


def _search(model: nn.Module, calib, shape, target: float, search: str, **kwargs) -> dict:
    """The search's summary (``MixedPrecisionResult.to_dict``; REINFORCE history reduced to its last step)."""
    result = search_mixed_precision(model, calib, shape, target, search=search, **kwargs)
    summary = result.to_dict(layer_macs(model, shape), kwargs.get("a_bits", "same"))
    return summary | {"history": result.history[-1:]}


# --------------------------------------------------------------------------- small nets


def small_job(setup_name: str, seed: int, base_epochs: int, qat_epochs: int, reinforce: dict) -> dict:
    """One dataset and seed: uniform W3/W4 and, per budget, both searches' configurations after QAT."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    setup = SETUPS[setup_name]
    model, final = train(setup, seed, epochs=base_epochs)
    splits, train_loader, _ = loaders(setup, seed)
    shape = tuple(splits.input_shape)
    layers = [item.name for item in Selector(types=LAYER_TYPES).select(model)]
    edge = {layers[0], layers[-1]}
    row: dict = {"fp": final["val_acc"], "uniform": {}, "mixed": {}}
    for b in UNIFORM_SMALL:
        config = {n: FIRST_LAST if n in edge else b for n in layers}
        _, calib, _ = loaders(setup, seed)
        qmodel = prepare_qat(model, method="lsq", w_bits=b, a_bits=b, first_last=FIRST_LAST, calib=calib)
        row["uniform"][b] = {"bops": bops(model, shape, config, config).total,
                             "accuracy": finetune(qmodel, setup_name, seed, qat_epochs, None)}
    select = Selector(types=LAYER_TYPES, first_last=FIRST_LAST)
    for b in BUDGETS:
        target = row["uniform"][b]["bops"]
        for search in SEARCHES:
            found = _search(model, train_loader, shape, target, search, select=select, **SMALL,
                                  **(dict(reinforce, seed=seed) if search == "reinforce" else {}))
            _, calib, _ = loaders(setup, seed)  # the same calibration batches as the uniform models
            qmodel = prepare_mixed(model, found["config"], method="lsq", calib=calib)
            found["accuracy"] = finetune(qmodel, setup_name, seed, qat_epochs, None)
            row["mixed"][f"W{b}/{search}"] = found
    print(f"{setup_name} seed {seed}: FP {row['fp']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def small(setups: Sequence[str], seeds: Sequence[int], base_epochs: dict, qat_epochs: int, reinforce: dict,
          keep: Callable[[dict], None]) -> dict:
    """``{setup: [row per seed]}``; ``keep`` receives the results after every job (a long run keeps what it has)."""
    out: dict = {}
    for s in setups:
        for seed in seeds:
            out.setdefault(s, []).append(small_job(s, seed, base_epochs[s], qat_epochs, reinforce))
            keep(out)
    return out


# --------------------------------------------------------------------------- pretrained MobileNetV2


def mobilenet(quick: bool, saved: dict | None = None) -> dict:
    """Uniform PTQ and both searches at the uniform W3/W4 budgets, weight-only, fidelity on held-out crops."""
    from types import SimpleNamespace

    from benchmarks.photos import photo_sets, pretrained_mobilenet_v2
    from benchmarks.pretrained import fine_tune
    from qready.evaluate.fidelity import fidelity

    torch.set_num_threads(2)
    model = pretrained_mobilenet_v2()
    sets = photo_sets(size=MOBILE_SIZE, tune_crops=4 if quick else 8, eval_crops=4 if quick else 24)
    qat_args = SimpleNamespace(**dict(MOBILE_QAT, steps=2 if quick else MOBILE_QAT["steps"]))
    calib = [sets.tune[i:i + MOBILE_BATCH] for i in range(0, len(sets.tune), MOBILE_BATCH)]
    evaluation = [sets.eval[i:i + 64] for i in range(0, len(sets.eval), 64)]
    shape = tuple(sets.tune.shape[1:])
    layers = [item.name for item in Selector(types=LAYER_TYPES).select(model)]
    out: dict = {"data": sets.describe(), "layers": len(layers), "uniform": {}, "mixed": {}}

    def score(qmodel: nn.Module) -> dict:
        f = fidelity(model, qmodel, evaluation)
        return {k: f[k] for k in ("agreement", "kl", "sqnr_db")}

    def after_qat(config: dict[str, int]) -> dict:
        """Fidelity after the short distillation QAT of ``config`` (weight-only STE, MSE ranges, per channel)."""
        tuned, cost = fine_tune(model, sets, qat_args, lambda m: [], prepare=lambda m: prepare_mixed(
            m, config, method="ste", a_bits=None, inplace=True, w_granularity="channel", range="mse"))
        return score(tuned) | {"cpu_s": cost["cpu_s"], "steps": cost["steps"]}

    for b in UNIFORM_MOBILE:
        qmodel = ptq(model, QuantSpec(bits=b, granularity="channel", range="mse"), select=Selector(types=LAYER_TYPES))
        out["uniform"][b] = {"bops": bops(model, shape, dict.fromkeys(layers, b), 32).total, **score(qmodel)}
        if b in BUDGETS:
            out["uniform"][b]["qat"] = after_qat(dict.fromkeys(layers, b))
    options = dict(MOBILE, bits=(2, 4, 8)) if quick else MOBILE
    for b in BUDGETS:
        for search in SEARCHES:
            extra = (dict(MOBILE_REINFORCE, steps=2) if quick else MOBILE_REINFORCE) if search == "reinforce" else {}
            old = (saved or {}).get("mixed", {}).get(f"W{b}/{search}")
            if old is not None and old["target"] == out["uniform"][b]["bops"]:
                found = {k: v for k, v in old.items() if k not in ("qat", "agreement", "kl", "sqnr_db")}
            else:
                found = _search(model, calib, shape, out["uniform"][b]["bops"], search, **options, **extra)
            found |= score(ptq_mixed(model, found["config"], WEIGHT_SPEC))
            found["qat"] = after_qat(found["config"])
            out["mixed"][f"W{b}/{search}"] = found
            print(f"mobilenet W{b} {search}: agreement {found['agreement']:.1f}, after QAT {found['qat']['agreement']:.1f} "
                  f"({found['seconds']:.0f} s)", flush=True)
    return out


# --------------------------------------------------------------------------- report


def _bits_summary(config: dict[str, int]) -> str:
    counts: dict[int, int] = {}
    for b in config.values():
        counts[b] = counts.get(b, 0) + 1
    return " ".join(f"{b}b×{n}" for b, n in sorted(counts.items()))


def _verdict(label: str, wins: dict[str, list[float]]) -> str:
    lines = []
    for key, diffs in wins.items():
        better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        lines.append(f"- {label} {key}: mean {statistics.mean(diffs):+.2f} points vs uniform; better in {better}, "
                     f"worse in {worse}, equal in {len(diffs) - better - worse} of {len(diffs)} seeds")
    return "\n".join(lines)


def small_markdown(results: dict, seeds: Sequence[int]) -> list[str]:
    parts = []
    for setup_name, rows in results.items():
        parts.append(f"## {setup_name} ({SETUPS[setup_name].model}), FP {mean_std([r['fp'] for r in rows])}\n")
        header = ["budget", "uniform", *[f"{s}" for s in SEARCHES], *[f"{s} search (s)" for s in SEARCHES]]
        lines, diffs = [], {}
        for b in BUDGETS:
            uni = [r["uniform"][b]["accuracy"] for r in rows]
            cells = [f"W{b}A{b} BOPs", mean_std(uni)]
            for s in SEARCHES:
                acc = [r["mixed"][f"W{b}/{s}"]["accuracy"] for r in rows]
                cells.append(mean_std(acc))
                diffs[f"W{b} {s}"] = [a - u for a, u in zip(acc, uni, strict=True)]
            cells += [f"{statistics.mean(r['mixed'][f'W{b}/{s}']['seconds'] for r in rows):.1f}" for s in SEARCHES]
            lines.append(cells)
        parts.append("Test accuracy (%) after LSQ QAT, mean ± std over seeds:\n")
        parts.append(markdown_table(header, lines))
        parts.append("Paired difference to uniform at the same budget (seeds):\n")
        parts.append(_verdict(setup_name, diffs) + "\n")
        parts.append("Configurations (bits per layer, model order; BOPs / budget; the search's own loss of its choice -- "
                     "not comparable across searches: PTQ views with MSE ranges vs the supernet's LSQ quantizers):\n")
        lines = []
        for i, r in enumerate(rows):
            for key, m in r["mixed"].items():
                config = " ".join(str(v) for v in m["config"].values())
                lines.append([seeds[i], key, config, f"{m['bops_ratio']:.3f}", f"{m['loss']:.4f}", f"{m['accuracy']:.2f}"])
        parts.append(markdown_table(["seed", "budget/search", "bits", "BOPs/T", "search loss", "accuracy"], lines))
        lines = [[f"W{b}A{b}", f"{statistics.mean(r['uniform'][b]['bops'] for r in rows):.3g}",
                  mean_std([r["uniform"][b]["accuracy"] for r in rows])] for b in UNIFORM_SMALL]
        parts.append("Uniform frontier:\n")
        parts.append(markdown_table(["uniform", "BOPs", "accuracy"], lines))
    return parts


def mobile_markdown(res: dict) -> list[str]:
    parts = [f"## Pretrained MobileNetV2, weight-only PTQ, label-free ({res['layers']} layers)\n",
             f"Data: {res['data']}. Fidelity to the float model on the held-out crops.\n"]
    header = ["configuration", "BOPs (G)", "PTQ agreement (%)", "PTQ KL", "PTQ SQNR (dB)",
              "QAT agreement (%)", "QAT KL", "search (s)", "bits used"]

    def qat_cells(row: dict) -> list[str]:
        q = row.get("qat")
        return [f"{q['agreement']:.1f}", f"{q['kl']:.4f}"] if q else ["", ""]

    lines = [[f"uniform W{b}", f"{u['bops'] / 1e9:.2f}", f"{u['agreement']:.1f}", f"{u['kl']:.4f}",
              f"{u['sqnr_db']:.2f}", *qat_cells(u), "", ""] for b, u in res["uniform"].items()]
    for key, m in res["mixed"].items():
        lines.append([key, f"{m['bops'] / 1e9:.2f}", f"{m['agreement']:.1f}", f"{m['kl']:.4f}", f"{m['sqnr_db']:.2f}",
                      *qat_cells(m), f"{m['seconds']:.0f}", _bits_summary(m["config"])])
    parts.append(markdown_table(header, lines))
    for key, m in res["mixed"].items():
        top = sorted(m["layers"], key=lambda r: -r["bits"])[:6]
        parts.append(f"- {key}: widest layers " + ", ".join(f"`{r['name']}` {r['bits']}b" for r in top))
        rows = [r for r in m["layers"] if "sensitivity" in r]
        if rows:
            low = min(rows[0]["sensitivity"])
            worst = sorted(rows, key=lambda r: -r["sensitivity"][low])[:5]
            total = sum(r["sensitivity"][low] for r in rows)
            parts.append(f"  - most sensitive at {low} bits (Δ KL, share of the sum): " + ", ".join(
                f"`{r['name']}` {r['sensitivity'][low]:.3f} ({100 * r['sensitivity'][low] / total:.0f} %)"
                for r in worst))
    parts.append("")
    return parts


def frontier_points(results: dict) -> dict[str, list[dict]]:
    """Per panel (dataset or MobileNetV2): points ``{method, bops, value}`` for :func:`plot_frontier`."""
    panels: dict[str, list[dict]] = {}
    for setup_name, rows in results.get("small", {}).items():
        points = panels.setdefault(f"{setup_name}: accuracy (%)", [])
        for b in UNIFORM_SMALL:
            points.append({"method": "uniform", "bops": rows[0]["uniform"][b]["bops"],
                           "value": statistics.mean(r["uniform"][b]["accuracy"] for r in rows)})
        for b in BUDGETS:
            for s in SEARCHES:
                ms = [r["mixed"][f"W{b}/{s}"] for r in rows]
                points.append({"method": s, "bops": statistics.mean(m["bops"] for m in ms),
                               "value": statistics.mean(m["accuracy"] for m in ms)})
    if "mobilenet" in results:
        res = results["mobilenet"]
        points = panels.setdefault("MobileNetV2: agreement (%)", [])
        points += [{"method": "uniform", "bops": u["bops"], "value": u["agreement"]} for u in res["uniform"].values()]
        points += [{"method": key.split("/")[1], "bops": m["bops"], "value": m["agreement"]}
                   for key, m in res["mixed"].items()]
        qat = [(u, "uniform") for b, u in res["uniform"].items() if "qat" in u]
        qat += [(m, key.split("/")[1]) for key, m in res["mixed"].items() if "qat" in m]
        if qat:
            panels["MobileNetV2 after distillation QAT: agreement (%)"] = [
                {"method": method, "bops": row["bops"], "value": row["qat"]["agreement"]} for row, method in qat]
    return panels


def _int_keys(obj):
    """JSON turned the int keys (bit widths) into strings; turn them back."""
    if isinstance(obj, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_int_keys(v) for v in obj]
    return obj


def verdict(payload: dict) -> list[str]:
    """Which configuration wins each (task, budget) cell, and whether mixed precision beats uniform."""
    cells, beats = [], 0
    for setup_name, rows in payload.get("small", {}).items():
        for b in BUDGETS:
            means = {"uniform": statistics.mean(r["uniform"][b]["accuracy"] for r in rows)}
            means |= {s: statistics.mean(r["mixed"][f"W{b}/{s}"]["accuracy"] for r in rows) for s in SEARCHES}
            cells.append((f"{setup_name} W{b}A{b} budget (accuracy, mean of seeds)", means, 1))
    if "mobilenet" in payload:
        res = payload["mobilenet"]
        for b in BUDGETS:
            for stage in ("PTQ", "QAT"):
                rows = {"uniform": res["uniform"][b]} | {s: res["mixed"][f"W{b}/{s}"] for s in SEARCHES}
                if stage == "QAT":
                    if not all("qat" in r for r in rows.values()):
                        continue
                    rows = {k: r["qat"] for k, r in rows.items()}
                for metric, sign in (("agreement", 1), ("kl", -1)):
                    means = {k: r[metric] for k, r in rows.items()}
                    cells.append((f"MobileNetV2 W{b} weight budget, after {stage} ({metric} to float)", means, sign))
    lines = ["## Verdict\n"]
    for label, means, sign in cells:  # sign: 1 higher is better, -1 lower is better
        best = max(sign * v for v in means.values()) * sign
        winners = [k for k, v in means.items() if v == best]
        mixed_wins = [s for s in SEARCHES if sign * means[s] > sign * means["uniform"]]
        beats += bool(mixed_wins)
        lines.append(f"- {label}: best {' = '.join(winners)} ({best:.4g}); "
                     + ", ".join(f"{k} {v:.4g}" for k, v in means.items())
                     + (f"; mixed beats uniform ({', '.join(mixed_wins)})" if mixed_wins else "; mixed does not beat uniform"))
    lines.append(f"\nMixed precision beats uniform at equal BOPs in {beats} of {len(cells)} cells (by the mean; "
                 "see the paired differences for the spread over seeds).\n")
    return lines


def render(name: str, payload: dict) -> None:
    """Write ``results/<name>.json``, ``.md`` and the frontier plot ``.png`` from ``payload``."""
    meta = payload["settings"]
    parts = ["# Mixed precision: uniform vs sensitivity search vs REINFORCE at equal BOPs\n",
             f"Settings: {meta}.\n"]
    if "small" in payload:
        parts += small_markdown(payload["small"], meta["seeds"])
    if "mobilenet" in payload:
        parts += mobile_markdown(payload["mobilenet"])
    parts += verdict(payload)
    plot = plot_frontier(frontier_points(payload), RESULTS / f"{name}.png")
    parts.append(f"\n![frontier]({plot.name})\n")
    save_results(name, payload, "\n".join(parts))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits, 1 seed, short training: a smoke check")
    parser.add_argument("--part", choices=("small", "mobilenet", "all"), default="all")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md/.png from the saved .json")
    parser.add_argument("--reuse-searches", action="store_true",
                        help="MobileNetV2: take the searched configurations from the saved results, re-score them")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    name = "mixed_search_quick" if args.quick else "mixed_search"
    previous = RESULTS / f"{name}.json"
    seeds = [0] if args.quick else [0, 1, 2]
    setups = ["digits"] if args.quick else ["digits", "mnist1d"]
    base_epochs = {s: 2 if args.quick else SETUPS[s].epochs for s in setups}
    qat_epochs = 1 if args.quick else 5
    payload: dict = {"settings": {
        "seeds": seeds, "base_epochs": base_epochs, "qat_epochs": qat_epochs, "first_last": FIRST_LAST,
        "small_search": {k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()},
        "mobilenet_search": {k: list(v) if isinstance(v, tuple) else v for k, v in MOBILE.items()},
        "small_reinforce": SMALL_REINFORCE, "mobilenet_reinforce": MOBILE_REINFORCE,
        "mobilenet_qat": MOBILE_QAT, "mobilenet_size": MOBILE_SIZE}}
    if previous.is_file() and (args.render or args.part != "all"):  # keep the other part of an earlier run
        kept = json.loads(previous.read_text())
        payload |= {k: _int_keys(kept[k]) for k in ("small", "mobilenet") if k in kept}
    if not args.render and args.part in ("small", "all"):
        reinforce = dict(SMALL_REINFORCE, steps=3) if args.quick else SMALL_REINFORCE
        payload["small"] = small(setups, seeds, base_epochs, qat_epochs, reinforce,
                                 lambda partial: save_results(name, payload | {"small": partial}, "(running)"))
    if not args.render and args.part in ("mobilenet", "all"):
        saved = _int_keys(json.loads(previous.read_text())).get("mobilenet") if args.reuse_searches and previous.is_file() else None
        payload["mobilenet"] = mobilenet(args.quick, saved)
    render(name, payload)
    print((RESULTS / f"{name}.md").read_text())
    print(f"wrote {RESULTS / name}.json/.md/.png ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
