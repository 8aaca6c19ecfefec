"""Deployment files: sizes of Core ML and ONNX exports at fp32 / fp16 / qready 8, 4, 3, 2 bits, and
ONNX Runtime CPU latency of fp32 vs int8 QDQ vs int4 MatMulNBits.

Models (random initialisation: sizes and latency do not depend on the weights' values):

* ``stack``: a transformer-like stack of ``BLOCKS`` pre-norm MLP blocks (LayerNorm, Linear d→4d,
  GELU, Linear 4d→d, residual), d = 1024: 25.2 M weights; input ``[B, d]`` (one token per sample);
* ``mobilenet_v2``: ``create_model("mobilenet_v2", num_classes=1000, stem="imagenet")``, 3.5 M
  weights; input ``[B, 3, 224, 224]``.

Files, per model and bit width ``b``:

* Core ML (``export_coreml``, iOS 18, ``precision="float16"``): *palettized* = one ``2^b``-entry LUT
  per layer (``constexpr_lut_to_dense``); the stack's LUTs are its per-tensor ``b``-bit min-max grids
  (k-means of 4 M-weight layers is slow on two shared cores; the file size is the same for any
  centroids), MobileNetV2's are per-layer k-means (``qready.palettize``). *linear* = 8/4-bit codes
  (``constexpr_blockwise_shift_scale``; per block of 32 for the stack, per channel for MobileNetV2);
  3 and 2 bits have no Core ML linear form (refused). Baselines: the plain coremltools conversion at
  float32 and float16. The size reported is the weight file (``weights/weight.bin``).
* ONNX: *MatMulNBits* = ``export_onnx(weights_only=True)`` (Linear → ``MatMulNBits``, block 32,
  symmetric; convolutions → int8 QDQ); 3 bits is refused (ONNX Runtime's kernel has 2, 4, 8).
  *QDQ* = the W/A export of weights only (per channel; INT4 codes for <= 4 bits at opset 21).
  Baselines: float export and its float16 conversion (``onnxruntime.transformers.float16``).

Every qready file is read back (``qready.export.decode``) and checked bit for bit against the model.
Latency: ONNX Runtime, CPU, one intra-op thread, batch 1 and 32, median of interleaved runs.

    python -m benchmarks.deploy [--quick]      # --quick: small shapes, nothing written
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import interleaved_medians, markdown_table, save_results
from qready.export.coreml import export_coreml
from qready.export.decode import verify_coreml, verify_onnx
from qready.export.onnx import export_onnx
from qready.models import create_model
from qready.quant.palettize import palettize
from qready.quant.ptq import ptq
from qready.quant.spec import QuantSpec

BLOCKS = 3
BITS = (8, 4, 3, 2)
NOTHING = {"include": ("^$",)}  # a selector that selects no layer: the float export


class Block(nn.Module):
    """Pre-norm MLP block: ``x + W2 · gelu(W1 · LayerNorm(x))``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def build(name: str, quick: bool) -> tuple[nn.Module, torch.Tensor, QuantSpec]:
    """``(model, example input [1, ...], weight spec of the linear exports)``."""
    torch.manual_seed(0)
    if name == "stack":
        d = 256 if quick else 1024
        return nn.Sequential(*[Block(d) for _ in range(BLOCKS)]).eval(), torch.randn(1, d), \
            QuantSpec(bits=8, granularity="group", group_size=32)
    side = 64 if quick else 224
    return create_model("mobilenet_v2", num_classes=1000, stem="imagenet").eval(), torch.randn(1, 3, side, side), \
        QuantSpec(bits=8, granularity="channel")


def palettized(name: str, model: nn.Module, bits: int) -> nn.Module:
    if name == "stack":  # per-tensor min-max grid: 2^b values per layer, stored as a 2^b-entry LUT
        return ptq(model, QuantSpec(bits=bits, granularity="tensor", symmetric=False))
    return palettize(model, bits=bits, method="kmeans")


