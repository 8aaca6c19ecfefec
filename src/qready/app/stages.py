"""Stages shared by the CLI: build from a recipe, train, sweep a checkpoint, write the run report."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from ..data import DatasetSplits, load_dataset, make_loaders
from ..evaluate.report import markdown_table, print_table, sweep_tables
from ..evaluate.sweep import sweep
from ..models import MODELS, freeze_batchnorm, import_factory, load_weights
from ..quant.select import Selector
from ..quant.spec import QuantSpec
from ..recipe import Recipe, load_recipe, save_recipe
from ..train import fit, load_model_weights, seed_everything

EXPORT_SUFFIX = {"packed": ".qready", "onnx": ".onnx", "coreml": ".mlpackage"}  # file name ending per format

log = logging.getLogger("qready")


@dataclass
class Prepared:
    """Everything a stage needs: the recipe, data splits and loaders, and the model."""

    recipe: Recipe
    splits: DatasetSplits
    train_loader: DataLoader
    test_loader: DataLoader
    model: nn.Module


def model_factory(recipe: Recipe) -> Callable[..., nn.Module]:
    """The recipe's model constructor: the registered ``model.name`` or the imported ``model.factory``."""
    return import_factory(recipe.model.factory) if recipe.model.factory else MODELS.get(recipe.model.name)


def check_model_args(recipe: Recipe) -> None:
    """Refuse ``model.args`` the model constructor does not take (``ValueError`` naming the recipe key),
    before any file is written."""
    factory = model_factory(recipe)
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(recipe.model.args) - set(params))
    if unknown:
        raise ValueError(f"recipe key model.args: {recipe.model.label} takes no argument {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(n for n in params if n != 'self')}")


def model_kwargs(recipe: Recipe, splits: DatasetSplits) -> dict:
    """Constructor arguments: the recipe's ``model.args`` plus shape arguments from the dataset
    (``num_classes`` only from a labelled dataset, and each only when the constructor takes it)."""
    kwargs = dict(recipe.model.args)
    params = inspect.signature(model_factory(recipe)).parameters
    if splits.num_classes > 0 and ("num_classes" in params or recipe.model.factory is None):
        kwargs.setdefault("num_classes", splits.num_classes)
    if "in_channels" in params:
        kwargs.setdefault("in_channels", splits.input_shape[0])
    if "in_features" in params:
        size = 1
        for d in splits.input_shape:
            size *= d
        kwargs.setdefault("in_features", size)
    return kwargs


def build_model(recipe: Recipe, splits: DatasetSplits, *, pretrained: bool = True) -> nn.Module:
    """The recipe's model, with its pretrained ``model.weights`` loaded when ``pretrained`` and its
    BatchNorm frozen with ``model.freeze_batchnorm``."""
    model = model_factory(recipe)(**model_kwargs(recipe, splits))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.factory {recipe.model.factory!r} returned {type(model).__name__}, not an nn.Module")
    if pretrained and recipe.model.weights:
        load_weights(model, recipe.model.weights)
    if recipe.model.freeze_batchnorm:
        freeze_batchnorm(model)
    return model


def prepare(recipe: Recipe, *, pretrained: bool = True) -> Prepared:
    """Load the data, build the (seeded) model and loaders of ``recipe`` (``pretrained=False``: skip
    ``model.weights``, e.g. when a checkpoint's weights are loaded next)."""
    seed_everything(recipe.seed)
    splits = load_dataset(recipe.data.name, root=recipe.data.root, seed=recipe.seed, **recipe.data.options)
    train_loader, _ = make_loaders(splits, recipe.train.batch_size, seed=recipe.seed)
    test_loader = DataLoader(splits.test, batch_size=recipe.data.eval_batch_size, shuffle=False)
    seed_everything(recipe.seed)
    model = build_model(recipe, splits, pretrained=pretrained)
    return Prepared(recipe, splits, train_loader, test_loader, model)


def checkpoint_meta(recipe: Recipe, prepared: Prepared) -> dict:
    """What a checkpoint needs to rebuild its model and data: the recipe and the model arguments."""
    return {"recipe": recipe.to_dict(), "model": {"name": recipe.model.label,
                                                  "kwargs": model_kwargs(recipe, prepared.splits)}}


