"""GPTQ (Frantar et al., 2022): quantize a layer column by column, spreading each column's rounding
error over the columns not yet quantized so that the layer's output on calibration inputs moves least.

For one matrix product ``Y = W X`` (``W`` ``[R, K]``: rows = outputs, columns = inputs) the output error
``||W X - Q X||^2`` is the quadratic form of ``H = 2 X X^T``. With ``H`` dampened
(``H + damp * mean(diag H) * I``) and ``H^{-1} = U^T U`` (``U`` upper triangular), column ``j`` is
rounded, ``q_j = Q(w_j)``, and its scaled error ``e_j = (w_j - q_j) / U_jj`` is removed from the
columns after it: ``W[:, j+1:] -= e_j U[j, j+1:]``. Columns go in blocks of ``block_size``: inside a block
the update is applied column by column; the block's errors are applied to the remaining columns at once
(one matrix product). With ``H = I`` nothing propagates and GPTQ is round to nearest.

The grid of a column (:class:`UniformGrid` for integer grids, :class:`LutGrid` for palettization LUTs)
follows the layer's quantizer: per-tensor and per-channel scales come from the original weight; per-group
scales are decided when the recursion reaches the group's first column, on the error-updated weights
(blocks are aligned to groups). With ``act_order`` columns are visited by decreasing ``diag(H)`` and all
group scales are fixed beforehand in the original column order ("static groups"), so codes and scales
keep the layout round to nearest gives them and export unchanged.

Columns whose input is always zero (``diag(H) = 0``) do not affect the output; they are rounded to
nearest and nothing propagates through them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn

from ...checks import check_int
from ..functional import compute_qparams, fake_quantize
from ..grid import fake_quantize_rows
from ..layers import layer_spec
from ..ranges import compute_scale_zero_point
from ..spec import QuantParams, QuantSpec
from .capture import LayerStats, matrix_to_weight, supports, weight_matrix
from .methods import PTQ_METHODS
from .params import record_params
from .rtn import round_to_nearest

log = logging.getLogger("qready.ptq.gptq")

MAX_DAMP_RETRIES = 6


class ColumnGrid(Protocol):
    """The grid GPTQ rounds each column onto.

    ``group_size``: columns per scale group decided during the recursion (``None``: all fixed up front);
    ``refresh(col, values)`` is then called at each group's first column with the group's current
    values ``[G, R, L]``. ``quantize(w, cols)`` rounds column values ``[G, R]`` whose original column
    index is ``cols`` (``[G]`` int64, one per weight group).
    """

    group_size: int | None

    def refresh(self, col: int, values: torch.Tensor) -> None: ...

    def quantize(self, w: torch.Tensor, cols: torch.Tensor) -> torch.Tensor: ...


class UniformGrid:
    """The integer grid of a :class:`QuantSpec` for a weight viewed as ``[G, R, K]``.

    Args:
        spec: the quantizer, its ``axis`` already the layer's output axis.
        weight: the original weight (its layout, before any update).
        shape: ``(G, R, K)`` of the weight's matrix view.
        dynamic: decide per-group scales when the recursion reaches each group (natural column order
            only); otherwise every scale comes from ``weight`` up front.
    """

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, shape: tuple[int, int, int], dynamic: bool) -> None:
        groups, rows, cols = shape
        self.spec = spec
        per_group = spec.granularity == "group"
        self.col_size = spec.group_size if per_group else cols
        self.group_size = spec.group_size if per_group and dynamic else None
        count = math.ceil(cols / self.col_size)
        if self.group_size is not None:
            self.scale = torch.ones(groups, rows, count, dtype=weight.dtype, device=weight.device)
            self.zero_point = torch.zeros_like(self.scale)
            return
        params = compute_qparams(weight, spec)
        scale = params.scale.to(weight.dtype)
        zero_point = params.zero_point.to(weight.dtype)
        if spec.granularity == "tensor":
            scale, zero_point = scale.expand(groups * rows * count), zero_point.expand(groups * rows * count)
        self.scale = scale.reshape(groups, rows, count)
        self.zero_point = zero_point.reshape(groups, rows, count)

    def params(self, weight: torch.Tensor) -> QuantParams:
        """The scales and zero points used, as the :class:`QuantParams` of ``weight`` (original layout)."""
        scale, zero_point = self.scale.reshape(-1), self.zero_point.reshape(-1)
        if self.spec.granularity == "tensor":
            scale, zero_point = scale[:1], zero_point[:1]
        return QuantParams(scale=scale.float().clone(), zero_point=zero_point.round().to(torch.int32),
                           bits=self.spec.bits, qmin=self.spec.qmin, qmax=self.spec.qmax,
                           granularity=self.spec.granularity, shape=tuple(weight.shape), axis=self.spec.axis % weight.dim(),
                           group_size=self.spec.group_size, extra={"binary": self.spec.is_binary})

    def refresh(self, col: int, values: torch.Tensor) -> None:
        """Scales of the group starting at ``col`` from its current values ``[G, R, L]``."""
        groups, rows, length = values.shape
        flat = values.reshape(groups * rows, length).float()  # as compute_qparams computes ranges
        if length < self.col_size:  # the last, short group: zero padded as round to nearest pads it
            flat = torch.nn.functional.pad(flat, (0, self.col_size - length))
        counts = torch.full((groups * rows,), length, dtype=flat.dtype, device=flat.device)
        scale, zero_point = compute_scale_zero_point(flat, self.spec, counts)
        index = col // self.col_size
        # float32 scales and integer zero points, as compute_qparams stores them
        self.scale[..., index] = scale.float().reshape(groups, rows).to(self.scale.dtype)
        self.zero_point[..., index] = zero_point.round().reshape(groups, rows).to(self.scale.dtype)

    def quantize(self, w: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest values of ``w`` ``[G, R]`` on the scales of columns ``cols`` ``[G]``."""
        index = (cols // self.col_size)[:, None, None].expand(w.shape[0], w.shape[1], 1)
        scale = self.scale.gather(2, index).reshape(-1, 1)
        zero_point = self.zero_point.gather(2, index).reshape(-1, 1)
        out = fake_quantize_rows(w.reshape(-1, 1), scale, zero_point, self.spec.qmin, self.spec.qmax,
                                 binary=self.spec.is_binary)
        return out.reshape(w.shape)


class LutGrid:
    """A look-up table grid: each row is snapped to the nearest entry of its LUT.

    Args:
        lut: ``[L, 2^b]`` representatives (one LUT per group of output channels).
        row_lut: ``[G, R]`` int64, the LUT of each row of the ``[G, R, K]`` matrix view.
    """

    group_size = None

    def __init__(self, lut: torch.Tensor, row_lut: torch.Tensor) -> None:
        self.lut = lut
        self.row_lut = row_lut.reshape(-1)

    def refresh(self, col: int, values: torch.Tensor) -> None:  # pragma: no cover - LUTs are static
        raise RuntimeError("a LUT grid is fixed up front")

    def quantize(self, w: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Nearest LUT entry of each value of ``w`` ``[G, R]``."""
        from ..palettize.codebook import snap

        return snap(w.reshape(-1), self.lut.to(w.dtype), self.row_lut).reshape(w.shape)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^{-1} = U^T U``, ``[G, K, K]`` float64.

    Dead columns (``diag(H) = 0``) get a unit-scale diagonal (the mean live diagonal) so they stay
    isolated. If a factorisation fails the dampening is multiplied by 10 (at most
    :data:`MAX_DAMP_RETRIES` times, logged).
    """
    h = hessian.to(torch.float64).clone()
    diag = h.diagonal(dim1=1, dim2=2)
    dead = diag == 0
    live_mean = torch.where(dead, 0.0, diag).sum(1) / (~dead).sum(1).clamp_min(1)
    diag.copy_(torch.where(dead, torch.where(live_mean > 0, live_mean, 1.0)[:, None], diag))
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    factor = damp
    for _ in range(MAX_DAMP_RETRIES + 1):
        damped = h + (factor * diag.mean(dim=1))[:, None, None] * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if not bool(info.any()):
            eye_g = eye.expand_as(damped)  # cholesky_solve: much faster than cholesky_inverse on CPU
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_solve(eye_g, lower), upper=True)
            if not bool(info.any()):
                return upper
        factor = factor * 10 if factor > 0 else 1e-6
        log.warning("GPTQ: Hessian not positive definite, dampening raised to %g", factor)
    raise ValueError(f"GPTQ: the Hessian stays singular even with dampening {factor:g}; "
                     "use more calibration batches or a larger damp")


def gptq_matrix(w: torch.Tensor, hessian: torch.Tensor, grid: ColumnGrid, *, block_size: int = 128,
                damp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """GPTQ of ``G`` independent matrices ``w`` ``[G, R, K]`` with Hessians ``hessian`` ``[G, K, K]``.

    Computes in ``w``'s dtype (the Cholesky factor in float64, then cast). Returns the quantized
    ``[G, R, K]``, every value on ``grid``.
    """
    groups, rows, cols = w.shape
    if tuple(hessian.shape) != (groups, cols, cols):
        raise ValueError(f"hessian must be [{groups}, {cols}, {cols}] for weights {tuple(w.shape)}; "
                         f"got {tuple(hessian.shape)}")
    perm = None
    if act_order:
        perm = torch.argsort(hessian.diagonal(dim1=1, dim2=2), dim=1, descending=True, stable=True)
        hessian = hessian.gather(1, perm[:, :, None].expand(-1, -1, cols)).gather(2, perm[:, None, :].expand(-1, cols, -1))
        w = w.gather(2, perm[:, None, :].expand(-1, rows, -1))
    u = inverse_hessian_factor(hessian, damp).to(w.dtype)
    u_diag = u.diagonal(dim1=1, dim2=2)
    w = w.clone()
    q = torch.empty_like(w)
    step = grid.group_size
    block = block_size if step is None else max(step, block_size // step * step)
    natural = torch.zeros(groups, dtype=torch.long, device=w.device)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1 = w[..., start:end]
        u1 = u[:, start:end, start:end]
        d1 = u_diag[:, start:end, None]
        err = torch.empty(groups, rows, end - start, dtype=w.dtype, device=w.device)
        for i in range(end - start):
            j = start + i
            if step is not None and j % step == 0:
                grid.refresh(j, w1[..., i:i + step])
            column = w1[..., i]
            qc = grid.quantize(column, perm[:, j] if perm is not None else natural + j)
            q[..., j] = qc
            e = (column - qc) / d1[:, i]
            err[..., i] = e
            w1[..., i + 1:] -= e[..., None] * u1[:, None, i, i + 1:]
        if end < cols:
            w[..., end:] -= torch.bmm(err, u[:, start:end, end:])
    if perm is not None:
        q = torch.empty_like(q).scatter_(2, perm[:, None, :].expand(-1, rows, -1), q)
    return q


def layer_error(weight_delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Output reconstruction error ``sum_g tr(dW_g H_g dW_g^T) / 2 = ||dW X||^2 / N`` of a ``[G, R, K]``
    weight change on the inputs summarised by ``hessian`` (:meth:`LayerStats.hessian`)."""
    d = weight_delta.to(torch.float64)
    return float(torch.einsum("grk,gkl,grl->", d, hessian.to(torch.float64), d)) / 2.0


@torch.no_grad()
def gptq_layer(module: nn.Module, grid_for: Callable[[torch.Tensor, tuple[int, int, int]], ColumnGrid],
               rounded: torch.Tensor, stats: LayerStats, *, block_size: int, damp: float, act_order: bool
               ) -> ColumnGrid | None:
    """GPTQ of ``module.weight`` in place; ``grid_for(weight, shape)`` builds the :class:`ColumnGrid`.

    ``rounded`` is the weight rounded to nearest on the same grid: GPTQ is greedy, so on the rare layer
    where its output error on the calibration inputs (:func:`layer_error`) exceeds round to nearest's,
    the rounded weight is kept. Returns the grid when GPTQ's result was kept, ``None`` otherwise.
    """
    weight = module.weight
    matrix = weight_matrix(module).float()
    grid = grid_for(weight.detach().float(), tuple(matrix.shape))
    hessian = stats.hessian()
    q = gptq_matrix(matrix, hessian, grid, block_size=block_size, damp=damp, act_order=act_order)
    kept = layer_error(q - matrix, hessian) <= layer_error(weight_matrix(module, rounded).float() - matrix, hessian)
    weight.copy_(matrix_to_weight(module, q).to(weight.dtype) if kept else rounded.to(weight.dtype))
    return grid if kept else None


@PTQ_METHODS.register("gptq")
@dataclass(frozen=True)
class GPTQ:
    """GPTQ options.

    Args:
        block_size: columns per block of lazy updates (128; results do not depend on it, only speed).
        damp: dampening, a fraction of the mean Hessian diagonal added to the diagonal (0.01).
        act_order: visit columns by decreasing Hessian diagonal (static groups keep scales exportable).
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    uses_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int("GPTQ block_size", self.block_size, minimum=1)
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise ValueError(f"GPTQ damp must be a number in [0, 1); got {self.damp!r}")
        if not isinstance(self.act_order, bool):
            raise TypeError(f"GPTQ act_order must be a bool; got {self.act_order!r}")

    def quantize_layer(self, name: str, module: nn.Module, spec: QuantSpec, stats: LayerStats | None) -> None:
        """GPTQ of ``module.weight`` in place; round to nearest when the layer is not a matrix product
        (embeddings), was never called on the calibration batches (``stats is None``) or when rounding
        gives the lower output error on the calibration inputs (see :func:`gptq_layer`)."""
        if stats is None or not supports(module):
            log.debug("GPTQ: %s rounded to nearest (%s)", name, "not called" if stats is None else "embedding")
            round_to_nearest(module, spec)
            return
        spec = layer_spec(module, spec)
        dynamic = spec.granularity == "group" and not self.act_order

        def grid_for(weight: torch.Tensor, shape: tuple[int, int, int]) -> UniformGrid:
            return UniformGrid(spec, weight, shape, dynamic)

        params = compute_qparams(module.weight, spec)
        rounded = fake_quantize(module.weight.detach(), spec, params)
        grid = gptq_layer(module, grid_for, rounded, stats, block_size=self.block_size, damp=self.damp,
                          act_order=self.act_order)
        if grid is None:
            log.info("GPTQ: %s kept round to nearest (lower output error on the calibration data)", name)
        record_params(module, params if grid is None else grid.params(module.weight))