def weight_file(package: Path) -> int:
    return (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size


def coreml_baseline(model: nn.Module, x: torch.Tensor, path: Path, half: bool) -> int:
    import coremltools as ct

    traced = torch.jit.trace(model, x, check_trace=False)
    ct.convert(traced, inputs=[ct.TensorType(name="input", shape=tuple(x.shape))], convert_to="mlprogram",
               minimum_deployment_target=ct.target.iOS18,
               compute_precision=ct.precision.FLOAT16 if half else ct.precision.FLOAT32).save(str(path))
    return weight_file(path)


def onnx_fp16(src: Path, dst: Path) -> int:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return dst.stat().st_size


def sizes(name: str, model: nn.Module, x: torch.Tensor, spec: QuantSpec, work: Path) -> tuple[list[dict], dict]:
    """File size rows (bytes; a string for a refused setting) and the latency files."""
    rows = {fmt: {"model": name, "format": fmt} for fmt in
            ("Core ML palettized (LUT)", "Core ML linear", "ONNX MatMulNBits (weights only)", "ONNX QDQ")}
    fp32_onnx = export_onnx(model, x, work / "fp32.onnx", select=NOTHING)
    fp16_onnx = onnx_fp16(fp32_onnx, work / "fp16.onnx")
    ml32, ml16 = coreml_baseline(model, x, work / "fp32.mlpackage", False), coreml_baseline(model, x, work / "fp16.mlpackage", True)
    for fmt, row in rows.items():
        onnx_fmt = fmt.startswith("ONNX")
        row["fp32"] = fp32_onnx.stat().st_size if onnx_fmt else ml32
        row["fp16"] = fp16_onnx if onnx_fmt else ml16
    files = {"fp32": fp32_onnx}
    for bits in BITS:
        pal = palettized(name, model, bits)
        path = export_coreml(pal, x, work / f"pal{bits}.mlpackage", precision="float16")
        verify_coreml(pal, path)
        rows["Core ML palettized (LUT)"][f"W{bits}"] = weight_file(path)
        lspec = spec.with_bits(bits)
        qmodel = ptq(model, lspec)
        try:
            path = export_coreml(qmodel, x, work / f"lin{bits}.mlpackage", spec=lspec, precision="float16")
            verify_coreml(qmodel, path, spec=lspec)
            rows["Core ML linear"][f"W{bits}"] = weight_file(path)
        except ValueError as err:
            rows["Core ML linear"][f"W{bits}"] = f"refused ({str(err).split(': ', 1)[1][:48]}…)"
        try:
            path = export_onnx(qmodel, x, work / f"nbits{bits}.onnx", spec=lspec, weights_only=True)
            assert verify_onnx(qmodel, path, x, spec=lspec)["max_rel_error"] <= 1e-4
            rows["ONNX MatMulNBits (weights only)"][f"W{bits}"] = path.stat().st_size
            files[f"nbits{bits}"] = path
        except ValueError as err:
            rows["ONNX MatMulNBits (weights only)"][f"W{bits}"] = f"refused ({str(err).split(': ', 1)[1][:48]}…)"
        cspec = QuantSpec(bits=bits, granularity="channel")
        cmodel = ptq(model, cspec)
        path = export_onnx(cmodel, x, work / f"qdq{bits}.onnx", spec=cspec)
        verify_onnx(cmodel, path, spec=cspec)
        rows["ONNX QDQ"][f"W{bits}"] = path.stat().st_size
        files[f"qdq{bits}"] = path
    return list(rows.values()), files


def latency(files: dict[str, Path], x: torch.Tensor, batches: tuple[int, ...], repeats: dict[int, int]) -> list[dict]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    variants = {"fp32": files["fp32"], "int8 QDQ": files["qdq8"], "int4 MatMulNBits": files["nbits4"]}
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in variants.items()}
    out = []
    for batch in batches:
        feed = {"input": torch.randn(batch, *x.shape[1:]).numpy()}
        steps = {k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}
        medians = interleaved_medians(steps, repeats=repeats[batch], warmup=2)
        out.append({"batch": batch, **{k: round(v * 1e3, 2) for k, v in medians.items()}})
    return out


