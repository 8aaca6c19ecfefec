"""Stages shared by the CLI: build from a recipe, train, sweep a checkpoint, write the run report."""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from ..data import DatasetSplits, load_dataset, make_loaders
from ..evaluate.report import markdown_table, pivot_sweep, print_table
from ..evaluate.sweep import sweep
from ..models import MODELS, create_model
from ..quant.select import Selector
from ..quant.spec import QuantSpec
from ..recipe import Recipe, load_recipe, save_recipe
from ..train import fit, load_checkpoint, load_model_weights, seed_everything

log = logging.getLogger("qready")


@dataclass
class Prepared:
    """Everything a stage needs: the recipe, data splits and loaders, and the model."""

    recipe: Recipe
    splits: DatasetSplits
    train_loader: DataLoader
    test_loader: DataLoader
    model: nn.Module


def model_kwargs(recipe: Recipe, splits: DatasetSplits) -> dict:
    """Constructor arguments: the recipe's ``model.args`` plus shape arguments from the dataset."""
    kwargs = dict(recipe.model.args)
    params = inspect.signature(MODELS.get(recipe.model.name)).parameters
    kwargs.setdefault("num_classes", splits.num_classes)
    if "in_channels" in params:
        kwargs.setdefault("in_channels", splits.input_shape[0])
    if "in_features" in params:
        size = 1
        for d in splits.input_shape:
            size *= d
        kwargs.setdefault("in_features", size)
    return kwargs


def prepare(recipe: Recipe) -> Prepared:
    """Load the data, build the (seeded) model and loaders of ``recipe``."""
    seed_everything(recipe.seed)
    splits = load_dataset(recipe.data.name, root=recipe.data.root, seed=recipe.seed, **recipe.data.options)
    train_loader, _ = make_loaders(splits, recipe.train.batch_size, seed=recipe.seed)
    test_loader = DataLoader(splits.test, batch_size=recipe.data.eval_batch_size, shuffle=False)
    seed_everything(recipe.seed)
    model = create_model(recipe.model.name, **model_kwargs(recipe, splits))
    return Prepared(recipe, splits, train_loader, test_loader, model)


