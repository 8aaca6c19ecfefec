"""Frozen normalization for fine-tuning a pretrained model on a few samples.

A pretrained network's BatchNorm statistics come from its full training set; re-estimating them on a
few hundred fine-tuning samples (train mode) changes the model before any weight has moved, and
dropout makes a student differ from its own frozen copy. :func:`freeze_batchnorm` keeps both in eval
mode during training: running statistics are used and never updated, dropout is off, while the
affine parameters stay trainable and ``model.train()`` still switches everything else (quantizers,
DKM's soft assignment) to training behaviour.
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

FROZEN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _eval_mode(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: run this module in eval mode whatever ``model.train()`` set."""
    module.training = False


def freeze_batchnorm(model: nn.Module, *, dropout: bool = True) -> list[RemovableHandle]:
    """Run every BatchNorm (and, with ``dropout``, every Dropout) module of ``model`` in eval mode,
    even in training, until the returned hook handles are removed (``handle.remove()``).

    The hooks travel with ``copy.deepcopy`` (and so with ``qready.ptq`` copies). Returns one handle
    per frozen module (an empty list when there is none).
    """
    types = FROZEN_TYPES + (DROPOUT_TYPES if dropout else ())
    handles = []
    for module in model.modules():
        if isinstance(module, types):
            module.training = False
            handles.append(module.register_forward_pre_hook(_eval_mode))
    return handles
