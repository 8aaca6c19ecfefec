"""A weight-sharing supernet: one copy of the float model in which every searched layer quantizes with
the bit width of the configuration being evaluated, from the same float weights.

For each layer and each of its candidate bit widths the supernet holds the QAT weight quantizer and
input quantizer that :func:`~qready.sharpness.prepare_mixed` would attach (built by ``prepare_qat``
itself, so methods and options are the same). :meth:`Supernet.set_config` writes each layer's
quantized weight ``Q_b(w)`` (computed from the shared float ``w``) into the working copy and swaps in
the input quantizers at the configuration's bits, then calibrates those on the search batches as
``prepare_mixed`` does. In eval mode the supernet's output for a configuration is therefore exactly
that of ``prepare_mixed(model, config, ...)`` calibrated on the same batches. The working copy's weights
are plain tensors holding ``Q_b(w)``, so a sharpness-aware loss perturbs the *quantized* weights.

No joint fine-tuning: the configuration is handed to QAT/PTQ starting from the original float
weights, so configurations are ranked on those weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..quant.activations import ATTR, attach_input_module
from ..quant.qat import calibrate_activation_quantizers, prepare_qat
from ..quant.qat.quantizers import ActivationQAT
from ..quant.select import Selector
from .search import ActBits, act_bits, exact_names


class Supernet:
    """Switchable per-layer bit widths over one float model.

    Args:
        model: the float model (not modified).
        choices: layer name -> the bit widths that layer may take (weights, 1-8).
        a_bits: input-activation bits per weight bits (``"same"``, an int, or None for float inputs).
        calib: batches that calibrate the input quantizers of each configuration (any batch form).
        calib_batches: how many of them.
        method: the QAT quantizers (``"ste"``, ``"lsq"``, ``"ewgs"``); ``qat_options`` go to ``prepare_qat``
            (e.g. ``w_granularity``, ``range``).
    """

    def __init__(self, model: nn.Module, choices: Mapping[str, Sequence[int]], a_bits: ActBits, calib: Sequence,
                 calib_batches: int, method: str = "lsq", **qat_options) -> None:
        self.a_bits, self.calib, self.calib_batches = a_bits, calib, calib_batches
        self.weight_q: dict[str, dict[int, nn.Module]] = {n: {} for n in choices}
        self.input_q: dict[str, dict[int, ActivationQAT]] = {n: {} for n in choices}
        for b in sorted({b for bits in choices.values() for b in bits}):
            names = [n for n, bits in choices.items() if b in bits]
            view = prepare_qat(model, method=method, w_bits=b, a_bits=act_bits(a_bits, b),
                               select=Selector(include=exact_names(names)), **qat_options)
            for n in names:
                layer = view.get_submodule(n)
                self.weight_q[n][b] = layer.parametrizations.weight[0]
                quantizer = getattr(layer, ATTR, None)
                if quantizer is not None:
                    self.input_q[n][b] = quantizer
        for quantizers in (*self.weight_q.values(), *self.input_q.values()):
            for q in quantizers.values():
                q.requires_grad_(False)  # nothing is trained: gradients flow to the weights only
        self.net = copy.deepcopy(model).eval()
        self.net.requires_grad_(False)
        self.layers = {n: self.net.get_submodule(n) for n in choices}
        self.float = {n: layer.weight.detach().clone() for n, layer in self.layers.items()}
        for n, layer in self.layers.items():
            layer.weight.requires_grad_(True)
            if self.input_q[n]:
                attach_input_module(layer, next(iter(self.input_q[n].values())))
        self.config: dict[str, int] = {}
        self._quantized: dict[tuple[str, int], Tensor] = {}

    def quantized_weight(self, name: str, bits: int) -> Tensor:
        """``Q_bits(w)`` of layer ``name`` from its float weight (computed once: no weight is trained)."""
        key = (name, bits)
        if key not in self._quantized:
            with torch.no_grad():
                self._quantized[key] = self.weight_q[name][bits](self.float[name]).detach()
        return self._quantized[key]

    @property
    def weights(self) -> list[Tensor]:
        """The quantized weights of the current configuration (the tensors a sharpness ascent perturbs)."""
        return [layer.weight for layer in self.layers.values()]

    def set_config(self, config: Mapping[str, int]) -> None:
        """Quantize every layer at its bits in ``config`` (which must cover every layer) and calibrate
        the input quantizers of the configuration."""
        missing = [n for n in self.layers if n not in config]
        wrong = [n for n in self.layers if n in config and config[n] not in self.weight_q[n]]
        if missing or wrong:
            raise ValueError(f"config must give every supernet layer one of its bit widths; missing {missing}, "
                             f"not a choice for {[(n, config[n]) for n in wrong]}")
        with torch.no_grad():
            for n, layer in self.layers.items():
                layer.weight.copy_(self.quantized_weight(n, config[n]))
        active = []
        for n, layer in self.layers.items():
            quantizer = self.input_q[n].get(config[n])
            if quantizer is not None:
                setattr(layer, ATTR, quantizer)
                active.append(quantizer)
        if active:
            calibrate_activation_quantizers(self.net, active, self.calib, self.calib_batches)
        self.config = {n: config[n] for n in self.layers}

    def __call__(self, *args, **kwargs):
        return self.net(*args, **kwargs)
