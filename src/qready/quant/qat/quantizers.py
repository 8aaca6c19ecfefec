"""Quantizer modules for quantization-aware training: STE, LSQ and EWGS.

Weight quantizers are parametrizations (``forward(weight) -> quantized weight``, same shape), built
from the weight they will quantize so they are initialised from it. Activation quantizers sit on a
module's input (see :func:`qready.quant.activations.attach_input_module`) and are initialised from
calibration batches, or from the first batch they see.

* **STE**: fake quantization (:func:`~qready.quant.functional.fake_quantize`) with a straight-through
  gradient that is zero where a value was clipped. Weight ranges come from the current weights at
  every step; activation ranges are an exponential moving average (``momentum``) of each training
  batch's range, fixed in eval mode.
* **LSQ** (Esser et al., 2020): learnable step ``s``;
  ``v_hat = round(clip(v / s, -Q_N, Q_P)) * s`` with a straight-through round, the gradient of ``s``
  multiplied by ``g = 1 / sqrt(N * Q_P)`` (``N``: elements sharing the step), initial
  ``s = 2 * mean|v| / sqrt(Q_P)``. Signed grids use ``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``;
  unsigned ones (activations that were never negative during initialisation) ``Q_N = 0``,
  ``Q_P = 2^b - 1``. **1-bit** weights use the binary form ``v_hat = sign(clip(v / s, -1, 1)) * s``
  (``sign(0) = +1``, ``Q_N = Q_P = 1``): ``d v_hat / d s = sign(v) - v / s`` inside ``|v| <= s`` and
  ``sign(v)`` outside, ``g = 1 / sqrt(N)``, initial ``s = mean|v|`` (the least-squares scale).
* **EWGS** (Lee et al., 2021): learnable bounds ``l < u``; ``x_n = clip((x - l) / (u - l), 0, 1)``,
  ``x_q = round(x_n * (2^b - 1)) / (2^b - 1)``, output ``l + x_q * (u - l)``. The rounding's backward
  is ``g_n = g_q * (1 + delta * sign(g_q) * (x_n - x_q))`` (both in the normalised domain).
  The paper rescales weights to ``[-1, 1]`` and multiplies the layer output by a learnable scale;
  rescaling to ``[l, u]`` is the same family of grids with one scale fewer.

Grads keep values exact: :func:`grad_scale` and :func:`straight_through` return their value argument
bit for bit (a ``y = x * g + (x - x * g).detach()`` form can be one rounding off), so a model
evaluates identically before and after :func:`qready.quant.qat.finalize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..activations import ActivationQuantizer, InputQuantizer
from ..functional import compute_qparams, fake_quantize
from ..grid import from_rows, to_rows
from ..ranges import MIN_SCALE, scale_zero_point_from_range
from ..spec import QuantParams, QuantSpec

# --------------------------------------------------------------------------- gradient helpers


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``g`` in the backward pass."""
    scaled = x * g
    return x.detach() + (scaled - scaled.detach())


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value ``q`` (e.g. ``round(x)``), gradient as if the identity of ``x``."""
    return q.detach() + (x - x.detach())


def lsq_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)`` of LSQ: signed ``(2^(b-1), 2^(b-1) - 1)``, unsigned ``(0, 2^b - 1)``, 1-bit ``(1, 1)``."""
    if bits == 1:
        return 1, 1
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_quantize(v: torch.Tensor, step: torch.Tensor, q_n: int, q_p: int, g: float, binary: bool = False) -> torch.Tensor:
    """LSQ fake quantization of ``v`` with step ``step`` (broadcastable to ``v``) and gradient scale ``g``."""
    s = grad_scale(step, g)
    v_c = torch.clamp(v * (1.0 / s), -q_n, q_p)
    q = torch.where(v_c >= 0, 1.0, -1.0).to(v_c.dtype) if binary else torch.round(v_c)
    return straight_through(v_c, q) * s


