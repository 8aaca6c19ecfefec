"""Look-up tables (LUTs): snapping values to their nearest representative, and finding the LUT of a
weight that already has few distinct values.

A palettized weight ``W`` (``C`` output channels along ``axis``: 0 for Linear/Conv/Embedding, 1 for
weights stored transposed, see :mod:`qready.quant.layers`) is stored as a LUT ``[G, K]`` (``K = 2^b``
representatives per group) and an index per element. Channels are grouped ``group_size`` at a time
(``None``: one LUT for the whole tensor, ``G = 1``); element ``e`` of the flattened weight belongs to
group ``channel(e) // group_size``, ``channel(e)`` its index along ``axis``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kmeans import KMeansMethod, kmeans1d_centroids

CHUNK = 1 << 16


def num_groups(shape: tuple[int, ...], group_size: int | None, axis: int = 0) -> int:
    """Number of LUTs ``G`` of a weight of ``shape`` whose channels lie along ``axis``."""
    if group_size is None or len(shape) == 0:
        return 1
    return math.ceil(shape[axis] / group_size)


def channel_groups(shape: tuple[int, ...], group_size: int | None, device: torch.device | None = None,
                   axis: int = 0) -> torch.Tensor | None:
    """Group id (int64 ``[N]``) of each element of the flattened weight; ``None`` for one group."""
    if group_size is None or len(shape) == 0:
        return None
    channel = torch.arange(shape[axis], device=device).div(group_size, rounding_mode="floor")
    along = [1] * len(shape)
    along[axis] = shape[axis]
    return channel.reshape(along).expand(shape).reshape(-1)


def group_parts(weight: torch.Tensor, group_size: int | None, axis: int = 0) -> list[torch.Tensor]:
    """The weight's LUT groups as ``[channels_in_group, rest]`` tensors (one part for ``None``)."""
    w = weight.detach()
    rows = w.movedim(axis, 0).reshape(w.shape[axis], -1) if w.dim() > 1 else w.reshape(1, -1)
    size = group_size if group_size is not None else rows.shape[0]
    return [rows[start:start + size] for start in range(0, rows.shape[0], size)]


def kmeans_lut(weight: torch.Tensor, bits: int, group_size: int | None = None,
               method: KMeansMethod = "auto", axis: int = 0) -> torch.Tensor:
    """LUT ``[G, 2^bits]`` (float32): the sorted 1-D k-means centroids of each group."""
    parts = group_parts(weight, group_size, axis)
    return torch.stack([kmeans1d_centroids(p, 1 << bits, method=method) for p in parts]).to(weight.device)


def _as_2d(lut: torch.Tensor) -> torch.Tensor:
    return lut.reshape(1, -1) if lut.dim() == 1 else lut


def nearest(values: torch.Tensor, lut: torch.Tensor, groups: torch.Tensor | None = None,
            chunk: int = CHUNK) -> torch.Tensor:
    """Index (int64, ``values``' shape) of the nearest entry of ``lut`` (``[K]`` or ``[G, K]``) for each
    value; ``groups`` (``[N]``) selects the LUT row of each flattened value (ties: lowest index).
    Works in chunks of ``chunk`` values, so memory is ``O(chunk · K)`` beyond the output."""
    table = _as_2d(lut).to(values.dtype)
    if groups is None and table.shape[0] != 1:
        raise ValueError(f"a LUT with {table.shape[0]} rows needs groups=")
    flat = values.detach().reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.int64, device=values.device)
    for start in range(0, flat.numel(), chunk):
        v = flat[start:start + chunk, None]
        rows = table if groups is None else table[groups[start:start + chunk]]
        out[start:start + chunk] = (v - rows).abs().argmin(dim=1)
    return out.reshape(values.shape)


