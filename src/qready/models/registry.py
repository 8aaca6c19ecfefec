"""The model registry: ``MODELS``, :func:`create_model` and :func:`list_models`.

Every model in the zoo is a factory function registered in ``MODELS`` under a short name, and
:func:`create_model` builds one by name, passing keyword arguments through to the factory (so an
unexpected keyword raises ``TypeError`` and an out-of-range value raises ``ValueError``). To add your
own model, decorate a function (or an ``nn.Module`` subclass) that returns an ``nn.Module`` with
``@MODELS.register("name")``, e.g. ``@MODELS.register("tiny") def tiny(num_classes: int = 10,
in_channels: int = 1) -> nn.Module: ...``, and make sure the module holding it is imported before
you call ``create_model("tiny", num_classes=5)``; names are unique, so registering one twice raises
``ValueError``. To stay quantization-ready, keep every weight inside ``nn.Conv1d``/``nn.Conv2d``/
``nn.Linear``/``nn.BatchNorm*`` modules (quantizers attach via ``torch.nn.utils.parametrize`` on
``.weight``) and follow the common constructor arguments ``num_classes`` and ``in_channels``.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable

from torch import nn

from qready.registry import Registry

from .weights import StateDict, load_weights

MODELS: Registry[nn.Module] = Registry("model")


def create_model(name: str, *, weights: str | os.PathLike[str] | StateDict | None = None, **kwargs) -> nn.Module:
    """Build the model registered as ``name``; unknown names raise an error listing the valid ones.

    ``weights``: a state dict, or the path of a file holding one (PyTorch, read with
    ``weights_only=True``, or ``.safetensors``), loaded strictly into the new model (see
    :func:`qready.models.load_weights`); e.g. torchvision's ImageNet MobileNetV2 checkpoint with
    ``create_model("mobilenet_v2", num_classes=1000, stem="imagenet", weights="mobilenet_v2-b0353104.pth")``.
    """
    model = MODELS.build(name, **kwargs)
    return model if weights is None else load_weights(model, weights)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return MODELS.names()


FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def import_factory(path: str) -> Callable[..., nn.Module]:
    """The callable named ``"package.module:function"`` (``"package.module:Class"`` or a dotted
    attribute path after the colon work too), imported now; a clear error when it does not exist."""
    if not isinstance(path, str) or not FACTORY_PATTERN.match(path):
        raise ValueError(f"a model factory must look like 'package.module:function'; got {path!r}")
    module_name, attr = path.split(":")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model factory {path!r}: cannot import module {module_name!r} ({err})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model factory {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model factory {path!r} is not callable")
    return obj  # type: ignore[return-value]
