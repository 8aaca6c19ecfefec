"""What GPTQ and bias correction need from the calibration data: each layer's input statistics.

A layer is seen as ``G`` independent matrix products ``Y_g = W_g X_g`` (``G`` = convolution groups,
1 otherwise):

* ``nn.Linear`` (and any 2-D weight whose input features are the last axis of ``x``, e.g. Hugging Face
  ``Conv1D``): ``W`` is ``[out, in]`` (read along the layer's output axis), ``X`` the flattened inputs;
* ``nn.Conv1d/2d/3d``: ``W`` is the weight reshaped ``[out, in/G * prod(kernel)]`` and ``X`` the
  im2col matrix (one column per output position, rows in the same ``(channel, k1, k2, ...)`` order as
  the weight); grouped and depthwise convolutions give one ``[K, K]`` Hessian per group.

Per layer we accumulate ``S = sum x x^T`` (``[G, K, K]``, float64 running sum of float32 chunk products),
the column sum ``sum x`` (``[G, K]``, likewise) and the column count ``N``; the GPTQ Hessian is ``H = 2 S / N``.
Inputs are processed in chunks of at most :data:`CHUNK_ELEMENTS` im2col elements, so memory stays
bounded whatever the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import out_axis, takes_index_inputs

CHUNK_ELEMENTS = 1 << 23


@dataclass
class LayerStats:
    """Running input statistics of one layer: ``xx`` ``[G, K, K]`` and ``x_sum`` ``[G, K]`` (float64),
    ``count`` columns seen."""

    xx: torch.Tensor | None
    x_sum: torch.Tensor
    count: int = 0

    def hessian(self) -> torch.Tensor:
        """``H = 2 X X^T / N``, ``[G, K, K]`` float64."""
        if self.xx is None:
            raise ValueError("these statistics were captured without the Hessian")
        return self.xx * (2.0 / max(self.count, 1))

    def mean(self) -> torch.Tensor:
        """Mean input column ``E[x]``, ``[G, K]`` float64."""
        return self.x_sum / max(self.count, 1)


def is_conv(module: nn.Module) -> bool:
    """A forward (not transposed) convolution."""
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def supports(module: nn.Module) -> bool:
    """True when the layer's output is a matrix product GPTQ can compensate (Linear-like or forward conv)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or takes_index_inputs(module):
        return False
    if is_conv(module):
        return True
    return weight.dim() == 2 and out_axis(module) is not None and not isinstance(module, nn.modules.conv._ConvNd)


def _groups(module: nn.Module) -> int:
    return int(module.groups) if is_conv(module) else 1