def lookup(indices: torch.Tensor, lut: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Values ``lut[group, index]`` (float, ``indices``' shape)."""
    table = _as_2d(lut)
    flat = indices.reshape(-1).long()
    rows = torch.zeros_like(flat) if groups is None else groups
    return table[rows, flat].reshape(indices.shape)


def snap(values: torch.Tensor, lut: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Each value replaced by its nearest LUT entry (no gradient)."""
    with torch.no_grad():
        return lookup(nearest(values, lut, groups), lut, groups).to(values.dtype)


@dataclass
class Palette:
    """A weight as a LUT ``[G, K]`` (float32) and indices (uint8, the weight's shape); LUT groups
    gather ``group_size`` channels along ``axis``."""

    lut: torch.Tensor
    indices: torch.Tensor
    group_size: int | None
    axis: int = 0

    @property
    def bits(self) -> int:
        """Index bit width ``b`` (``K = 2^b``)."""
        return int(self.lut.shape[1]).bit_length() - 1

    def values(self) -> torch.Tensor:
        """The float weight the palette encodes."""
        groups = channel_groups(tuple(self.indices.shape), self.group_size, self.indices.device, self.axis)
        return lookup(self.indices, self.lut, groups)


def _ordered_bits(values: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the float32 order of ``values`` (``-0.0`` folded onto ``+0.0``)."""
    bits = (values.float() + 0.0).view(torch.int32).long()
    return torch.where(bits < 0, (~bits) & 0x7FFFFFFF, bits | 0x80000000)


def _from_ordered_bits(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys >= 0x80000000, keys & 0x7FFFFFFF, ~keys & 0xFFFFFFFF)
    return bits.to(torch.int64).sub(torch.where(bits >= 1 << 31, 1 << 32, 0)).to(torch.int32).view(torch.float32)


def _distinct(groups: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted distinct ``(group, key)`` pairs: ``(group [U], key [U], inverse [N])``."""
    pairs, inverse = torch.unique((groups << 32) | keys, return_inverse=True)
    return pairs >> 32, pairs & 0xFFFFFFFF, inverse


def distinct_values(weight: torch.Tensor, group_size: int | None, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of each LUT group: ``(group [U], value [U])``, sorted by group, then value."""
    flat = weight.detach().reshape(-1)
    groups = channel_groups(tuple(weight.shape), group_size, weight.device, axis)
    groups = groups if groups is not None else torch.zeros_like(flat, dtype=torch.int64)
    ugroup, ukey, _ = _distinct(groups, _ordered_bits(flat))
    return ugroup, _from_ordered_bits(ukey)


def _lut_and_indices(shape: tuple[int, ...], group_size: int | None, bits: int, ugroup: torch.Tensor,
                     ukey: torch.Tensor, element_pair: torch.Tensor, axis: int) -> Palette:
    """Assemble a palette from the sorted distinct ``(group, key)`` pairs and each element's pair index."""
    n_groups, k = num_groups(shape, group_size, axis), 1 << bits
    counts = torch.bincount(ugroup, minlength=n_groups)
    offsets = torch.cumsum(counts, 0) - counts
    col = torch.minimum(torch.arange(k, device=ukey.device)[None, :], (counts - 1).clamp_min(0)[:, None])
    lut = _from_ordered_bits(ukey)[offsets[:, None] + col]
    indices = (element_pair - offsets[ugroup[element_pair]]).to(torch.uint8).reshape(shape)
    return Palette(lut=lut, indices=indices, group_size=group_size, axis=axis)


def _group_size_candidates(channels: int) -> list[int | None]:
    sizes = [1 << j for j in range(max(channels - 1, 0).bit_length() - 1, -1, -1) if 1 << j < channels]
    return [None, *sizes]


def find_palette(weight: torch.Tensor, bits: int | None = None, max_bits: int = 8, axis: int = 0) -> Palette | None:
    """The palette of a weight with few distinct values per channel group (channels along ``axis``), or ``None``.

    Tries one LUT for the whole tensor and per-group LUTs (``group_size`` = powers of two down to one
    channel). With ``bits``, every group must have at most ``2^bits`` distinct values and the fewest
    LUTs win; without, the group size and bit width (<= ``max_bits``) with the fewest bytes win. The
    palette reproduces ``weight`` bit for bit (``-0.0`` becomes ``+0.0``).
    """
    if weight.numel() == 0 or not torch.isfinite(weight).all():
        return None
    shape = tuple(weight.shape)
    limit = bits if bits is not None else max_bits
    channels = shape[axis] if len(shape) > 1 else 1
    flat = weight.detach().reshape(-1)
    per_channel = channel_groups(shape, 1, weight.device, axis) if channels > 1 else torch.zeros_like(flat, dtype=torch.int64)
    uchan, ukey, channel_pair = _distinct(per_channel, _ordered_bits(flat))
    if torch.bincount(uchan).max() > 1 << limit:
        return None
    best: tuple | None = None
    for size in _group_size_candidates(channels):
        gid = torch.zeros_like(uchan) if size is None else uchan.div(size, rounding_mode="floor")
        pairs = _distinct(gid, ukey)
        distinct = int(torch.bincount(pairs[0]).max())
        need = max(1, math.ceil(math.log2(distinct)))
        if need > limit:
            continue
        b = bits if bits is not None else need
        cost = num_groups(shape, size, axis) * (1 << b) * 4 + math.ceil(weight.numel() * b / 8)
        if best is None or cost < best[0]:
            best = (cost, size, b, pairs)
    if best is None:
        return None
    _, size, b, (ugroup, upair_key, pair_of_channel_pair) = best
    return _lut_and_indices(shape, size, b, ugroup, upair_key, pair_of_channel_pair[channel_pair], axis)
