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

if TYPE_CHECKING:  # pragma: no cover  (the lazy exports, for type checkers; "X as X" re-exports)
    from .data import list_datasets as list_datasets
    from .data import load_dataset as load_dataset
    from .evaluate.sweep import sweep as sweep
    from .models import create_model as create_model
    from .models import list_models as list_models
    from .quant.functional import dequantize as dequantize
    from .quant.functional import fake_quantize as fake_quantize
    from .quant.functional import quantize as quantize
    from .quant.palettize import finalize_palettized as finalize_palettized
    from .quant.palettize import palettize as palettize
    from .quant.ptq import ptq as ptq
    from .quant.qat import finalize as finalize
    from .quant.qat import prepare_qat as prepare_qat
    from .quant.select import Selector as Selector
    from .quant.spec import QuantParams as QuantParams
    from .quant.spec import QuantSpec as QuantSpec
    from .recipe import Recipe as Recipe
    from .recipe import load_recipe as load_recipe
    from .train import TrainConfig as TrainConfig
    from .train import fit as fit


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
