"""Public quantization functions: parameters, fake quantization with a straight-through gradient,
integer codes and back.

``fake_quantize(w, spec)`` returns a tensor of the same shape and dtype holding values on the grid;
its gradient is the identity inside the clipping range and zero outside it (the same gradient as
``torch.fake_quantize_per_channel_affine``). For 1-bit it is the identity everywhere.
"""

from __future__ import annotations

import torch

from .grid import fake_quantize_rows, from_rows, round_to_grid, to_rows
from .ranges import compute_scale_zero_point
from .spec import QuantParams, QuantSpec


def _valid_counts(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """Unpadded elements per row (only differs from the row length for padded groups)."""
    if spec.granularity != "group":
        return None
    ones = torch.ones(w.shape, dtype=w.dtype, device=w.device)
    return to_rows(ones, "group", spec.axis, spec.group_size).sum(dim=1)


def _check_tensor(w: torch.Tensor, spec: QuantSpec) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if spec.granularity != "tensor" and w.dim() > 0 and not -w.dim() <= spec.axis < w.dim():
        raise ValueError(f"QuantSpec.axis={spec.axis} is out of range for a tensor of shape {tuple(w.shape)}")


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> QuantParams:
    """Scale and zero point of ``w`` under ``spec`` (no gradient flows through them)."""
    _check_tensor(w, spec)
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    axis = spec.axis % w.dim() if w.dim() > 0 else 0
    with torch.no_grad():
        rows = to_rows(w.detach().float(), spec.granularity, axis, spec.group_size)
        scale, zero_point = compute_scale_zero_point(rows, spec, _valid_counts(w.float(), spec))
    return QuantParams(
        scale=scale.float(),
        zero_point=zero_point.round().to(torch.int32),
        bits=spec.bits,
        qmin=spec.qmin,
        qmax=spec.qmax,
        granularity=spec.granularity if w.dim() > 0 else "tensor",
        shape=tuple(w.shape),
        axis=axis,
        group_size=spec.group_size,
        extra={"binary": spec.is_binary},
    )


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize rows; backward passes the gradient where the code was not clipped."""

    @staticmethod
    def forward(ctx, rows, scale, zero_point, qmin: int, qmax: int, binary: bool):  # type: ignore[override]
        if binary:
            ctx.binary = True
            return fake_quantize_rows(rows, scale, zero_point, qmin, qmax, binary=True)
        unclamped = torch.round(rows * (1.0 / scale)) + zero_point
        ctx.save_for_backward((unclamped >= qmin) & (unclamped <= qmax))
        ctx.binary = False
        return (torch.clamp(unclamped, qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if ctx.binary:
            return grad_out, None, None, None, None, None
        (mask,) = ctx.saved_tensors
        return grad_out * mask, None, None, None, None, None


def fake_quantize(w: torch.Tensor, spec: QuantSpec, params: QuantParams | None = None) -> torch.Tensor:
    """Quantize-dequantize ``w`` under ``spec`` with a straight-through gradient.

    Args:
        w: float tensor of any shape.
        spec: the quantizer.
        params: precomputed parameters (e.g. calibrated activation ranges); computed from ``w`` if None.
    Returns:
        tensor of ``w``'s shape and dtype, every value on the grid.

    >>> import torch
    >>> from qready import QuantSpec, fake_quantize
    >>> w = torch.tensor([[-1.0, -0.3, 0.2, 1.0]])
    >>> fake_quantize(w, QuantSpec(bits=2, granularity="tensor"))   # grid {-2, -1, 0, 1} * 1.0
    tensor([[-1.,  0.,  0.,  1.]])
    """
    params = params if params is not None else compute_qparams(w, spec)
    rows = to_rows(w, params.granularity, params.axis, params.group_size)
    scale = params.scale.to(device=w.device, dtype=w.dtype)[:, None]
    zp = params.zero_point.to(device=w.device, dtype=w.dtype)[:, None]
    out = _FakeQuantSTE.apply(rows, scale, zp, params.qmin, params.qmax, bool(params.extra.get("binary")))
    return from_rows(out, tuple(w.shape), params.granularity, params.axis)


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """Smallest integer dtype holding ``[qmin, qmax]``."""
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    if qmin >= -(2**15) and qmax < 2**15:
        return torch.int16
    return torch.int32


def quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, QuantParams]:
    """Integer codes of ``w`` (same shape, smallest integer dtype) and their :class:`QuantParams`.

    1-bit codes are ``{0, 1}`` for ``{-scale, +scale}``.

    >>> import torch
    >>> from qready import QuantSpec, dequantize, quantize
    >>> w = torch.tensor([[-1.0, -0.3, 0.2, 1.0]])
    >>> codes, params = quantize(w, QuantSpec(bits=4, granularity="tensor"))
    >>> codes.tolist(), round(float(params.scale[0]) * 7, 6)
    ([[-7, -2, 1, 7]], 1.0)
    >>> torch.allclose(dequantize(codes, params), torch.tensor([[-1.0, -2 / 7, 1 / 7, 1.0]]))
    True
    """
    params = compute_qparams(w, spec)
    with torch.no_grad():
        rows = to_rows(w.detach().float(), params.granularity, params.axis, params.group_size)
        if spec.is_binary:
            q = (rows >= 0).float()
        else:
            q = round_to_grid(rows, params.scale[:, None], params.zero_point.float()[:, None], spec.qmin, spec.qmax)
        codes = from_rows(q, tuple(w.shape), params.granularity, params.axis)
    return codes.to(code_dtype(spec.qmin, spec.qmax)), params


def dequantize(codes: torch.Tensor, params: QuantParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float values ``(codes - zero_point) * scale`` (1-bit: ``(2 * code - 1) * scale``), shape of ``codes``."""
    if tuple(codes.shape) != tuple(params.shape):
        raise ValueError(f"codes have shape {tuple(codes.shape)} but the parameters are for {params.shape}")
    rows = to_rows(codes.to(torch.float32), params.granularity, params.axis, params.group_size)
    scale = params.scale.float().to(codes.device)[:, None]
    if params.extra.get("binary"):
        values = (2.0 * rows - 1.0) * scale
    else:
        values = (rows - params.zero_point.float().to(codes.device)[:, None]) * scale
    return from_rows(values, tuple(params.shape), params.granularity, params.axis).to(dtype)
