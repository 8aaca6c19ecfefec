"""What qready offers, read from its registries (``qready list``), and the recipes installed with it."""

from __future__ import annotations

import importlib
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

# (section, module, registry attribute): every name registry of the package
REGISTRIES: tuple[tuple[str, str, str], ...] = (
    ("models", "qready.models.registry", "MODELS"),
    ("datasets", "qready.data.registry", "DATASETS"),
    ("regularizers", "qready.regularizers.base", "REGULARIZERS"),
    ("ptq-methods", "qready.quant.ptq.methods", "PTQ_METHODS"),
    ("qat-methods", "qready.quant.qat.methods", "QAT_METHODS"),
    ("palettizers", "qready.quant.palettize.methods", "PALETTIZERS"),
    ("compress-methods", "qready.app.compress", "COMPRESS_STAGES"),
    ("sharpness", "qready.sharpness.build", "SHARPNESS_KINDS"),
    ("mixed-precision-searches", "qready.sharpness.search", "SEARCHES"),
)
_RECIPES_STACK = ExitStack()


def packaged_recipes() -> dict[str, Path]:
    """``{name: path}`` of the recipes installed with the package (``qready/recipes/*.yaml``)."""
    folder = _RECIPES_STACK.enter_context(resources.as_file(resources.files("qready") / "recipes"))
    return {p.stem: p for p in sorted(Path(folder).glob("*.yaml"))}


def resolve_recipe(source: str | Path) -> Path:
    """``source`` when it is a file, else the installed recipe of that name (``demo`` or ``demo.yaml``);
    ``source`` unchanged when it is neither (the caller reports it missing)."""
    path = Path(source)
    if path.is_file() or len(path.parts) != 1:
        return path
    return packaged_recipes().get(path.name.removesuffix(".yaml"), path)


def catalogue() -> dict[str, list[str]]:
    """``{section: sorted names}`` for every registry in :data:`REGISTRIES` (a registry whose module is
    missing is left out) and the installed ``recipes``."""
    out: dict[str, list[str]] = {}
    for section, module, attr in REGISTRIES:
        try:
            registry = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        out[section] = registry.names()
    out["recipes"] = list(packaged_recipes())
    return out


__all__ = ["REGISTRIES", "catalogue", "packaged_recipes", "resolve_recipe"]
