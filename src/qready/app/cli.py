"""The ``qready`` command line: ``qready demo | train | run | sweep | report | inspect | export``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path

from .. import __version__


def _bits_list(text: str) -> list[int | str]:
    items: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            items.append(int(part) if part.isdigit() else part)
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as 8,6,4,3,2 or 8,W4A8")
    return items


def _int_list(text: str) -> list[int]:
    """``8,4,3,2`` -> ``[8, 4, 3, 2]`` (argparse type)."""
    items = _csv(text)
    if not items or not all(p.isdigit() for p in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 8,4,3,2; got {text!r}")
    return [int(p) for p in items]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit 2), naming the command."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _load(recipe_path: str, overrides: list[str]):
    from ..recipe import apply_overrides, load_recipe
    from .pipeline import read_recipe_file

    data = read_recipe_file(Path(recipe_path))
    return load_recipe(apply_overrides(data, overrides) if overrides else data)


def cmd_train(args: argparse.Namespace) -> int:
    from .stages import default_run_dir, train_recipe

    recipe = _load(args.recipe, args.set)
    if recipe.grid:
        raise ValueError("this recipe holds a grid of experiments: run it with `qready run`")
    run_dir = default_run_dir(recipe, args.out)
    from contextlib import nullcontext

    from .stages import check_model_args

    check_model_args(recipe)  # before the run directory is created

    from ..train.distributed import cleanup_distributed, init_distributed, is_main_process
    from .rundir import check_new_run, run_lock

    device = init_distributed()  # under torchrun: gloo on CPU, NCCL on GPUs; None for one process
    main_process = is_main_process()
    try:
        if main_process:
            check_new_run(run_dir, resume=args.resume, force=args.force)
        with run_lock(run_dir) if main_process else nullcontext():
            train_recipe(recipe, run_dir, resume=args.resume, progress=not args.no_progress and main_process,
                         device=device)
    finally:
        cleanup_distributed()
    if main_process:
        print(f"trained {recipe.model.label} on {recipe.data.name}; checkpoint: {run_dir / 'checkpoint'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .stages import prepare_from_checkpoint, show_sweep

    prepared = prepare_from_checkpoint(Path(args.checkpoint), data_root=args.data_root)
    from .stages import sweep_recipe

    if args.json:
        from .rundir import check_writable

        check_writable(Path(args.json).parent)
    rows = sweep_recipe(prepared, bits=args.bits, ranges=args.range, method=args.method,
                        bias_correction=args.bias_correction)
    show_sweep(rows, title=f"PTQ sweep of {args.checkpoint}")
    if args.json:
        from ..train.stats import jsonable
        from .rundir import write_atomic

        write_atomic(Path(args.json), json.dumps(jsonable(rows), indent=2, allow_nan=False))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_recipe

    def on_stage(exp_id: str, stage: str, skipped: bool) -> None:
        print(f"[{exp_id}] {stage}: {'cached, skipped' if skipped else 'running'}", flush=True)

    root = run_recipe(args.recipe, Path(args.out) if args.out else None, force=args.force,
                      progress=not args.no_progress, overrides=args.set, on_stage=on_stage)
    from ..evaluate.report import print_table
    from .comparison import comparison_table, load_experiments

    header, lines, _ = comparison_table(load_experiments(root))
    print_table(header, lines, title=f"qready run {root}")
    print(f"report: {root / 'report.md'} and {root / 'report.html'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .comparison import write_comparison

    md, page = write_comparison(Path(args.run_dir))
    print(f"wrote {md} and {page}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .commands import inspect_command

    return inspect_command(args.checkpoint, batches=args.batches, bits=tuple(args.bits), as_json=args.json,
                           data_root=args.data_root)


def cmd_export(args: argparse.Namespace) -> int:
    from .stages import export_checkpoint

    sizes = export_checkpoint(Path(args.checkpoint), fmt=args.format, bits=args.bits, a_bits=args.a_bits,
                              out=Path(args.out) if args.out else None, data_root=args.data_root,
                              weights_only=args.weights_only)
    print(f"wrote {sizes['path']}: {sizes['bytes'] / 1024:.1f} KiB, {sizes['ratio']:.1f}x smaller than the "
          f"fp32 safetensors ({sizes['fp32_bytes'] / 1024:.1f} KiB)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .catalogue import catalogue

    sections = catalogue()
    if args.what is not None and args.what not in sections:
        raise ValueError(f"unknown section {args.what!r}; valid: {', '.join(sections)}")
    for section, names in sections.items():
        if args.what in (None, section):
            print(f"{section}: {', '.join(names)}" if args.what is None else "\n".join(names))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..recipe import load_recipe
    from .stages import show_sweep, sweep_recipe, train_recipe, write_report

    start = time.perf_counter()
    with resources.as_file(resources.files("qready") / "recipes" / "demo.yaml") as path:
        recipe = load_recipe(path)
    if args.epochs is not None:
        recipe = replace(recipe, train=replace(recipe.train, epochs=args.epochs))
    from .rundir import check_new_run, holds_run, run_lock

    run_dir = Path(args.out) if args.out else next(
        d for d in (Path("runs") / f"demo{f'-{i}' if i else ''}" for i in range(10**6)) if not holds_run(d))
    check_new_run(run_dir, resume=False, force=args.force)
    print(f"qready demo: training {recipe.model.name} on {recipe.data.name} for {recipe.train.epochs} epochs")
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a model this small only loses time to intra-op threading
    with run_lock(run_dir):
        prepared = train_recipe(recipe, run_dir, progress=not args.no_progress)
        rows = sweep_recipe(prepared)
        show_sweep(rows, title="qready demo, post-training quantization")
        report = write_report(run_dir, rows, recipe, plot=True)
    print(f"run directory: {run_dir} (report: {report.name}, plot: accuracy_vs_bits.png) "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qready", description="Make PyTorch models quantization-ready.")
    parser.add_argument("--version", action="version", version=f"qready {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a small CNN on digits, PTQ-sweep 8->2 bits, write a report")
    p.add_argument("--out", default=None,
                   help="run directory (default: runs/demo, or runs/demo-1, -2, ... when it holds a run)")
    p.add_argument("--epochs", type=int, default=None, help="override the number of training epochs")
    p.add_argument("--force", action="store_true", help="start over in a run directory that holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train the model of a YAML recipe")
    p.add_argument("recipe", help="path to a YAML recipe, or the name of an installed one (qready list recipes)")
    p.add_argument("--out", default=None, help="run directory (default: <output_dir>/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--force", action="store_true",
                   help="start over in a run directory that already holds a run (its metrics are replaced)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.lr=0.01 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="train -> compress -> sweep -> export -> report from one recipe (cached stages)")
    p.add_argument("recipe", help="path to a YAML recipe (may hold a grid of experiments), or the name of an "
                   "installed one (qready list recipes)")
    p.add_argument("--out", default=None, help="run directory (default: <output_dir>/<name>)")
    p.add_argument("--force", action="store_true", help="redo every stage, even finished ones")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="write report.md and a self-contained report.html for a run directory")
    p.add_argument("run_dir", help="a directory written by `qready run`")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("inspect", help="quantization-readiness diagnosis of a checkpoint, layer by layer")
    p.add_argument("checkpoint", help="checkpoint directory written by `qready train` / `qready run`")
    p.add_argument("--bits", type=_int_list, default=[8, 4, 3, 2],
                   help="bit widths of the sensitivity estimate (default 8,4,3,2)")
    p.add_argument("--batches", type=int, default=4, help="training batches used for gradients (default 4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--data-root", default=None, help="where the dataset files are (CIFAR, ImageNet)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="export a checkpoint: bit-packed safetensors, ONNX (Q/DQ or MatMulNBits) "
                                      "or a Core ML .mlpackage")
    p.add_argument("checkpoint", help="a training checkpoint (quantized with PTQ at --bits) or a run's compressed/")
    p.add_argument("--format", choices=["packed", "onnx", "coreml"], default="packed")
    p.add_argument("--weights-only", action="store_true",
                   help="ONNX: Linear weights as ONNX Runtime's MatMulNBits (2/4/8 bits), conv weights int8 Q/DQ")
    p.add_argument("--bits", type=int, default=None,
                   help="PTQ weight bits for a float checkpoint (default: 8 for onnx, 4 for packed)")
    p.add_argument("--a-bits", type=int, default=None,
                   help="also quantize activations (calibrated on training batches; ONNX Q/DQ)")
    p.add_argument("--out", default=None, help="output file (default: next to the checkpoint)")
    p.add_argument("--data-root", default=None, help="where the dataset files are (CIFAR, ImageNet)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="PTQ-evaluate a checkpoint at many bit widths")
    p.add_argument("checkpoint", help="checkpoint directory written by `qready train`")
    p.add_argument("--bits", type=_bits_list, default=None, help="e.g. 8,6,4,3,2 or 8,W4A8 (default: the recipe's)")
    p.add_argument("--range", type=_csv, default=None, help="range methods, e.g. minmax,mse,percentile")
    p.add_argument("--method", default=None,
                   help="PTQ method: rtn (round to nearest) or gptq (error-compensating); default: the recipe's")
    p.add_argument("--bias-correction", default=None, choices=("off", "layer", "model"),
                   help="correct each layer's mean output: its own shift (layer) or toward the float model's "
                        "(model); default: the recipe's")
    p.add_argument("--data-root", default=None, help="where the dataset files are (CIFAR, ImageNet)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("list", help="what qready offers: models, datasets, regularizers, methods, recipes")
    p.add_argument("what", nargs="?", default=None, help="one section only, e.g. recipes or models")
    p.set_defaults(func=cmd_list)

    parser.epilog = EXAMPLES["qready"]
    for name, command in sub.choices.items():
        command.epilog = EXAMPLES.get(name)
    for command in (parser, *sub.choices.values()):
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


EXAMPLES = {
    "qready": "examples:\n  qready demo\n  qready list recipes\n  qready run demo --out runs/try\n"
              "  qready inspect runs/try/checkpoint --bits 4,2",
    "demo": "examples:\n  qready demo\n  qready demo --epochs 3 --out runs/quick",
    "train": "examples:\n  qready train demo --out runs/try               (an installed recipe, by name)\n"
             "  qready train my.yaml --set train.lr=0.01 --set train.epochs=5\n"
             "  qready train my.yaml --out runs/try --resume     (continue a killed run)",
    "run": "examples:\n  qready run demo --out runs/try\n  qready run my_grid.yaml --set seed=1\n"
           "  qready run my.yaml --force                      (redo every stage)",
    "report": "examples:\n  qready report runs/try       (a grid still running: the finished experiments, the rest marked)",
    "inspect": "examples:\n  qready inspect runs/try/checkpoint\n  qready inspect runs/try/checkpoint --bits 4,2 --json",
    "export": "examples:\n  qready export runs/try/checkpoint --bits 4 --out model.qready\n"
              "  qready export runs/try/checkpoint --format onnx --bits 8 --a-bits 8 --out model.onnx\n"
              "  qready export runs/try/compressed --format onnx  (the run's own bit widths)",
    "sweep": "examples:\n  qready sweep runs/try/checkpoint --bits 8,4,3,W4A8 --range minmax,mse\n"
             "  qready sweep runs/try/checkpoint --json rows.json",
    "list": "examples:\n  qready list\n  qready list recipes",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose and not sys.stdout.isatty():  # logs and CI: no progress bar, so progress lines
        for name in ("qready.train", "qready.run"):
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except Exception as err:  # every failure: one line on stderr, exit 2 (-v: the traceback)
        if args.verbose:
            raise
        print(f"qready {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2


def error_line(err: BaseException) -> str:
    """One line naming the cause of ``err``: its message (a file error names the file); errors that
    are not the usual user-input kinds carry their type and a hint to run with ``-v``."""
    if isinstance(err, OSError) and err.filename is not None:
        message = f"{err.filename}: {err.strerror or err}"
    elif isinstance(err, KeyError) and err.args:
        message = str(err.args[0])
    else:
        message = str(err) or type(err).__name__
    import pickle

    if not isinstance(err, (ValueError, TypeError, KeyError, OSError, ImportError, pickle.UnpicklingError)):
        message = f"{type(err).__name__}: {message} (run with -v for the traceback)"
    return " ".join(message.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
