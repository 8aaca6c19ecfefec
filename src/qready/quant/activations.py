"""Activation quantization: a calibrated fake-quantizer on a module's input, attached with a hook."""

from __future__ import annotations

import torch
from torch import nn

from .functional import compute_qparams, fake_quantize
from .spec import QuantParams, QuantSpec

ATTR = "input_quantizer"
MAX_SAMPLES = 1 << 16


class InputQuantizer(nn.Module):
    """Base of every activation quantizer, post-training and QAT alike: integer inputs (indices) pass
    through; while ``observing`` values are recorded (:meth:`observe`) and pass unchanged; otherwise
    :meth:`prepare` (e.g. a lazy initialisation) then :meth:`quantize`. Attached to a module's input by
    :func:`attach_input_module`."""

    observing: bool

    def observe(self, x: torch.Tensor) -> None:
        """Record statistics of ``x`` during calibration."""
        raise NotImplementedError

    def prepare(self, x: torch.Tensor) -> None:
        """Called before :meth:`quantize` outside calibration (default: nothing)."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized ``x`` (same shape)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return x
        if self.observing:
            self.observe(x)
            return x
        self.prepare(x)
        return self.quantize(x)


class ActivationQuantizer(InputQuantizer):
    """Per-tensor fake quantization of an activation with parameters fixed after calibration.

    While ``observing`` it records the running min/max and a random subsample (at most 65,536 values
    per call, drawn uniformly with replacement) of what it sees and passes values through unchanged; :meth:`finish_calibration` fixes
    ``scale``/``zero_point`` (buffers, so they are saved with the model).
    """

    def __init__(self, spec: QuantSpec, seed: int = 0) -> None:
        super().__init__()
        if spec.granularity != "tensor":
            raise ValueError(f"activation quantization is per tensor; got granularity={spec.granularity!r}")
        self.spec = spec
        self.observing = True
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self._lo = float("inf")
        self._hi = float("-inf")
        self._samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        """Record statistics of ``x`` (any shape)."""
        flat = x.detach().float().reshape(-1).cpu()
        self._lo = min(self._lo, float(flat.min()))
        self._hi = max(self._hi, float(flat.max()))
        if self.spec.range != "minmax":
            if flat.numel() <= MAX_SAMPLES:
                self._samples.append(flat)
            else:  # uniform draws with replacement: O(samples), not a permutation of the whole tensor
                idx = torch.randint(flat.numel(), (MAX_SAMPLES,), generator=self._generator)
                self._samples.append(flat[idx])

    def finish_calibration(self) -> None:
        """Fix the parameters from what was observed; raises if nothing was observed."""
        if self._lo == float("inf"):
            raise RuntimeError("activation quantizer saw no data during calibration")
        extremes = torch.tensor([self._lo, self._hi])
        if self._samples:
            pool = torch.cat(self._samples)
            if pool.numel() > MAX_SAMPLES:
                pool = pool[torch.randperm(pool.numel(), generator=self._generator)[:MAX_SAMPLES]]
            values = torch.cat([pool, extremes]) if self.spec.range == "mse" else pool
        else:
            values = extremes
        params = compute_qparams(values, self.spec)
        self.scale.copy_(params.scale)
        self.zero_point.copy_(params.zero_point)
        self._samples.clear()
        self.observing = False

    def params(self) -> QuantParams:
        """The calibrated parameters."""
        return QuantParams(
            scale=self.scale,
            zero_point=self.zero_point,
            bits=self.spec.bits,
            qmin=self.spec.qmin,
            qmax=self.spec.qmax,
            granularity="tensor",
            shape=(),
            extra={"binary": self.spec.is_binary},
        )

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.spec, self.params())

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, symmetric={self.spec.symmetric}, range={self.spec.range}"


def _quantize_input_hook(module: nn.Module, args: tuple) -> tuple | None:
    quantizer = getattr(module, ATTR, None)
    if quantizer is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    return (quantizer(args[0]), *args[1:])


def attach_input_quantizer(module: nn.Module, spec: QuantSpec, seed: int = 0) -> ActivationQuantizer:
    """Give ``module`` an :class:`ActivationQuantizer` on its first input (a forward pre-hook)."""
    quantizer = ActivationQuantizer(spec, seed=seed)
    attach_input_module(module, quantizer)
    return quantizer


def input_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    """Every activation quantizer in ``model``."""
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer)]


def attach_input_module(module: nn.Module, quantizer: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Give ``module`` a prebuilt quantizer module on its first input (the same hook as
    :func:`attach_input_quantizer`); returns the hook handle, so the attachment can be undone."""
    if hasattr(module, ATTR):
        raise ValueError(f"{type(module).__name__} already has an input quantizer")
    module.add_module(ATTR, quantizer)
    return module.register_forward_pre_hook(_quantize_input_hook)