class EWGSRound(torch.autograd.Function):
    """``x_q = round(x_n * L) / L`` for ``x_n`` in [0, 1]; backward ``g * (1 + delta * sign(g) * (x_n - x_q))``.

    The backward is made of differentiable operations, so Hessian-vector products through it work.
    """

    @staticmethod
    def forward(ctx, x_n: torch.Tensor, levels: int, delta: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x_q = torch.round(x_n * levels) / levels
        ctx.save_for_backward(x_n - x_q, delta)
        return x_q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        diff, delta = ctx.saved_tensors
        return grad * (1 + delta.to(grad.dtype) * torch.sign(grad) * diff), None, None


def ewgs_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, levels: int,
                  delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EWGS fake quantization; returns ``(l + x_q * (u - l), x_q)`` with ``x_q`` in the normalised domain."""
    width = (upper - lower).clamp_min(MIN_SCALE)
    x_n = torch.clamp((x - lower) / width, 0.0, 1.0)
    x_q = EWGSRound.apply(x_n, levels, delta)
    return x_q * width + lower, x_q


# --------------------------------------------------------------------------- statistics


@dataclass
class RunningStats:
    """Moments and extremes of every value seen (float64 accumulation)."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    total_abs: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    def update(self, x: torch.Tensor) -> None:
        """Add the values of ``x`` (any shape)."""
        flat = x.detach().reshape(-1).double()
        self.count += flat.numel()
        self.total += float(flat.sum())
        self.total_sq += float(flat.pow(2).sum())
        self.total_abs += float(flat.abs().sum())
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def mean_abs(self) -> float:
        return self.total_abs / self.count

    @property
    def std(self) -> float:
        return math.sqrt(max(self.total_sq / self.count - self.mean**2, 0.0))


# --------------------------------------------------------------------------- base classes


class QATQuantizer(nn.Module):
    """Base of every QAT quantizer (weights and activations), so they can be found in a model."""

    bits: int


class WeightQuantizer(QATQuantizer):
    """A parametrization quantizing a weight in scale-group rows ``[G, M]`` (per tensor, or per channel
    along ``axis``, the weight's output-channel axis)."""

    def __init__(self, bits: int, granularity: str, axis: int = 0) -> None:
        super().__init__()
        if granularity not in ("tensor", "channel"):
            raise ValueError(f"weight granularity must be 'tensor' or 'channel'; got {granularity!r}")
        self.bits = bits
        self.granularity = granularity
        self.axis = axis

    def rows(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` viewed as ``[G, M]``: one row per output channel, or one row."""
        return to_rows(w, self.granularity, self.axis)

    def quantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return from_rows(self.quantize_rows(self.rows(w)), tuple(w.shape), self.granularity, self.axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}, axis={self.axis}"


class ActivationQAT(InputQuantizer, QATQuantizer):
    """Per-tensor activation quantizer with data-driven initialisation.

    While ``observing`` (calibration) values pass through unchanged and are recorded; the first
    forward of a quantizer that was never initialised records that batch and initialises from it.
    ``initialized``/``signed`` are saved in the state dict (as the module's extra state).
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.observing = False
        self.initialized = False
        self.signed = False
        self.stats = RunningStats()

    def observe(self, x: torch.Tensor) -> None:
        """Record statistics of ``x``."""
        self.stats.update(x)

    def finish_calibration(self) -> None:
        """Initialise the parameters from what was observed; raises if nothing was."""
        if self.stats.count == 0:
            raise RuntimeError(f"{type(self).__name__} saw no data during calibration")
        self.signed = self.stats.lo < 0
        with torch.no_grad():
            self.init_from_stats()
        self.stats = RunningStats()
        self.observing = False
        self.initialized = True

    def init_from_stats(self) -> None:
        raise NotImplementedError

    def prepare(self, x: torch.Tensor) -> None:
        """Initialise from the first batch seen when no calibration ran."""
        if not self.initialized:
            self.observe(x)
            self.finish_calibration()

    def finalized(self) -> nn.Module:
        """The fixed quantizer a finalized model keeps (same outputs as this one in eval mode)."""
        self.requires_grad_(False)
        return self

    def get_extra_state(self) -> torch.Tensor:
        """``[initialized, signed]`` as a tensor (state dicts saved to safetensors hold only tensors)."""
        return torch.tensor([int(self.initialized), int(self.signed)], dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.initialized, self.signed = (bool(v) for v in state.tolist())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, initialized={self.initialized}"


def _fixed_activation_quantizer(spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor) -> ActivationQuantizer:
    """A calibrated PTQ :class:`ActivationQuantizer` holding ``scale``/``zero_point`` (shape ``[1]``)."""
    fixed = ActivationQuantizer(spec)
    fixed.scale.copy_(scale.detach().reshape(1))
    fixed.zero_point.copy_(zero_point.detach().round().reshape(1).to(torch.int32))
    fixed.observing = False
    return fixed.to(device=scale.device, dtype=scale.dtype)


# --------------------------------------------------------------------------- STE


class STEWeightQuantizer(WeightQuantizer):
    """Straight-through fake quantization; the range is recomputed from the weight at every call."""

    def __init__(self, weight: torch.Tensor, bits: int, granularity: str = "channel", range: str = "minmax",
                 axis: int = 0) -> None:
        super().__init__(bits, granularity, axis)
        self.spec = QuantSpec(bits=bits, symmetric=True, granularity=granularity, range=range, axis=axis)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.spec)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, range={self.spec.range}"


class STEActivationQuantizer(ActivationQAT):
    """Asymmetric per-tensor fake quantization with a moving-average range.

    ``lo``/``hi`` (buffers) are the average of the calibration batches' ranges, then move by
    ``momentum`` toward each training batch's range; in eval mode they are fixed. Each batch's range
    comes from :func:`~qready.quant.functional.compute_qparams` (``range``: minmax, mse, percentile).
    """

    def __init__(self, bits: int, range: str = "minmax", momentum: float = 0.1) -> None:
        super().__init__(bits)
        self.spec = QuantSpec(bits=bits, symmetric=False, granularity="tensor", range=range)
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(1))
        self.register_buffer("hi", torch.ones(1))
        self._batches = 0

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range ``(lo, hi)`` of one batch under ``spec``."""
        p = compute_qparams(x.detach().float().reshape(-1), self.spec)
        return (self.spec.qmin - p.zero_point.float()) * p.scale, (self.spec.qmax - p.zero_point.float()) * p.scale

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        lo, hi = self.batch_range(x)
        self._batches += 1
        with torch.no_grad():
            weight = 1.0 / self._batches  # cumulative average over the calibration batches
            self.lo.lerp_(lo.to(self.lo), weight)
            self.hi.lerp_(hi.to(self.hi), weight)

    def init_from_stats(self) -> None:
        self._batches = 0

    def params(self) -> QuantParams:
        """Scale and zero point of the current range."""
        scale, zp = scale_zero_point_from_range(self.lo, self.hi, self.spec)
        return QuantParams(scale=scale, zero_point=zp, bits=self.bits, qmin=self.spec.qmin, qmax=self.spec.qmax,
                           granularity="tensor", shape=(), extra={"binary": False})

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.momentum > 0:
            lo, hi = self.batch_range(x)
            with torch.no_grad():
                self.lo.lerp_(lo.to(self.lo), self.momentum)
                self.hi.lerp_(hi.to(self.hi), self.momentum)
        return fake_quantize(x, self.spec, self.params())

    def finalized(self) -> ActivationQuantizer:
        p = self.params()
        return _fixed_activation_quantizer(self.spec, p.scale, p.zero_point)


# --------------------------------------------------------------------------- LSQ


class LSQWeightQuantizer(WeightQuantizer):
    """LSQ on a weight: one learnable step per output channel (or per tensor), signed grid."""

    def __init__(self, weight: torch.Tensor, bits: int, granularity: str = "channel", axis: int = 0) -> None:
        super().__init__(bits, granularity, axis)
        self.q_n, self.q_p = lsq_bounds(bits, signed=True)
        rows = self.rows(weight.detach())
        mean_abs = rows.abs().mean(dim=1, keepdim=True)
        init = mean_abs if bits == 1 else 2 * mean_abs / math.sqrt(self.q_p)
        self.step = nn.Parameter(init.clamp_min(MIN_SCALE).clone())
        self.grad_factor = 1.0 / math.sqrt(rows.shape[1] * self.q_p)

    def quantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        step = self.step.clamp_min(MIN_SCALE)
        return lsq_quantize(rows, step, self.q_n, self.q_p, self.grad_factor, binary=self.bits == 1)


class LSQActivationQuantizer(ActivationQAT):
    """LSQ on an activation: one learnable step; unsigned grid unless negative values were seen at init.

    The gradient scale uses ``N`` = features per sample (``x[0].numel()``).
    """

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.step = nn.Parameter(torch.ones(1))

    @property
    def bounds(self) -> tuple[int, int]:
        return lsq_bounds(self.bits, self.signed)

    def init_from_stats(self) -> None:
        _, q_p = self.bounds
        self.step.fill_(max(2 * self.stats.mean_abs / math.sqrt(q_p), MIN_SCALE))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        q_n, q_p = self.bounds
        features = x[0].numel() if x.dim() > 1 else x.numel()
        step = self.step.clamp_min(MIN_SCALE).to(x.dtype)
        return lsq_quantize(x, step, q_n, q_p, 1.0 / math.sqrt(features * q_p))

    def finalized(self) -> ActivationQuantizer:
        spec = QuantSpec(bits=self.bits, symmetric=self.signed, granularity="tensor")
        step = self.step.detach().clamp_min(MIN_SCALE)
        return _fixed_activation_quantizer(spec, step, torch.zeros_like(step))


# --------------------------------------------------------------------------- EWGS


class EWGSMixin:
    """What the EWGS weight and activation quantizers share: ``delta`` and the Hessian probe capture.

    With ``capture = True`` the next forward stores its normalised quantized values (``x_q``, still
    in the autograd graph) in ``captured``; :mod:`qready.quant.qat.hessian` uses them to estimate ``delta``.
    """

    capture: bool = False
    captured: torch.Tensor | None = None

    def _keep(self, x_q: torch.Tensor) -> None:
        if self.capture:
            self.captured = x_q


class EWGSWeightQuantizer(EWGSMixin, WeightQuantizer):
    """EWGS on a weight: learnable bounds per tensor (the paper) or per channel, init ``-/+ 3 std``."""

    def __init__(self, weight: torch.Tensor, bits: int, granularity: str = "tensor", delta: float = 1e-3,
                 axis: int = 0) -> None:
        super().__init__(bits, granularity, axis)
        rows = self.rows(weight.detach())
        half = (3 * rows.std(dim=1, correction=0, keepdim=True)).clamp_min(MIN_SCALE)
        self.lower = nn.Parameter(-half.clone())
        self.upper = nn.Parameter(half.clone())
        self.register_buffer("delta", torch.tensor(float(delta)))
        self.levels = 2**bits - 1

    def quantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        out, x_q = ewgs_quantize(rows, self.lower, self.upper, self.levels, self.delta)
        self._keep(x_q)
        return out


class EWGSActivationQuantizer(EWGSMixin, ActivationQAT):
    """EWGS on an activation: learnable per-tensor bounds.

    Initialisation: for non-negative inputs (post-ReLU) the paper's ``l = 0``, ``u = 3 sigma`` with
    ``sigma = std / sqrt(1 - 2/pi)`` (the half-normal correction); for signed inputs
    ``mean -/+ 3 std``; both clipped to the observed extremes.
    """

    def __init__(self, bits: int, delta: float = 1e-3) -> None:
        super().__init__(bits)
        self.lower = nn.Parameter(torch.zeros(1))
        self.upper = nn.Parameter(torch.ones(1))
        self.register_buffer("delta", torch.tensor(float(delta)))
        self.levels = 2**bits - 1

    def init_from_stats(self) -> None:
        st = self.stats
        if self.signed:
            lo, hi = max(st.mean - 3 * st.std, st.lo), min(st.mean + 3 * st.std, st.hi)
        else:
            lo, hi = st.lo, min(3 * st.std / math.sqrt(1 - 2 / math.pi), st.hi)
        hi = max(hi, lo + MIN_SCALE)
        self.lower.fill_(lo)
        self.upper.fill_(hi)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        out, x_q = ewgs_quantize(x, self.lower.to(x.dtype), self.upper.to(x.dtype), self.levels, self.delta)
        self._keep(x_q)
        return out