def checkpoint_meta(recipe: Recipe, prepared: Prepared) -> dict:
    """What a checkpoint needs to rebuild its model and data: the recipe and the model arguments."""
    return {"recipe": recipe.to_dict(), "model": {"name": recipe.model.name,
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

    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_recipe(recipe, run_dir / "recipe.yaml")
    prepared = prepare(recipe)
    from ..sharpness.build import build_step

    terms = build_regularizers(recipe, prepared.model)
    result = fit(
        prepared.model, prepared.train_loader, recipe.train, val_loader=prepared.test_loader, loss_terms=terms,
        step_strategy=build_step(recipe.sharpness),
        run_dir=run_dir, resume=resume, seed=recipe.seed, meta=checkpoint_meta(recipe, prepared), progress=progress,
        device=device,
    )
    prepared.model = result.model
    return prepared


def sweep_recipe(prepared: Prepared, bits=None, ranges=None) -> list[dict]:
    """PTQ sweep of ``prepared.model`` over the recipe's bit settings and range methods."""
    cfg = prepared.recipe.sweep
    rows: list[dict] = []
    for i, rng in enumerate(ranges or cfg.ranges):
        spec = QuantSpec(bits=8, symmetric=cfg.symmetric, granularity=cfg.granularity, range=rng,
                         group_size=cfg.group_size)
        rows += sweep(
            prepared.model, prepared.test_loader, bits=list(bits or cfg.bits), spec=spec,
            calib=prepared.train_loader, select=Selector(first_last=cfg.first_last), include_fp=i == 0,
        )
    return rows


def write_report(run_dir: Path, rows: list[dict], recipe: Recipe, *, plot: bool = True) -> Path:
    """Write ``sweep.json``, ``report.md`` and ``accuracy_vs_bits.png`` into ``run_dir``."""
    (run_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
    header, lines = pivot_sweep(rows)
    parts = [
        f"# qready run: {recipe.name}\n",
        f"Model `{recipe.model.name}` on `{recipe.data.name}` (seed {recipe.seed}), "
        f"{recipe.train.epochs} epochs. PTQ: {recipe.sweep.granularity} weights, "
        f"{'symmetric' if recipe.sweep.symmetric else 'asymmetric'}, first/last: {recipe.sweep.first_last}.\n",
        "## Test accuracy (%) after PTQ\n",
        markdown_table(header, lines),
    ]
    if plot:
        from ..evaluate.plots import plot_accuracy_vs_bits

        plot_accuracy_vs_bits(rows, run_dir / "accuracy_vs_bits.png", title=f"{recipe.name}: accuracy vs bits")
        parts.append("\n![accuracy vs bits](accuracy_vs_bits.png)\n")
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def show_sweep(rows: list[dict], title: str) -> None:
    """Print the sweep as a table (one line per range method)."""
    header, lines = pivot_sweep(rows)
    print_table(header, lines, title=title)


def prepare_from_checkpoint(ckpt: Path, data_root: str | None = None, strict: bool = True) -> Prepared:
    """Rebuild the recipe, data and trained model of a checkpoint written by :func:`train_recipe`
    (``strict=False`` ignores extra tensors such as calibrated activation quantizers)."""
    checkpoint = load_checkpoint(ckpt)
    meta = checkpoint.meta.get("recipe")
    if meta is None:
        raise ValueError(f"checkpoint {ckpt} has no recipe in its meta.json; it was not written by qready train")
    recipe = load_recipe(meta)
    if data_root is not None:
        recipe = replace(recipe, data=replace(recipe.data, root=data_root))
    prepared = prepare(recipe)
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
    (weights on their grid or palette, quantizers baked in)."""
    import copy

    from ..quant.palettize import finalize_palettized, palettize
    from ..quant.qat import finalize, prepare_qat, qat_param_groups
    from ..recipe import QAT_METHODS

    recipe, c = prepared.recipe, prepared.recipe.compress
    model = copy.deepcopy(prepared.model)
    train_cfg = replace(recipe.train, epochs=max(c.epochs, 1), lr=c.lr, warmup_epochs=0)
    fit_kwargs = dict(val_loader=prepared.test_loader, run_dir=run_dir / "compress", resume=True, seed=recipe.seed,
                      meta=checkpoint_meta(recipe, prepared), progress=progress)
    options = dict(c.options)
    if c.method in QAT_METHODS:
        delta_update = options.pop("delta_update", None)  # EWGS: re-estimate δ from the Hessian trace
        model = prepare_qat(model, method=c.method, w_bits=c.w_bits, a_bits=c.a_bits, first_last=c.first_last,
                            calib=prepared.train_loader, inplace=True, **options)
        if delta_update is not None:
            from ..quant.qat.hessian import EWGSDeltaUpdater

            updater = EWGSDeltaUpdater(prepared.train_loader, **(delta_update or {}))
            updater.update(model)
            fit_kwargs["callbacks"] = [updater]
        from ..sharpness.build import build_step

        groups = qat_param_groups(model, lr=c.quantizer_lr or c.lr)
        fit(model, prepared.train_loader, train_cfg, param_groups=groups, step_strategy=build_step(c.sharpness),
            **fit_kwargs)
        return finalize(model)
    select = Selector(first_last=c.first_last) if c.first_last != "same" else None
    if c.method == "kmeans":
        return palettize(model, bits=c.w_bits, method="kmeans", select=select, inplace=True, **options)
    if c.method == "dkm":
        model = palettize(model, bits=c.w_bits, method="dkm", select=select, inplace=True, **options)
        fit(model, prepared.train_loader, train_cfg, **fit_kwargs)
        return finalize_palettized(model)
    from ..regularizers import build

    weight = float(options.pop("weight", 1.0))
    reg = build("cluster", model, weight=weight, select=select, bits=c.w_bits, **options)
    fit(model, prepared.train_loader, train_cfg, loss_terms=[reg], **fit_kwargs)
    return palettize(model, bits=c.w_bits, method="cluster", reg=reg, inplace=True)


def compress_stage(prepared: Prepared, run_dir: Path, *, progress: bool = True) -> dict:
    """Compress, evaluate, save (``compressed/``), export and plot weight histograms; writes
    ``compress.json`` and returns it."""
    from ..evaluate.metrics import evaluate
    from ..regularizers.stats import plot_weight_histograms
    from ..train import save_checkpoint

    c = prepared.recipe.compress
    model = compress_model(prepared, run_dir, progress=progress)
    metrics = evaluate(model, prepared.test_loader)
    row = {"label": _compressed_label(c), "w_bits": c.w_bits, "a_bits": c.a_bits, "range": c.method,
           "granularity": "compressed", "accuracy": metrics["accuracy"], "loss": metrics["loss"]}
    save_checkpoint(run_dir / "compressed", model, meta={**checkpoint_meta(prepared.recipe, prepared), "row": row})
    plot_weight_histograms(prepared.model, model, run_dir / "weights.png")
    out = {"row": row}
    (run_dir / "compress.json").write_text(json.dumps(out, indent=2))
    return out


def export_model(model: nn.Module, prepared: Prepared, run_dir: Path, *, fmt: str | None = None,
                 target: Path | None = None, w_bits: int = 8) -> dict:
    """Export ``model`` (``fmt`` defaults to the recipe's) next to an fp32 safetensors copy of the float
    model; returns ``{format, path, file, bytes, fp32_bytes, ratio}``."""
    from safetensors.torch import save_file

    fmt = fmt or prepared.recipe.export.format
    fp32 = run_dir / "export" / "model_fp32.safetensors"
    fp32.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().clone() for k, v in prepared.model.state_dict().items()
               if v.is_floating_point()}, str(fp32))
    meta = checkpoint_meta(prepared.recipe, prepared)["model"]
    if fmt == "packed":
        from ..export import save_packed

        target = target or run_dir / "export" / "model.qready"
        save_packed(model, target, meta={"model": meta["name"], "model_kwargs": meta["kwargs"]})
    else:
        from ..export.onnx import export_onnx

        target = target or run_dir / "export" / "model.onnx"
        x = next(iter(prepared.test_loader))[0][:1]
        export_onnx(model, x, target, w_bits=w_bits)
    sizes = {"format": fmt, "path": str(target), "file": target.name, "bytes": target.stat().st_size,
             "fp32_bytes": fp32.stat().st_size}
    sizes["ratio"] = sizes["fp32_bytes"] / max(sizes["bytes"], 1)
    return sizes


def export_stage(prepared: Prepared, run_dir: Path) -> dict:
    """Export the compressed model (``compressed/``) when the recipe has a compress stage, otherwise the
    PTQ model at ``export.bits`` (per-channel min-max); writes ``export.json``."""
    from ..quant.ptq import ptq

    recipe = prepared.recipe
    if recipe.compress is not None:
        suffix = ".onnx" if recipe.export.format == "onnx" else ".qready"
        sizes = export_checkpoint(run_dir / "compressed", fmt=recipe.export.format,
                                  out=run_dir / "export" / f"model{suffix}")
        (run_dir / "export.json").write_text(json.dumps(sizes, indent=2))
        return sizes
    bits = recipe.export.bits
    qmodel = ptq(prepared.model, QuantSpec(bits=bits, granularity="channel"))
    sizes = export_model(qmodel, prepared, run_dir, w_bits=bits)
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
                      out: Path | None = None, data_root: str | None = None) -> dict:
    """``qready export``: a float checkpoint is PTQ-quantized at ``bits`` (per-channel min-max) first; a
    run's ``compressed/`` checkpoint is exported as it is."""
    from ..quant.ptq import ptq
    from ..quant.spec import WEIGHT_BITS, check_bits
    from ..train import load_checkpoint

    meta = load_checkpoint(ckpt).meta
    prepared = prepare_from_checkpoint(ckpt, data_root=data_root, strict="row" not in meta)
    bits = bits if bits is not None else (8 if fmt == "onnx" else 4)
    check_bits(bits, "--bits", WEIGHT_BITS)
    act = None if a_bits is None else QuantSpec(bits=a_bits, symmetric=False, granularity="tensor")
    model = prepared.model if "row" in meta else ptq(prepared.model, QuantSpec(bits=bits, granularity="channel"),
                                                     calib=prepared.train_loader if act else None, act_spec=act)
    suffix = ".onnx" if fmt == "onnx" else ".qready"
    name = f"{ckpt.name}{suffix}" if "row" in meta else f"model_w{bits}{suffix}"
    return export_model(model, prepared, ckpt.parent, fmt=fmt, target=out or ckpt.parent / name, w_bits=bits)