def build_regularizers(recipe: Recipe, model: nn.Module) -> list[nn.Module]:
    """The recipe's regularizers, built for ``model``."""
    from ..regularizers import build

    return [build(r.name, model, weight=r.weight, select=r.select or None, **r.options) for r in recipe.regularizers]


def train_recipe(recipe: Recipe, run_dir: Path, *, resume: bool = False, progress: bool = True,
                 device=None) -> Prepared:
    """Train the recipe's model into ``run_dir`` (checkpoint, metrics.jsonl, recipe.yaml); under
    torchrun every process calls this and only rank 0 writes."""
    from ..train.distributed import is_main_process

    check_model_args(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_recipe(recipe, run_dir / "recipe.yaml")
    prepared = prepare(recipe)
    from ..sharpness.build import build_step

    terms = build_regularizers(recipe, prepared.model)
    stepping = [t for t in terms if getattr(t, "owns_step", False)]  # e.g. grad_l1 in finite-difference mode
    if stepping and (len(stepping) > 1 or recipe.sharpness is not None):
        raise ValueError("a regularizer that owns the training step (grad_l1 with mode: finite_difference) "
                         "cannot be combined with another one or with a sharpness block")
    result = fit(
        prepared.model, prepared.train_loader, recipe.train, val_loader=prepared.test_loader,
        loss_terms=[t for t in terms if t not in stepping],
        step_strategy=stepping[0].step_strategy() if stepping else build_step(recipe.sharpness),
        run_dir=run_dir, resume=resume, seed=recipe.seed, meta=checkpoint_meta(recipe, prepared), progress=progress,
        device=device,
    )
    prepared.model = result.model
    return prepared


def sweep_recipe(prepared: Prepared, bits=None, ranges=None, method: str | None = None,
                 bias_correction: str | None = None) -> list[dict]:
    """PTQ sweep of ``prepared.model`` over the recipe's bit settings and range methods, with the
    recipe's PTQ method (or ``method``, which then takes its default options) and bias correction (or
    ``bias_correction``: ``"off"``, ``"layer"``, ``"model"``)."""
    cfg = prepared.recipe.sweep
    correction = cfg.bias_correction if bias_correction is None else (False if bias_correction == "off" else bias_correction)
    options = cfg.method_options if method in (None, cfg.method) else {}
    method = method or cfg.method
    rows: list[dict] = []
    for i, rng in enumerate(ranges or cfg.ranges):
        spec = QuantSpec(bits=8, symmetric=cfg.symmetric, granularity=cfg.granularity, range=rng,
                         group_size=cfg.group_size)
        rows += sweep(
            prepared.model, prepared.test_loader, bits=list(bits or cfg.bits), spec=spec,
            calib=prepared.train_loader, select=Selector(first_last=cfg.first_last), include_fp=i == 0,
            calib_batches=cfg.calib_batches, method=method, bias_correction=correction,
            method_options=options, confidence=cfg.confidence,
        )
    return rows


def write_report(run_dir: Path, rows: list[dict], recipe: Recipe, *, plot: bool = True) -> Path:
    """Write ``sweep.json`` (strict JSON: the float row's infinite SQNR is ``null``), ``report.md``
    (accuracy when the data is labelled, fidelity to the float model always) and
    ``accuracy_vs_bits.png`` into ``run_dir``."""
    from ..train.stats import jsonable

    (run_dir / "sweep.json").write_text(json.dumps(jsonable(rows), indent=2, allow_nan=False))
    parts = [
        f"# qready run: {recipe.name}\n",
        f"Model `{recipe.model.label}` on `{recipe.data.name}` (seed {recipe.seed}), "
        f"{recipe.train.epochs} epochs. PTQ: {recipe.sweep.granularity} weights, "
        f"{'symmetric' if recipe.sweep.symmetric else 'asymmetric'}, first/last: {recipe.sweep.first_last}.\n",
    ]
    for title, header, lines in sweep_tables(rows):
        parts += [f"## {title}\n", markdown_table(header, lines)]
    if plot:
        from ..evaluate.plots import plot_accuracy_vs_bits

        plot_accuracy_vs_bits(rows, run_dir / "accuracy_vs_bits.png", title=f"{recipe.name}: accuracy vs bits")
        parts.append("\n![accuracy vs bits](accuracy_vs_bits.png)\n")
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def show_sweep(rows: list[dict], title: str) -> None:
    """Print the sweep as tables (one line per range method): accuracy when labelled, fidelity always."""
    for metric_title, header, lines in sweep_tables(rows):
        print_table(header, lines, title=f"{title}: {metric_title}")


def prepare_from_checkpoint(ckpt: Path, data_root: str | None = None, strict: bool = True) -> Prepared:
    """Rebuild the recipe, data and trained model of a checkpoint written by :func:`train_recipe` (or a
    run's ``compressed/``, with its activation quantizers); only ``meta.json`` and the weights are read
    (``strict=False`` ignores tensors the model does not have)."""
    from ..export.activations import attach_activation_layout
    from ..train.checkpoint import read_checkpoint_meta

    ckpt_meta = read_checkpoint_meta(ckpt)
    meta = ckpt_meta.get("recipe")
    if meta is None:
        raise ValueError(f"checkpoint {ckpt} has no recipe in its meta.json; it was not written by qready train")
    recipe = load_recipe(meta)
    if data_root is not None:
        recipe = replace(recipe, data=replace(recipe.data, root=data_root))
    prepared = prepare(recipe, pretrained=False)
    attach_activation_layout(prepared.model, ckpt_meta.get("activations") or {})
    load_model_weights(ckpt, prepared.model, strict=strict)
    return prepared


def default_run_dir(recipe: Recipe, out: str | None) -> Path:
    """``out`` if given, else ``<recipe.output_dir>/<recipe.name>``."""
    return Path(out) if out else Path(recipe.output_dir) / recipe.name


# ------------------------------------------------------------------ stages of `qready run`
def _compressed_label(c) -> str:
    return f"{c.method} W{c.w_bits}" + ("" if c.a_bits is None else f"A{c.a_bits}")


def compress_model(prepared: Prepared, run_dir: Path, *, progress: bool = True) -> nn.Module:
    """Apply the recipe's ``compress`` method to a copy of the trained model and return the result
    (weights on their grid or palette, quantizers baked in); see :mod:`qready.app.compress`."""
    from ..train.objective import build_objective
    from .compress import compress_model as compress

    recipe = prepared.recipe
    fit_kwargs = dict(val_loader=prepared.test_loader, run_dir=run_dir / "compress", resume=True, seed=recipe.seed,
                      meta=checkpoint_meta(recipe, prepared), progress=progress,
                      objective=build_objective(recipe.train, prepared.model))  # distill: the float model teaches
    return compress(prepared.model, recipe.compress, prepared.train_loader, recipe.train, fit_kwargs)


def compress_stage(prepared: Prepared, run_dir: Path, *, progress: bool = True) -> dict:
    """Compress, evaluate, save (``compressed/``), export and plot weight histograms; writes
    ``compress.json`` and returns it."""
    from ..evaluate.fidelity import FIDELITY_KEYS, fidelity
    from ..regularizers.stats import plot_weight_histograms
    from ..train import save_checkpoint

    c = prepared.recipe.compress
    model = compress_model(prepared, run_dir, progress=progress)
    metrics = fidelity(prepared.model, model, prepared.test_loader)  # accuracy and loss None when unlabeled
    row = {"label": _compressed_label(c), "w_bits": c.w_bits, "a_bits": c.a_bits, "range": c.method,
           "granularity": "compressed", "accuracy": metrics["accuracy"], "loss": metrics["loss"],
           **{key: metrics[key] for key in FIDELITY_KEYS}}
    from ..export.activations import activation_layout

    save_checkpoint(run_dir / "compressed", model, meta={**checkpoint_meta(prepared.recipe, prepared), "row": row,
                                                         "activations": activation_layout(model)})
    plot_weight_histograms(prepared.model, model, run_dir / "weights.png")
    out = {"row": row}
    evidence = run_dir / "compress" / "mixed_precision.json"  # written by this stage's mixed-precision search
    if c.options.get("mixed") is not None and evidence.is_file():
        out["mixed_precision"] = json.loads(evidence.read_text())
    (run_dir / "compress.json").write_text(json.dumps(out, indent=2))
    return out


def export_model(model: nn.Module, prepared: Prepared, run_dir: Path, *, fmt: str | None = None,
                 target: Path | None = None, w_bits: int = 8, weights_only: bool = False,
                 spec: QuantSpec | None = None) -> dict:
    """Export ``model`` (``fmt`` defaults to the recipe's) to ``target`` (default: ``run_dir/export/``);
    returns ``{format, path, file, bytes, fp32_bytes, ratio}`` where ``fp32_bytes`` is the size of the
    float model as fp32 safetensors (measured in memory: nothing else is written). ``weights_only``:
    ONNX with MatMulNBits; ``spec``: the weights' grid for ONNX weights-only and Core ML (Core ML
    without it stores every weight as a LUT)."""
    from safetensors.torch import save

    fmt = fmt or prepared.recipe.export.format
    target = target or run_dir / "export" / f"model{EXPORT_SUFFIX.get(fmt, '.qready')}"
    fp32_bytes = len(save({k: v.detach().float().contiguous().clone() for k, v in prepared.model.state_dict().items()
                           if v.is_floating_point()}))
    meta = checkpoint_meta(prepared.recipe, prepared)["model"]
    if fmt == "packed":
        from ..export import save_packed

        save_packed(model, target, meta={"model": meta["name"], "model_kwargs": meta["kwargs"]})
    else:
        from ..batching import batch_inputs

        example = batch_inputs(next(iter(prepared.test_loader)))[:1]
        if fmt == "coreml":
            from ..export.coreml import export_coreml

            export_coreml(model, example, target, spec=spec)
        else:
            from ..export.onnx import export_onnx

            export_onnx(model, example, target, w_bits=w_bits, weights_only=weights_only, spec=spec)
    files = [f for f in target.rglob("*") if f.is_file()] if target.is_dir() else [target]  # .mlpackage: a folder
    size = sum(f.stat().st_size for f in files)
    sizes = {"format": fmt, "path": str(target), "file": target.name, "bytes": size, "fp32_bytes": fp32_bytes}
    sizes["ratio"] = sizes["fp32_bytes"] / max(sizes["bytes"], 1)
    return sizes


def export_stage(prepared: Prepared, run_dir: Path) -> dict:
    """Export the compressed model (``compressed/``) when the recipe has a compress stage, otherwise the
    PTQ model at ``export.bits`` (per-channel min-max); writes ``export.json``."""
    from ..quant.ptq import ptq

    recipe = prepared.recipe
    if recipe.compress is not None:
        suffix = EXPORT_SUFFIX.get(recipe.export.format, ".qready")
        sizes = export_checkpoint(run_dir / "compressed", fmt=recipe.export.format,
                                  out=run_dir / "export" / f"model{suffix}")
        (run_dir / "export.json").write_text(json.dumps(sizes, indent=2))
        return sizes
    bits = recipe.export.bits
    spec = QuantSpec(bits=bits, granularity="channel")
    qmodel = ptq(prepared.model, spec)
    # Core ML stores the weights on this grid (without it, as look-up tables)
    sizes = export_model(qmodel, prepared, run_dir, w_bits=bits, spec=spec if recipe.export.format == "coreml" else None)
    (run_dir / "export.json").write_text(json.dumps(sizes, indent=2))
    return sizes


def experiment_assets(prepared: Prepared, run_dir: Path) -> None:
    """Plots of one experiment: accuracy vs bits (``accuracy_vs_bits.png``) and, without a compress
    stage, weight histograms of the float model vs its PTQ at the lowest swept bit width."""
    from ..evaluate.plots import plot_accuracy_vs_bits
    from ..evaluate.sweep import parse_bit_setting
    from ..quant.ptq import ptq
    from ..regularizers.stats import plot_weight_histograms

    rows = json.loads((run_dir / "sweep.json").read_text())
    plot_accuracy_vs_bits(rows, run_dir / "accuracy_vs_bits.png", title=f"{prepared.recipe.name}: accuracy vs bits")
    if prepared.recipe.compress is None:
        low = min(parse_bit_setting(b)[0] for b in prepared.recipe.sweep.bits)
        qmodel = ptq(prepared.model, QuantSpec(bits=low, granularity=prepared.recipe.sweep.granularity,
                                               group_size=prepared.recipe.sweep.group_size))
        plot_weight_histograms(prepared.model, qmodel, run_dir / "weights.png")


def experiment_summary(run_dir: Path) -> dict:
    """What an experiment produced: sweep rows, the compressed row and export sizes (when present)."""
    out: dict = {"dir": str(run_dir)}
    for name, key in (("sweep.json", "sweep"), ("compress.json", "compress"), ("export.json", "export")):
        path = run_dir / name
        if path.is_file():
            out[key] = json.loads(path.read_text())
    return out


def export_checkpoint(ckpt: Path, *, fmt: str = "packed", bits: int | None = None, a_bits: int | None = None,
                      out: Path | None = None, data_root: str | None = None, weights_only: bool = False) -> dict:
    """``qready export``: a float checkpoint is PTQ-quantized first (weights at ``bits``, per-channel
    min-max, default 8 for ONNX and 4 packed; activations at ``a_bits`` calibrated on training batches);
    a run's ``compressed/`` checkpoint is exported as it was measured, with its own bit widths and
    activation quantizers (``bits``/``a_bits`` that disagree with them are an error). The output
    directory is checked writable before any work. ``fmt="coreml"`` and ``weights_only`` (ONNX
    MatMulNBits) export weights only; Core ML stores 4/8-bit PTQ codes as such, other weights as LUTs."""
    from ..quant.ptq import ptq
    from ..quant.spec import ACT_BITS, WEIGHT_BITS, check_bits
    from ..train.checkpoint import read_checkpoint_meta
    from .rundir import check_writable

    row = read_checkpoint_meta(ckpt).get("row")
    if row is not None:
        for flag, given, own in (("--bits", bits, row.get("w_bits")), ("--a-bits", a_bits, row.get("a_bits"))):
            if given is not None and given != own:
                raise ValueError(f"{flag} {given} disagrees with {ckpt}, which was compressed and measured as "
                                 f"{row.get('label')!r} ({flag} {own}); leave {flag} out to export it as measured")
        bits = row.get("w_bits") or 8
    bits = bits if bits is not None else (8 if fmt == "onnx" else 4)
    check_bits(bits, "--bits", WEIGHT_BITS)
    if a_bits is not None:
        check_bits(a_bits, "--a-bits", ACT_BITS)
        if fmt == "coreml" or weights_only:
            raise ValueError("--a-bits: Core ML and --weights-only exports hold quantized weights only")
    if weights_only and fmt != "onnx":
        raise ValueError(f"--weights-only applies to --format onnx; got --format {fmt}")
    suffix = EXPORT_SUFFIX.get(fmt, ".qready")
    target = out or ckpt.parent / (f"{ckpt.name}{suffix}" if row is not None else f"model_w{bits}{suffix}")
    check_writable(target.parent)
    prepared = prepare_from_checkpoint(ckpt, data_root=data_root)
    model = prepared.model
    if row is None:
        act = None if a_bits is None else QuantSpec(bits=a_bits, symmetric=False, granularity="tensor")
        model = ptq(model, QuantSpec(bits=bits, granularity="channel"), calib=prepared.train_loader if act else None,
                    act_spec=act)
    spec = QuantSpec(bits=bits, granularity="channel") if row is None else None
    if fmt == "coreml" and bits not in (4, 8):
        spec = None  # Core ML has no 2/3/5/6/7-bit linear codes: the grid is stored exactly as LUTs
    return export_model(model, prepared, ckpt.parent, fmt=fmt, target=target, w_bits=bits,
                        weights_only=weights_only, spec=spec)
