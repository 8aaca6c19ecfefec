"""qready: make PyTorch models quantization-ready.

``import qready`` is light: it imports neither torch nor any optional dependency until a name is
used. The public names below resolve lazily on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "QuantSpec": "qready.quant.spec",
    "QuantParams": "qready.quant.spec",
    "Selector": "qready.quant.select",
    "fake_quantize": "qready.quant.functional",
    "quantize": "qready.quant.functional",
    "dequantize": "qready.quant.functional",
    "ptq": "qready.quant.ptq",
    "prepare_qat": "qready.quant.qat",
    "finalize": "qready.quant.qat",
    "palettize": "qready.quant.palettize",
    "finalize_palettized": "qready.quant.palettize",
    "sweep": "qready.evaluate.sweep",
    "create_model": "qready.models",
    "list_models": "qready.models",
    "load_dataset": "qready.data",
    "list_datasets": "qready.data",
    "fit": "qready.train",
    "TrainConfig": "qready.train",
    "Recipe": "qready.recipe",
    "load_recipe": "qready.recipe",
}
_SUBMODULES = ("quant", "models", "data", "train", "evaluate", "recipe", "regularizers", "sharpness", "export")

__all__ = sorted({*_LAZY, *_SUBMODULES, "__version__"})

if TYPE_CHECKING:  # pragma: no cover
    from .data import list_datasets, load_dataset
    from .evaluate.sweep import sweep
    from .models import create_model, list_models
    from .quant.functional import dequantize, fake_quantize, quantize
    from .quant.palettize import finalize_palettized, palettize
    from .quant.ptq import ptq
    from .quant.qat import finalize, prepare_qat
    from .quant.select import Selector
    from .quant.spec import QuantParams, QuantSpec
    from .recipe import Recipe, load_recipe
    from .train import TrainConfig, fit


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"qready.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'qready' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
