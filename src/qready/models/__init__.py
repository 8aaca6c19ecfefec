"""The qready model zoo: ``create_model(name, **kwargs)`` builds any registered model.

Registered names: ``mlp``, ``dwcnn``, ``cnn1d``, ``resnet20``, ``resnet56``, ``resnet18``,
``mobilenet_v1``, ``mobilenet_v2``, ``vgg16``, ``alexnet``. See :mod:`qready.models.registry` for
registering your own. ``create_model(name, weights=path)`` loads pretrained weights; ``resnet18`` and
``mobilenet_v2`` use torchvision's parameter names, so torchvision's checkpoints load unchanged.
``freeze_batchnorm(model)`` keeps BatchNorm statistics (and dropout) frozen while fine-tuning.
"""

from __future__ import annotations

from . import alexnet, cnn, mlp, mobilenet, resnet, vgg  # noqa: F401  (registration side effects)
from .freeze import freeze_batchnorm
from .registry import MODELS, create_model, import_factory, list_models
from .weights import WeightsMismatchError, load_weights

__all__ = ["MODELS", "WeightsMismatchError", "create_model", "freeze_batchnorm", "import_factory", "list_models",
           "load_weights"]
