"""Differentiable k-means (DKM, Cho et al. 2022) with attention over the distinct weight values.

One DKM pass on a weight ``W`` (``N`` elements) with carried centroids ``C_0`` (``[G, K]``, one row
per LUT group, ``K = 2^b``) and temperature ``τ`` (per group)::

    for t in 1..T:   A_t = softmax(-(W - C_{t-1})² / τ)      # [N, K] attention
                     C_t = A_tᵀ W / Σ_i A_t                   # soft centroid update
    W̃ = A_T · C_T

Gradients flow through all ``T`` iterations to ``W``; ``C_T`` (detached) is carried to the next step.
A centroid whose attention mass vanishes (``Σ_i A < 1e-12``) keeps its previous value.

:func:`dkm_naive` is that computation as written: ``T`` attention maps of ``N × K`` kept for
backpropagation. :func:`dkm_unique` computes the same thing on the ``M`` *distinct* values ``u_m``
(multiplicity ``n_m``; ``C_t = Σ_m n_m A_mk u_m / Σ_m n_m A_mk``), in chunks of rows, and
recomputes the chunks in the backward pass, so only ``O(M)`` values, the ``T + 1`` centroid sets
and one chunk of attention are ever held: the attention's memory does not grow with the layer.
The per-weight gradient is gathered through the inverse index: weight ``i`` in bucket ``m`` gets
``g_i · s_m + r_m / n_m``, where ``s_m = ∂W̃/∂w`` through its own attention row (centroids held
fixed; computed in closed form) and ``r_m`` is the bucket's gradient through the centroids.

Uniqueness (the documented choice): up to :data:`EXACT_UNIQUE_LIMIT` weights, buckets are the
exact float32 values, and the result equals :func:`dkm_naive` up to float rounding, values and
gradients. Above it, weights are bucketed by their float16 value relative to the layer's largest
magnitude (``<= 65,536`` buckets per group), and each bucket is represented by the mean of its
weights: the result then equals :func:`dkm_naive` applied to the bucket-mean weights, with the
gradient passed straight through the bucketing (a relative perturbation ``<= 2^-11`` of each
weight's distances, far below any useful τ).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from ..spec import check_bits
from .codebook import channel_groups, group_parts, kmeans_lut, snap
from .kmeans import KMeansMethod, kmeans1d_centroids

DKM_BITS: tuple[int, ...] = (1, 2, 3, 4)
DKM_IMPLS: tuple[str, ...] = ("unique", "naive")
EXACT_UNIQUE_LIMIT = 1 << 16
CHUNK = 1 << 14
WEIGHT_CHUNK = 1 << 16
MASS_EPS = 1e-12


def _rows(table: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Per-row view of a per-group table: ``[1, ...]`` (broadcast) or ``[m, ...]``."""
    return table[:1] if groups is None else table[groups]


def attention(u: torch.Tensor, groups: torch.Tensor | None, centroids: torch.Tensor,
              tau: torch.Tensor) -> torch.Tensor:
    """``softmax(-(u - c)² / τ)`` over the ``K`` centroids of each value's group: ``[m, K]``."""
    logits = -(u[:, None] - _rows(centroids, groups)).square() / _rows(tau, groups)[:, None]
    return torch.softmax(logits, dim=1)