def weight_matrix(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (or a tensor of its shape, e.g. a weight change) as ``[G, out/G, K]`` (a copy-free
    view when the output axis is 0)."""
    weight = module.weight if weight is None else weight
    moved = weight.movedim(out_axis(module), 0)
    groups = _groups(module)
    return moved.reshape(groups, moved.shape[0] // groups, -1)


def matrix_to_weight(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`: ``[G, out/G, K]`` back to the weight's shape and layout."""
    axis = out_axis(module)
    moved_shape = list(module.weight.shape)
    moved_shape.insert(0, moved_shape.pop(axis))
    return matrix.reshape(moved_shape).movedim(0, axis)


def _conv_padding(module: nn.modules.conv._ConvNd) -> list[int]:
    """``F.pad`` amounts (last spatial dimension first) reproducing the convolution's padding."""
    pads: list[int] = []
    for dim in reversed(range(len(module.kernel_size))):
        if module.padding == "valid":
            left = right = 0
        elif module.padding == "same":
            total = module.dilation[dim] * (module.kernel_size[dim] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[dim]
        pads += [left, right]
    return pads


def im2col(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """im2col of a batched convolution input ``[B, C, *S]``: ``[B, C * prod(kernel), L]`` with rows in
    ``(channel, k1, k2, ...)`` order (as :func:`torch.nn.functional.unfold` for 2-D) and ``L`` output
    positions, so that ``conv(x) == W.reshape(out, -1) @ im2col(x)`` (one group, no bias)."""
    pads = _conv_padding(module)
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
    dims = len(module.kernel_size)
    for d in range(dims):
        span = module.dilation[d] * (module.kernel_size[d] - 1) + 1
        x = x.unfold(2 + d, span, module.stride[d])
    # x: [B, C, L1..Ld, span1..spand] -> keep every dilation-th tap
    taps = tuple(slice(None, None, module.dilation[d]) for d in range(dims))
    x = x[(Ellipsis, *taps)]
    batch, channels = x.shape[:2]
    order = [0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims)]
    return x.permute(order).reshape(batch, channels * math.prod(module.kernel_size), -1)


def _is_pointwise(module: nn.modules.conv._ConvNd) -> bool:
    """A convolution whose im2col is its input itself (1-sized kernel, stride 1, no padding)."""
    return (all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride)
            and not any(_conv_padding(module)))


def _conv_cols(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """A convolution's im2col split by group: ``[B, G, K, L]`` (a view of ``x`` for pointwise convolutions)."""
    if x.dim() == len(module.kernel_size) + 1:  # unbatched input
        x = x.unsqueeze(0)
    batch = x.shape[0]
    cols = x.reshape(batch, x.shape[1], -1) if _is_pointwise(module) else im2col(module, x)  # [B, C*k, L]
    return cols.reshape(batch, module.groups, cols.shape[1] // module.groups, cols.shape[2])


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``[G, K, N]``: one row per input feature (im2col row for convolutions), one
    column per output position and sample (a view for Linear-like layers)."""
    if is_conv(module):
        cols = _conv_cols(module, x)
        return cols.permute(1, 2, 0, 3).reshape(cols.shape[1], cols.shape[2], -1)
    return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)


def _gram(module: nn.Module, x: torch.Tensor, with_hessian: bool) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """``(sum x x^T [G, K, K] or None without the Hessian, sum x [G, K], N)`` of one input chunk, float32.

    A convolution with at least as many output positions per sample as features (``L >= K``) is
    reduced per sample and summed (no copy of the im2col matrix); otherwise through :func:`input_rows`.
    """
    if is_conv(module):
        cols = _conv_cols(module, x)  # [B, G, K, L]
        if not with_hessian or cols.shape[3] >= cols.shape[2]:
            xx = torch.matmul(cols, cols.transpose(2, 3)).sum(0) if with_hessian else None
            return xx, cols.sum(dim=(0, 3)), cols.shape[0] * cols.shape[3]
    rows = input_rows(module, x)  # [G, K, N]
    return (torch.bmm(rows, rows.transpose(1, 2)) if with_hessian else None), rows.sum(dim=2), rows.shape[2]


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``[G, N, K]`` columns (one row per output position and sample): the
    transpose of :func:`input_rows` (a view)."""
    return input_rows(module, x).transpose(1, 2)


def _chunks(module: nn.Module, x: torch.Tensor):
    """``x`` split along its first axis so each chunk's im2col has at most :data:`CHUNK_ELEMENTS` values."""
    if x.dim() == 0 or x.shape[0] <= 1:
        yield x
        return
    per_sample = x[:1].numel()
    if is_conv(module):
        per_sample *= math.prod(module.kernel_size) / math.prod(module.stride)
    step = max(1, int(CHUNK_ELEMENTS // max(per_sample, 1)))
    yield from x.split(step)


class StatsCollector:
    """Accumulates :class:`LayerStats` of one layer from the inputs it is called with."""

    def __init__(self, module: nn.Module, with_hessian: bool) -> None:
        self.module = module
        self.with_hessian = with_hessian
        self.stats: LayerStats | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add the input ``x`` of one call of the layer."""
        for chunk in _chunks(self.module, x.detach()):
            xx, x_sum, count = _gram(self.module, chunk.float(), self.with_hessian)
            if self.stats is None:
                groups, k = x_sum.shape
                zeros = torch.zeros(groups, k, k, dtype=torch.float64, device=x_sum.device) if self.with_hessian else None
                self.stats = LayerStats(zeros, torch.zeros(groups, k, dtype=torch.float64, device=x_sum.device))
            if xx is not None:
                self.stats.xx += xx.double()
            # float32 sums of one bounded chunk, accumulated in float64
            self.stats.x_sum += x_sum.double()
            self.stats.count += count
