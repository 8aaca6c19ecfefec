"""Performance round, one run side by side (the machine's 1-minute load average printed with each timing):

* **grad-ℓ1 step cost**: plain, exact (double backprop) and finite-difference steps of ResNet-20
  (batch 32 of 3x32x32, SGD), interleaved, medians (``benchmarks.grad_l1.step_cost``); target: the
  finite-difference step ≤ 2.1× the plain step.
* **DKM memory and time**: one training step (forward, backward, SGD; batch 64) of a 4-bit palettized
  ``Linear(n, n)``, n = 1024 and 2048, qready's DKM versus coremltools' ``DKMPalettizer``, each in a
  fresh subprocess (resident-set high-water mark reset right before the measured second step; see
  ``benchmarks.palettize``). Times come from a second subprocess with glibc's default allocator
  (the memory probe makes every large block a fresh ``mmap``, which inflates allocation-heavy step
  times). Also the first step: palettizing the layer (initial k-means) plus one step. Targets: peak added memory ≤ 3× the layer's fp32 bytes, step ≤ 200 ms at 1M weights, first
  step ≤ 2 s at 4M weights.
* **``qready demo``** wall time (a fresh process, as a user runs it); target ≤ 60 s.
* **GPTQ time** of the pretrained MobileNetV2 (W4 per channel + bias correction, 256 calibration crops
  of natural photographs at 160 and 224 px, two threads); targets ≤ 60 s, ≤ 1 GB extra memory.
* **PTQ time** of MobileNetV2 (ImageNet stem, 1000 classes, random init) with min-max, MSE and
  percentile ranges (4-bit per-channel weights, 8-bit per-tensor activations, 2 calibration batches of
  8 x 3 x 224 x 224), interleaved, medians of 3; target: MSE ≤ 3× min-max.

    python -m benchmarks.perf [--quick] [--sections grad_l1 dkm demo ptq gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks import common, grad_l1
from benchmarks.palettize import _rss_kb, training_step

ROOT = Path(__file__).resolve().parent.parent
DKM_SIZES = (1024, 2048)
DKM_IMPLS = ("none", "ours", "coremltools")
RANGES = ("minmax", "mse", "percentile")
SECTIONS = ("grad_l1", "dkm", "demo", "ptq", "gptq")
GPTQ_SIZES = (160, 224)


def load() -> float:
    return os.getloadavg()[0]


# ---- DKM: one subprocess per (implementation, size) ---------------------------------------------

def dkm_probe(impl: str, n: int, repeats: int) -> dict:
    """Palettize ``Linear(n, n)`` at 4 bits, step it; peak added resident memory of the second step."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    layer = nn.Linear(n, n)
    x = torch.randn(64, n)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # torch's one-off lazy imports, not timed
    start, start_cpu = time.perf_counter(), time.process_time()
    step = training_step(impl, layer, x)
    step()
    first_step_s, first_step_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")
    step()
    peak_mb = (_rss_kb("VmHWM") - before) / 1024
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"peak_mb": peak_mb, "step_s": statistics.median(wall), "step_cpu_s": statistics.median(cpu),
            "first_step_s": first_step_s, "first_step_cpu_s": first_step_cpu_s, "load_avg_1min": load()}