def _ratio(row: dict, key: str, base: str) -> str:
    return f"{row[base] / row[key]:.1f}×" if isinstance(row.get(key), int) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    print(f"load average before: {load_before}")
    size_rows, latency_rows, checks = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("mobilenet_v2", "stack"):
            model, x, spec = build(name, args.quick)
            work = Path(tmp) / name
            work.mkdir()
            weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
            print(f"{name}: {weights / 1e6:.1f} M weights")
            rows, files = sizes(name, copy.deepcopy(model), x, spec, work)
            for row in rows:
                row["weights_M"] = round(weights / 1e6, 2)
            size_rows += rows
            repeats = {1: 30, 32: 10} if name == "stack" else {1: 15, 32: 4}
            for row in latency(files, x, (1, 32), repeats):
                latency_rows.append({"model": name, **row})
            pal = next(r for r in rows if r["format"].startswith("Core ML palettized"))
            nbits = next(r for r in rows if r["format"].startswith("ONNX MatMulNBits"))
            b1 = next(r for r in latency_rows if r["model"] == name and r["batch"] == 1)
            checks[name] = {"coreml_2bit_le_fp16_over_7": pal["W2"] * 7 <= pal["fp16"],
                            "onnx_4bit_le_fp32_over_6": nbits["W4"] * 6 <= nbits["fp32"],
                            "onnx_4bit_batch1_not_slower": b1["int4 MatMulNBits"] <= b1["fp32"]}
            print(name, checks[name])
    load_after = os.getloadavg()
    print(f"load average after: {load_after}")
    columns = ["fp32", "fp16", *[f"W{b}" for b in BITS]]
    size_table = markdown_table(
        ["model", "format", *columns, "fp16 / W2", "fp32 / W4"],
        [[r["model"], r["format"], *[r.get(c, "-") for c in columns], _ratio(r, "W2", "fp16"), _ratio(r, "W4", "fp32")]
         for r in size_rows])
    variants = ["fp32", "int8 QDQ", "int4 MatMulNBits"]
    latency_table = markdown_table(["model", "batch", *variants],
                                   [[r["model"], r["batch"], *[r[v] for v in variants]] for r in latency_rows])
    check_lines = "\n".join(f"- {m}: Core ML 2-bit weight file ≤ 1/7 of fp16: {c['coreml_2bit_le_fp16_over_7']}; "
                            f"ONNX 4-bit MatMulNBits file ≤ 1/6 of fp32: {c['onnx_4bit_le_fp32_over_6']}; "
                            f"batch-1 latency int4 ≤ fp32: {c['onnx_4bit_batch1_not_slower']}"
                            for m, c in checks.items())
    markdown = (f"# Deployment files and ONNX Runtime latency\n\n{'(quick run: small shapes)' if args.quick else ''}"
                f"Sizes in bytes (Core ML: the weight file `weight.bin`; ONNX: the .onnx file). Every qready file "
                f"was read back and matched the model bit for bit.\n\n{size_table}\n\n"
                f"ONNX Runtime CPU latency (ms, median of interleaved runs, 1 thread):\n\n{latency_table}\n\n"
                f"Targets (stack is the transformer-like model; stated for both):\n{check_lines}\n\n"
                f"Load average (1, 5, 15 min) before: {tuple(round(v, 2) for v in load_before)}, after: "
                f"{tuple(round(v, 2) for v in load_after)} (two shared cores).\n")
    payload = {"quick": args.quick, "sizes": size_rows, "latency_ms": latency_rows, "targets": checks,
               "loadavg": {"before": load_before, "after": load_after}}
    print(markdown)
    if not args.quick:
        json_path, md_path = save_results("deploy", payload, markdown)
        print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
