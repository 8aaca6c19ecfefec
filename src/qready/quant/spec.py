"""What a quantizer does: :class:`QuantSpec` (the request) and :class:`QuantParams` (the result).

Integer grids (``b`` bits):

* signed symmetric: codes in ``[-2^(b-1), 2^(b-1) - 1]`` (``restricted=True``: ``[-(2^(b-1) - 1), 2^(b-1) - 1]``),
  zero point 0, ``scale = amax / (2^(b-1) - 1)`` so the largest magnitude is exactly representable;
* asymmetric (unsigned): codes in ``[0, 2^b - 1]`` with an integer zero point; the range always
  contains 0 so that zero (padding, ReLU outputs, pruned weights) is exact;
* 1 bit: ``Q(w) = scale * sign(w)`` (sign(0) = +1), codes ``{0, 1}``, ``scale`` = mean |w| of the
  group (the least-squares optimum, so every range method gives the same scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "group"]
RangeMethod = Literal["minmax", "mse", "percentile"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
RANGE_METHODS: tuple[str, ...] = ("minmax", "mse", "percentile")
VALID_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 16)
WEIGHT_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
ACT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 16)


def check_bits(bits: object, field_name: str = "bits", allowed: tuple[int, ...] = VALID_BITS) -> int:
    """Return ``bits`` as an int, or raise ``ValueError``/``TypeError`` naming the field and allowed values."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{field_name} must be an int, one of {list(allowed)}; got {bits!r}")
    if bits not in allowed:
        raise ValueError(f"{field_name} must be one of {list(allowed)}; got {bits}")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """A uniform quantizer.

    Args:
        bits: bit width, 1-8 (16 also allowed, for activations).
        symmetric: signed grid with zero point 0 (True) or unsigned grid with a zero point (False).
            1-bit quantization is always symmetric (sign times scale).
        granularity: one scale for the whole ``"tensor"``, one per ``"channel"`` (slice along ``axis``),
            or one per ``"group"`` of ``group_size`` consecutive elements within a channel.
        range: how the clipping range is chosen: ``"minmax"`` (observed extremes), ``"mse"`` (grid
            search of the clipping ratio minimising ``||W - Q(W)||^2`` per scale group) or
            ``"percentile"`` (``percentile`` of the values, or of their magnitudes when symmetric).
        group_size: elements per group (``granularity="group"`` only). Channels whose length is not a
            multiple are zero-padded for the statistics; zero is always representable, so padding
            never changes a min-max range.
        axis: channel axis (0 = output channels of Linear/Conv weights).
        percentile: percentile in (0, 100] for ``range="percentile"``.
        mse_grid: number of clipping ratios tried by ``range="mse"`` (evenly spaced in (0, 1], 1 included).
        restricted: symmetric only: drop the most negative code so the grid is symmetric about 0.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "channel"
    range: RangeMethod = "minmax"
    group_size: int | None = None
    axis: int = 0
    percentile: float = 99.99
    mse_grid: int = 100
    restricted: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits, "QuantSpec.bits")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity must be one of {list(GRANULARITIES)}; got {self.granularity!r}"
            )
        if self.range not in RANGE_METHODS:
            raise ValueError(f"QuantSpec.range must be one of {list(RANGE_METHODS)}; got {self.range!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
                raise ValueError(
                    f"QuantSpec.group_size must be a positive int when granularity='group'; got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError("QuantSpec.group_size is only used with granularity='group'")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QuantSpec.symmetric must be a bool; got {self.symmetric!r}")
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise TypeError(f"QuantSpec.axis must be an int; got {self.axis!r}")
        if not (0.0 < float(self.percentile) <= 100.0):
            raise ValueError(f"QuantSpec.percentile must be in (0, 100]; got {self.percentile!r}")
        if not isinstance(self.mse_grid, int) or self.mse_grid < 1:
            raise ValueError(f"QuantSpec.mse_grid must be a positive int; got {self.mse_grid!r}")

    @property
    def is_binary(self) -> bool:
        """True for 1-bit (sign times scale) quantization."""
        return self.bits == 1

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        if self.bits == 1:
            return 0
        if self.symmetric:
            half = 2 ** (self.bits - 1)
            return -(half - 1) if self.restricted else -half
        return 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        if self.bits == 1:
            return 1
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def with_bits(self, bits: int) -> QuantSpec:
        """A copy at another bit width."""
        from dataclasses import replace

        return replace(self, bits=bits)


@dataclass
class QuantParams:
    """Quantization parameters of one tensor.

    ``scale`` and ``zero_point`` have one entry per scale group, shape ``[G]``: ``G = 1`` per tensor,
    ``G = C`` per channel (``C`` = size of ``axis``), ``G = C * ceil(K / group_size)`` per group
    (``K`` = elements per channel). ``zero_point`` is integer-valued (stored as int32).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    qmin: int
    qmax: int
    granularity: str
    shape: tuple[int, ...]
    axis: int = 0
    group_size: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        """Number of scale groups ``G``."""
        return int(self.scale.numel())