def _probe(impl: str, n: int, repeats: int, memory: bool) -> dict:
    """Run :func:`dkm_probe` in a fresh subprocess (``memory``: with the resident-set allocator setting)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.perf", "--dkm-probe", impl, str(n), str(repeats)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"skipped": ((proc.stderr.strip().splitlines() or ["no output"])[-1])[:300]}


def dkm(quick: bool, impls: tuple[str, ...] = DKM_IMPLS) -> list[dict]:
    rows = []
    for n in DKM_SIZES:
        for impl in impls:
            repeats = 1 if (quick or impl == "coremltools") else 5
            row = {"impl": impl, "n": n, "weights": n * n, "fp32_mb": n * n * 4 / 2**20}
            mem = _probe(impl, n, 1, memory=True)
            timed = _probe(impl, n, repeats, memory=False) if "skipped" not in mem else mem
            if "skipped" in timed:
                row["skipped"] = timed["skipped"]
                print(f"DKM {impl} {n}x{n} skipped: {row['skipped']}", flush=True)
            else:
                row |= {"peak_mb": mem["peak_mb"], **{k: timed[k] for k in
                                                      ("step_s", "step_cpu_s", "first_step_s", "first_step_cpu_s",
                                                       "load_avg_1min")}}
                print(f"DKM {impl} {n}x{n}: peak {row['peak_mb']:.1f} MB, step {1000 * row['step_s']:.0f} ms "
                      f"(CPU {1000 * row['step_cpu_s']:.0f} ms), "
                      f"first step {row['first_step_s']:.2f} s (load {row['load_avg_1min']:.1f})", flush=True)
            rows.append(row)
    return rows


# ---- demo and PTQ ---------------------------------------------------------------------------------

def demo_wall() -> dict:
    """Wall time of ``python -m qready demo`` in a fresh process (two threads, the machine's cores)."""
    with tempfile.TemporaryDirectory() as folder:
        load_before = load()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qready", "demo", "--out", str(Path(folder) / "demo")],
                              capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"skipped": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    out = {"wall_s": wall, "load_avg_before": load_before, "load_avg_1min": load()}
    print(f"demo: {wall:.1f} s (load {load_before:.1f} -> {out['load_avg_1min']:.1f})", flush=True)
    return out


def ptq_times(repeats: int) -> dict:
    """Median PTQ seconds per range method on MobileNetV2, the methods interleaved."""
    from qready import create_model
    from qready.quant import QuantSpec, ptq

    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=1000, stem="imagenet").eval()
    calib = [torch.randn(8, 3, 224, 224) for _ in range(2)]

    def run(rng: str):
        return lambda: ptq(model, QuantSpec(bits=4, granularity="channel", range=rng), calib=calib,
                           act_spec=QuantSpec(bits=8, granularity="tensor", symmetric=False, range=rng),
                           calib_batches=2)

    times = common.interleaved_medians({rng: run(rng) for rng in RANGES}, repeats=repeats, warmup=1)
    out = {"seconds": times, "ratio_to_minmax": {r: times[r] / times["minmax"] for r in RANGES},
           "threads": torch.get_num_threads(), "load_avg_1min": load()}
    print("PTQ MobileNetV2: " + ", ".join(f"{r} {times[r]:.2f} s" for r in RANGES) +
          f" (load {out['load_avg_1min']:.1f})", flush=True)
    return out


def gptq_time(sizes: tuple[int, ...] = GPTQ_SIZES) -> dict:
    """Wall/CPU seconds of GPTQ + bias correction (W4 per channel) on the pretrained MobileNetV2 with 256
    calibration crops of natural photographs (two threads), per crop size; peak extra memory."""
    from benchmarks.gptq import timed_ptq
    from benchmarks.photos import find_mobilenet_v2_weights, photo_sets, pretrained_mobilenet_v2
    from qready.quant import QuantSpec

    if find_mobilenet_v2_weights(required=False) is None:
        return {"skipped": "the MobileNetV2 weights package is not installed"}
    torch.set_num_threads(2)
    model = pretrained_mobilenet_v2()
    out = {}
    for size in sizes:
        calib = list(photo_sets(size=size, tune_crops=19, eval_crops=1, seed=0).tune[:256].split(32))
        _, cost = timed_ptq(model, QuantSpec(bits=4, granularity="channel"), calib, method="gptq", bias_correction=True)
        out[str(size)] = cost
        print(f"GPTQ MobileNetV2 {size} px: {cost}", flush=True)
    torch.set_num_threads(1)
    return out