def accumulate(a: torch.Tensor, u: torch.Tensor, counts: torch.Tensor | None, groups: torch.Tensor | None,
               n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(Σ n A u, Σ n A)``, each ``[G, K]``, of the rows ``u`` with attention ``a``."""
    mass = a if counts is None else a * counts[:, None]
    weighted = mass * u[:, None]
    if groups is None:
        return weighted.sum(0, keepdim=True), mass.sum(0, keepdim=True)
    zeros = a.new_zeros(n_groups, a.shape[1])
    return zeros.index_add(0, groups, weighted), zeros.index_add(0, groups, mass)


def update(num: torch.Tensor, den: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """New centroids ``num / den``; a centroid without attention mass keeps ``prev``."""
    return torch.where(den > MASS_EPS, num / den.clamp_min(MASS_EPS), prev)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


def _check_inputs(w: torch.Tensor, centroids: torch.Tensor, tau: torch.Tensor, iters: int) -> None:
    _check_positive_int("iters", iters)
    if centroids.dim() != 2 or tau.shape != (centroids.shape[0],):
        raise ValueError(f"centroids must be [G, K] and tau [G]; got {tuple(centroids.shape)} and {tuple(tau.shape)}")


def dkm_naive(w: torch.Tensor, centroids: torch.Tensor, tau: torch.Tensor, iters: int = 3,
              groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference DKM on all ``N`` weights (``N × K`` attention per iteration kept for backprop).

    Args:
        w: weight, any shape (differentiable).
        centroids: carried centroids ``C_0`` ``[G, K]`` (not differentiated).
        tau: temperature per group ``[G]`` (same units as squared weights).
        iters: centroid iterations ``T >= 1``.
        groups: group id of each flattened element (``[N]``), or ``None`` for one group.
    Returns:
        ``(W̃, C_T)``: soft-clustered weight (``w``'s shape) and the detached final centroids.
    """
    _check_inputs(w, centroids, tau, iters)
    flat = w.reshape(-1)
    c = centroids.detach().to(w.dtype).clone()
    tau = tau.to(w.dtype)
    for _ in range(iters):
        a = attention(flat, groups, c, tau)
        c = update(*accumulate(a, flat, None, groups, c.shape[0]), c)
    return (a * _rows(c, groups)).sum(1).reshape(w.shape), c.detach()


def _chunks(m: int, chunk: int) -> Iterator[slice]:
    for start in range(0, m, chunk):
        yield slice(start, start + chunk)


def _sub(groups: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if groups is None else groups[sl]


def _weight_slices(n: int) -> Iterator[slice]:
    return _chunks(n, WEIGHT_CHUNK)


def pack_index(index: torch.Tensor, m: int) -> torch.Tensor:
    """Store bucket indices in ``[0, m)`` compactly: int16 (offset by -32768) when ``m <= 65536``, else int32."""
    if m <= 1 << 16:
        return (index - (1 << 15)).to(torch.int16)
    return index.to(torch.int32)


def unpack_index(packed: torch.Tensor, sl: slice) -> torch.Tensor:
    """The int32 bucket indices of ``packed[sl]`` (see :func:`pack_index`)."""
    part = packed[sl].to(torch.int32)
    return part + (1 << 15) if packed.dtype == torch.int16 else part


def gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a packed index ``[N]``, slice by slice (no ``[N]`` int64 temporary)."""
    out = table.new_empty(index.shape)
    for sl in _weight_slices(index.numel()):
        torch.index_select(table, 0, unpack_index(index, sl), out=out[sl])
    return out


def _bucket_keys(flat: torch.Tensor, groups: torch.Tensor | None, scale: torch.Tensor, sl: slice) -> torch.Tensor:
    """int32 key ``group · 2^16 + float16 bits of w / scale`` of the elements ``sl``."""
    keys = (flat[sl] / scale).half().view(torch.int16).to(torch.int32) & 0xFFFF
    return keys if groups is None else keys + (groups[sl].to(torch.int32) << 16)


def unique_values(flat: torch.Tensor, groups: torch.Tensor | None, exact: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Buckets of a flat weight: ``(u [M], index [N] packed, counts [M] float, bucket groups [M] or None)``.

    ``exact``: buckets are the exact float32 values (``u`` is the value itself). Otherwise the float16
    value relative to max |w| (``u`` is the bucket mean), computed slice by slice into a table of
    ``2^16`` slots per group, so the only ``[N]`` tensor is the packed ``index`` (2 bytes per weight
    with one group; see :func:`pack_index`). Buckets are ordered by group, then key.
    """
    with torch.no_grad():
        if exact:
            keys = flat.float().view(torch.int32).long() & 0xFFFFFFFF
            if groups is not None:
                keys = (groups << 32) | keys
            ukeys, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
            u = flat.new_empty(ukeys.shape).scatter_(0, inverse, flat)
            return (u, pack_index(inverse, ukeys.numel()), counts.to(flat.dtype),
                    ukeys >> 32 if groups is not None else None)
        n_groups = 1 if groups is None else int(groups.max()) + 1
        if n_groups > 1 << 15:
            raise ValueError(f"DKM supports at most {1 << 15} LUT groups per weight; got {n_groups}")
        scale = flat.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        counts = flat.new_zeros(n_groups << 16)
        sums = flat.new_zeros(n_groups << 16)
        ones = flat.new_ones(min(WEIGHT_CHUNK, flat.numel()))
        for sl in _weight_slices(flat.numel()):
            keys = _bucket_keys(flat, groups, scale, sl)
            counts.index_add_(0, keys, ones[: keys.numel()])
            sums.index_add_(0, keys, flat[sl])
        present = counts > 0
        m = int(present.sum())
        slot = (torch.cumsum(present, 0) - 1).to(torch.int32)  # key -> bucket number
        index = torch.empty(flat.shape, dtype=torch.int16 if m <= 1 << 16 else torch.int32, device=flat.device)
        for sl in _weight_slices(flat.numel()):
            index[sl] = pack_index(slot[_bucket_keys(flat, groups, scale, sl)], m)
        ugroups = torch.nonzero(present)[:, 0] >> 16 if groups is not None else None
        return sums[present] / counts[present], index, counts[present], ugroups


class _UniqueDKM(torch.autograd.Function):
    """DKM on distinct values with chunked recomputation in backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, w, u, index, counts, ugroups, c0, tau, iters: int, chunk: int):  # type: ignore[override]
        n_groups = c0.shape[0]
        cs, nums, dens = [c0], [], []
        for _ in range(iters):
            num, den = torch.zeros_like(c0), torch.zeros_like(c0)
            for sl in _chunks(u.numel(), chunk):
                g = _sub(ugroups, sl)
                part_num, part_den = accumulate(attention(u[sl], g, cs[-1], tau), u[sl], counts[sl], g, n_groups)
                num += part_num
                den += part_den
            nums.append(num)
            dens.append(den)
            cs.append(update(num, den, cs[-1]))
        y, slope = torch.empty_like(u), torch.empty_like(u)
        for sl in _chunks(u.numel(), chunk):
            g = _sub(ugroups, sl)
            a = attention(u[sl], g, cs[-2], tau)
            c_last = _rows(cs[-1], g)
            y[sl] = (a * c_last).sum(1)
            z = -2.0 * (u[sl, None] - _rows(cs[-2], g)) / _rows(tau, g)[:, None]
            slope[sl] = (a * c_last * (z - (a * z).sum(1, keepdim=True))).sum(1)
        ctx.iters, ctx.chunk = iters, chunk
        ctx.save_for_backward(u, index, counts, ugroups, slope, tau, *cs, *nums, *dens)
        c_final = cs[-1].clone()
        ctx.mark_non_differentiable(c_final)
        return gather(y, index).reshape(w.shape), c_final

    @staticmethod
    def backward(ctx, grad_out, _grad_c):  # type: ignore[override]
        iters, chunk = ctx.iters, ctx.chunk
        u, index, counts, ugroups, slope, tau, *rest = ctx.saved_tensors
        cs, nums, dens = rest[: iters + 1], rest[iters + 1: 2 * iters + 1], rest[2 * iters + 1:]
        n_groups = cs[0].shape[0]
        flat_grad = grad_out.reshape(-1)
        gy = torch.zeros_like(u)
        for sl in _weight_slices(flat_grad.numel()):
            gy.index_add_(0, unpack_index(index, sl), flat_grad[sl])
        gc = [torch.zeros_like(c) for c in cs]
        gu = torch.zeros_like(u)
        with torch.enable_grad():
            c_prev, c_last = cs[-2].detach().requires_grad_(), cs[-1].detach().requires_grad_()
            for sl in _chunks(u.numel(), chunk):
                g = _sub(ugroups, sl)
                y = (attention(u[sl], g, c_prev, tau) * _rows(c_last, g)).sum(1)
                d_prev, d_last = torch.autograd.grad(y, (c_prev, c_last), gy[sl])
                gc[-2] += d_prev
                gc[-1] += d_last
            for t in reversed(range(iters)):
                num, den = nums[t].detach().requires_grad_(), dens[t].detach().requires_grad_()
                prev = cs[t].detach().requires_grad_()
                g_num, g_den, g_prev = torch.autograd.grad(update(num, den, prev), (num, den, prev), gc[t + 1])
                gc[t] += g_prev
                for sl in _chunks(u.numel(), chunk):
                    g = _sub(ugroups, sl)
                    us = u[sl].detach().requires_grad_()
                    parts = accumulate(attention(us, g, prev, tau), us, counts[sl], g, n_groups)
                    d_u, d_prev = torch.autograd.grad(parts, (us, prev), (g_num, g_den))
                    gu[sl] += d_u
                    gc[t] += d_prev
        through_centroids = gu.div_(counts)
        grad_w = torch.empty_like(flat_grad)
        for sl in _weight_slices(flat_grad.numel()):
            i = unpack_index(index, sl)
            torch.addcmul(through_centroids.index_select(0, i), flat_grad[sl], slope.index_select(0, i), out=grad_w[sl])
        return grad_w.reshape(grad_out.shape), None, None, None, None, None, None, None, None


def dkm_unique(w: torch.Tensor, centroids: torch.Tensor, tau: torch.Tensor, iters: int = 3,
               groups: torch.Tensor | None = None, *, chunk: int = CHUNK,
               exact_limit: int = EXACT_UNIQUE_LIMIT) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-efficient DKM: same arguments and results as :func:`dkm_naive` (see the module docstring).

    Args:
        chunk: distinct values per attention chunk (peak attention memory ``chunk × K`` floats).
        exact_limit: layers with at most this many elements are bucketed by exact value.
    """
    _check_inputs(w, centroids, tau, iters)
    _check_positive_int("chunk", chunk)
    flat = w.reshape(-1)
    u, index, counts, ugroups = unique_values(flat.detach(), groups, exact=flat.numel() <= exact_limit)
    c0 = centroids.detach().to(w.dtype).clone()
    return _UniqueDKM.apply(w, u, index, counts, ugroups, c0, tau.to(w.dtype), iters, chunk)


def initial_centroids(weight: torch.Tensor, bits: int, group_size: int | None, method: KMeansMethod,
                      axis: int = 0) -> torch.Tensor:
    """The starting LUT ``[G, 2^bits]``: the 1-D k-means of each group's weights, or, for layers above
    :data:`EXACT_UNIQUE_LIMIT` weights with ``method="auto"``, of its float16 buckets' means weighted by
    their counts (what :func:`dkm_unique` clusters; at most 65,536 points per group, so a 4M-weight
    layer starts in a fraction of a second)."""
    if method != "auto" or weight.numel() <= EXACT_UNIQUE_LIMIT:
        return kmeans_lut(weight.float(), bits, group_size, method, axis)
    groups = channel_groups(tuple(weight.shape), group_size, weight.device, axis)
    u, _, counts, ugroups = unique_values(weight.detach().float().reshape(-1), groups, exact=False)
    n_groups = 1 if groups is None else int(groups.max()) + 1
    parts = [(u, counts)] if ugroups is None else [(u[ugroups == g], counts[ugroups == g]) for g in range(n_groups)]
    return torch.stack([kmeans1d_centroids(v, 1 << bits, weights=c) for v, c in parts]).to(weight.device)


DKMImpl = Literal["unique", "naive"]


class DKMWeight(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization palettizing a weight with DKM.

    Training mode: the soft-clustered weight ``W̃`` (centroids carried in the ``centroids`` buffer and
    updated on every forward). Eval mode: the weight snapped to its nearest centroid (what
    :func:`~qready.quant.palettize.finalize_palettized` bakes in).

    Args:
        weight: the weight being palettized (``C`` output channels along ``axis``); initial centroids
            are the k-means of each group (see :func:`initial_centroids`).
        bits: index bits ``b`` (1-4), ``K = 2^b`` centroids per group.
        group_size: output channels per LUT (``None``: one LUT per layer).
        tau: temperature, relative: the softmax uses ``τ · var(W_g)`` (variance of each group's weights
            when attached), so one value suits layers of any scale. Smaller is harder.
        iters: centroid iterations per forward.
        impl: ``"unique"`` (:func:`dkm_unique`) or ``"naive"`` (:func:`dkm_naive`).
        chunk: attention chunk size of the ``"unique"`` implementation.
        kmeans_method: how the initial centroids are found (see :func:`~qready.quant.palettize.kmeans.kmeans1d`).
        axis: the weight's output-channel axis (grouping of ``group_size`` channels).
    """

    def __init__(self, weight: torch.Tensor, bits: int, *, group_size: int | None = None, tau: float = 0.05,
                 iters: int = 3, impl: DKMImpl = "unique", chunk: int = CHUNK,
                 kmeans_method: KMeansMethod = "auto", axis: int = 0) -> None:
        super().__init__()
        check_bits(bits, "bits", DKM_BITS)
        if impl not in DKM_IMPLS:
            raise ValueError(f"impl must be one of {list(DKM_IMPLS)}; got {impl!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"tau must be a number > 0; got {tau!r}")
        _check_positive_int("iters", iters)
        _check_positive_int("chunk", chunk)
        self.bits, self.group_size, self.iters, self.impl, self.chunk = bits, group_size, iters, impl, chunk
        self.axis = axis
        centroids = initial_centroids(weight, bits, group_size, kmeans_method, axis)
        variance = torch.stack([p.float().var(unbiased=False) for p in group_parts(weight, group_size, axis)])
        self.register_buffer("centroids", centroids)
        self.register_buffer("temperature", (float(tau) * variance.clamp_min(1e-12)).to(weight.device))

    def groups(self, w: torch.Tensor) -> torch.Tensor | None:
        """Group id of each flattened element of ``w`` (``None`` for one LUT)."""
        return channel_groups(tuple(w.shape), self.group_size, w.device, self.axis)

    def snap(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` with every element replaced by its group's nearest centroid."""
        return snap(w, self.centroids.to(w.dtype), self.groups(w))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.snap(w)
        if self.impl == "unique":
            out, c = dkm_unique(w, self.centroids, self.temperature, self.iters, self.groups(w), chunk=self.chunk)
        else:
            out, c = dkm_naive(w, self.centroids, self.temperature, self.iters, self.groups(w))
        with torch.no_grad():
            self.centroids.copy_(c)
        return out

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, iters={self.iters}, impl={self.impl!r}"