# ---- report ---------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def markdown(results: dict) -> str:
    out = ["# Performance round: one run, side by side\n",
           "CPU, shared 2-core machine: the 1-minute load average is printed with each timing; timings are "
           "medians of interleaved repeats unless said otherwise.\n",
           "## Gradient-ℓ1 step cost (ResNet-20, batch 32 of 3x32x32, SGD step included)\n"]
    rows = []
    for c in results.get("grad_l1", []):
        rows.append(["weights" if c["act_weight"] == 0 else "weights + activations", str(c["threads"]),
                     f"{1000 * c['plain_s']:.1f}", f"{1000 * c['grad_l1_s']:.1f}", f"{c['ratio']:.2f}×",
                     f"{1000 * c['fd_s']:.1f}", f"{c['fd_ratio']:.2f}×", verdict(c["fd_ratio"] <= 2.1),
                     f"{c['load_avg_1min']:.1f}"])
    out.append(common.markdown_table(["term", "threads", "plain ms", "exact ms", "exact ratio",
                                      "finite-difference ms", "fd ratio", "fd ≤ 2.1×", "load avg"], rows))
    out.append("\n## DKM 4-bit, one training step of Linear(n, n), batch 64, one thread\n")
    out.append("Peak added memory: resident-set high-water mark of the measured step minus the resident set "
               "before it (fresh subprocess per row). Step: median wall time, and the process's CPU time (one "
               "thread), which a busy machine inflates far less. First step: palettizing the layer (initial "
               "k-means) + one step, wall (CPU) seconds. Targets: peak ≤ 3× the layer's fp32 bytes; step ≤ 200 ms at "
               "1M weights (judged on CPU time when the load average is high); first step ≤ 2 s at 4M weights.\n")
    rows = []
    for r in results.get("dkm", []):
        if "skipped" in r:
            rows.append([r["impl"], f"{r['n']}²", f"{r['fp32_mb']:.1f}", "-", "-", "-", "-", "-", "-", r["skipped"]])
            continue
        checks = []
        cpu = r.get("step_cpu_s", r["step_s"])
        if r["impl"] == "ours":
            checks.append(f"memory {verdict(r['peak_mb'] <= 3 * r['fp32_mb'])}")
            if r["n"] == 1024:
                checks.append(f"step (wall) {verdict(r['step_s'] <= 0.2)}, step (CPU) {verdict(cpu <= 0.2)}")
            if r["n"] == 2048:
                checks.append(f"first step (wall) {verdict(r['first_step_s'] <= 2.0)}, "
                              f"(CPU) {verdict(r.get('first_step_cpu_s', r['first_step_s']) <= 2.0)}")
        rows.append([r["impl"], f"{r['n']}²", f"{r['fp32_mb']:.1f}", f"{r['peak_mb']:.1f}",
                     f"{r['peak_mb'] / r['fp32_mb']:.2f}×", f"{1000 * r['step_s']:.0f}", f"{1000 * cpu:.0f}",
                     f"{r['first_step_s']:.2f} ({r.get('first_step_cpu_s', r['first_step_s']):.2f} CPU)",
                     f"{r['load_avg_1min']:.1f}", ", ".join(checks)])
    out.append(common.markdown_table(["implementation", "layer", "fp32 MB", "peak added MB", "× fp32",
                                      "step ms", "step CPU ms", "first step s", "load avg", "targets"], rows))
    ours = {r["n"]: r for r in results.get("dkm", []) if r["impl"] == "ours" and "skipped" not in r}
    theirs = {r["n"]: r for r in results.get("dkm", []) if r["impl"] == "coremltools" and "skipped" not in r}
    for n in sorted(set(ours) & set(theirs)):
        out.append(f"\n{n}²: coremltools / qready peak memory {theirs[n]['peak_mb'] / max(ours[n]['peak_mb'], 1e-9):.0f}×, "
                   f"step time {theirs[n]['step_s'] / ours[n]['step_s']:.0f}×.")
    demo = results.get("demo", {"skipped": "not run yet"})
    out.append("\n\n## `qready demo` wall time (fresh process, two threads)\n")
    if "skipped" in demo:
        out.append(f"skipped: {demo['skipped']}\n")
    else:
        out.append(f"{demo['wall_s']:.1f} s (target ≤ 60 s: {verdict(demo['wall_s'] <= 60)}); load average "
                   f"{demo['load_avg_before']:.1f} before, {demo['load_avg_1min']:.1f} after.\n")
    g = results.get("gptq")
    if g is not None:
        out.append("\n\n## GPTQ + bias correction of the pretrained MobileNetV2 (W4 per channel, 256 calibration "
                   "crops, two threads)\n")
        if "skipped" in g:
            out.append(f"skipped: {g['skipped']}\n")
        else:
            out.append(common.markdown_table(
                ["crop px", "wall s", "CPU s", "peak extra MB", "load avg", "≤ 60 s", "≤ 1 GB"],
                [[size, f"{c['wall_s']:.1f}", f"{c['cpu_s']:.1f}", f"{c['peak_extra_mb']:.0f}", f"{c['load_avg']:.1f}",
                  verdict(c["wall_s"] <= 60), verdict(c["peak_extra_mb"] <= 1024)] for size, c in g.items()]))
    if "ptq" not in results:
        return "\n".join(out) + "\n"
    p = results["ptq"]
    out.append("\n## PTQ of MobileNetV2 (random init), 4-bit per-channel weights, 8-bit activations, "
               "2 calibration batches of 8 x 3 x 224 x 224\n")
    out.append(common.markdown_table(
        ["range", "seconds", "× min-max", "load avg"],
        [[r, f"{p['seconds'][r]:.2f}", f"{p['ratio_to_minmax'][r]:.2f}×", f"{p['load_avg_1min']:.1f}"] for r in RANGES]))
    out.append(f"\nMSE ≤ 3× min-max: {verdict(p['ratio_to_minmax']['mse'] <= 3)}; "
               f"percentile ≤ 3× min-max: {verdict(p['ratio_to_minmax']['percentile'] <= 3)}.")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections, updating the others' figures from the last results file")
    parser.add_argument("--dkm-impls", nargs="+", choices=DKM_IMPLS, default=list(DKM_IMPLS),
                        help="DKM implementations to measure (coremltools takes minutes per size)")
    parser.add_argument("--dkm-probe", nargs=3, metavar=("IMPL", "N", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dkm_probe:
        impl, n, repeats = args.dkm_probe
        print(json.dumps(dkm_probe(impl, int(n), int(repeats))))
        return
    torch.set_num_threads(1)
    name = "perf_quick" if args.quick else "perf"
    previous = common.RESULTS / f"{name}.json"
    results = {"quick": args.quick}
    if set(args.sections) != set(SECTIONS) and previous.exists():
        results = {k: v for k, v in json.loads(previous.read_text()).items() if k != "meta"}
        results["sections_rerun"] = args.sections
    if "grad_l1" in args.sections:
        results["grad_l1"] = []
        for act_weight in (0.0, 0.01):
            c = grad_l1.step_cost(5 if args.quick else 25, act_weight)
            results["grad_l1"].append(c)
            print(f"grad-l1 (act_weight={act_weight}): plain {1000 * c['plain_s']:.1f} ms, exact {c['ratio']:.2f}x, "
                  f"finite difference {c['fd_ratio']:.2f}x (load {c['load_avg_1min']:.1f})", flush=True)
    if "dkm" in args.sections:
        results["dkm"] = dkm(args.quick, tuple(args.dkm_impls))
    if "demo" in args.sections:
        results["demo"] = demo_wall()
    if "ptq" in args.sections:
        results["ptq"] = ptq_times(1 if args.quick else 3)
    if "gptq" in args.sections:
        results["gptq"] = gptq_time((96,) if args.quick else GPTQ_SIZES)
    paths = common.save_results(name, results, markdown(results))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
