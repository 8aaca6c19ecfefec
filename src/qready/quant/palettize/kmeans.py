"""One-dimensional k-means: exact (dynamic programming) and fast (Lloyd with k-means++ seeding).

The values are reduced to their sorted distinct values ``x_1 < ... < x_n`` with multiplicities
``m_i``; every optimal 1-D clustering splits this sorted list into ``k`` contiguous runs, so

* ``"exact"``: the optimum by dynamic programming, ``D_j(b) = min_{a<b} D_{j-1}(a) + SSE(a, b)``
  (``SSE`` of ``x_a..x_{b-1}`` from weighted prefix sums, in float64 on centred values). The optimal
  split point is monotone in ``b`` (the cost satisfies the quadrangle inequality), so each layer is
  solved by divide and conquer in ``O(n log n)``: ``O(k n log n)`` in all, each recursion level one
  vectorised numpy pass. Ties go to the leftmost split.
* ``"lloyd"``: Lloyd iterations on the weighted distinct values from a seeded k-means++ start; a
  local optimum, ``O(k n)`` per iteration.
* ``"auto"`` (default): ``"exact"`` while ``k · n <=`` :data:`EXACT_BUDGET`; above it, the exact
  solution on a histogram of the values seeds a few Lloyd iterations on all the distinct values. The
  histogram buckets values by their float16 bit pattern relative to the largest magnitude (at most
  65,536 log-spaced buckets, fewer low mantissa bits kept when ``k`` is large, so that the bucket
  count times ``k`` stays within the budget); each bucket is its weighted mean.

With fewer distinct values than ``k`` every distinct value is its own centroid and the list is
padded by repeating the largest one, so the result always has ``k`` entries.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ...checks import check_int

KMeansMethod = Literal["auto", "exact", "lloyd"]
KMEANS_METHODS: tuple[str, ...] = ("auto", "exact", "lloyd")
EXACT_BUDGET = 1 << 18
AUTO_LLOYD_ITERS = 10


def _check(values: torch.Tensor, k: object, method: str) -> None:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor; got {type(values).__name__}")
    if values.numel() == 0:
        raise ValueError("values must not be empty")
    check_int("k", k, minimum=1)
    if method not in KMEANS_METHODS:
        raise ValueError(f"method must be one of {list(KMEANS_METHODS)}; got {method!r}")
    if not torch.isfinite(values).all():
        raise ValueError("values hold NaN or Inf; k-means needs finite values")


class _Prefix:
    """Weighted prefix sums of sorted values: ``sse(a, b)`` of the run ``x[a:b]`` in O(1)."""

    def __init__(self, x: np.ndarray, w: np.ndarray) -> None:
        shift = float(np.average(x, weights=w))
        xc = x - shift
        self.shift = shift
        sums = np.stack([w, w * xc, w * xc * xc], axis=1)
        self.cum = np.concatenate([np.zeros((1, 3)), np.cumsum(sums, axis=0)])

    def sse(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = self.cum[b] - self.cum[a]
        return np.maximum(d[:, 2] - d[:, 1] * d[:, 1] / d[:, 0], 0.0)

    def sse_runs(self, a: np.ndarray, b_small: np.ndarray, seg: np.ndarray) -> np.ndarray:
        """``sse(a, b_small[seg])`` gathering the few distinct ends once."""
        d = self.cum[b_small][seg] - self.cum[a]
        return np.maximum(d[:, 2] - d[:, 1] * d[:, 1] / d[:, 0], 0.0)

    def mean(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = self.cum[b] - self.cum[a]
        return d[:, 1] / d[:, 0] + self.shift


def _dp_layer(prev: np.ndarray, prefix: _Prefix, j: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``cur[b] = min_{a in [j-1, b-1]} prev[a] + sse(a, b)`` for ``b`` in ``[j, n]``, and its argmin.

    Divide and conquer on ``b`` with the monotone argmin; all segments of a recursion level at once.
    """
    cur = np.full(n + 1, np.inf)
    opt = np.zeros(n + 1, dtype=np.int64)
    b_lo, b_hi = np.array([j]), np.array([n])
    a_lo, a_hi = np.array([j - 1]), np.array([n - 1])
    while b_lo.size:
        mid = (b_lo + b_hi) // 2
        top = np.minimum(a_hi, mid - 1)
        lengths = top - a_lo + 1
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        seg = np.repeat(np.arange(mid.size), lengths)
        a = a_lo[seg] + np.arange(seg.size) - starts[seg]
        val = prev[a] + prefix.sse_runs(a, mid, seg)
        best = np.minimum.reduceat(val, starts)
        pos = np.where(val <= best[seg], np.arange(seg.size), seg.size)
        first = np.minimum.reduceat(pos, starts)
        cur[mid] = best
        opt[mid] = a[first]
        left = mid - 1 >= b_lo
        right = mid + 1 <= b_hi
        b_lo, b_hi, a_lo, a_hi = (
            np.concatenate([b_lo[left], mid[right] + 1]),
            np.concatenate([mid[left] - 1, b_hi[right]]),
            np.concatenate([a_lo[left], opt[mid][right]]),
            np.concatenate([opt[mid][left], a_hi[right]]),
        )
    return cur, opt


def exact_kmeans_sorted(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Optimal centroids (sorted, float64) of distinct sorted values ``x`` with weights ``w``, ``k <= len(x)``."""
    n = x.size
    prefix = _Prefix(x, w)
    prev = np.full(n + 1, np.inf)
    prev[1:] = prefix.sse(np.zeros(n, dtype=np.int64), np.arange(1, n + 1))
    opts = []
    for j in range(2, k + 1):
        prev, opt = _dp_layer(prev, prefix, j, n)
        opts.append(opt)
    bounds = [n]
    for opt in reversed(opts):
        bounds.append(int(opt[bounds[-1]]))
    bounds.append(0)
    edges = np.array(bounds[::-1])
    return prefix.mean(edges[:-1], edges[1:])


def _assign_sorted(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest sorted centroid for each value (ties to the lower index)."""
    mids = (centroids[1:] + centroids[:-1]) / 2.0
    return np.searchsorted(mids, x, side="left")


def lloyd_sorted(x: np.ndarray, w: np.ndarray, init: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """Weighted Lloyd iterations from sorted ``init`` centroids; empty clusters keep their centroid."""
    centroids = np.sort(init.astype(np.float64))
    labels = None
    for _ in range(max_iter):
        new_labels = _assign_sorted(x, centroids)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        mass = np.bincount(labels, weights=w, minlength=centroids.size)
        total = np.bincount(labels, weights=w * x, minlength=centroids.size)
        centroids = np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), centroids)
        centroids = np.sort(centroids)
    return centroids


def kmeans_plus_plus(x: np.ndarray, w: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means++ seeding on weighted values: each new centre drawn with probability ∝ ``w · D²``."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.choice(x.size, p=w / w.sum())]]
    dist = (x - centres[0]) ** 2
    for _ in range(1, k):
        p = w * dist
        total = p.sum()
        pick = rng.choice(x.size, p=p / total) if total > 0 else rng.integers(x.size)
        centres.append(x[pick])
        dist = np.minimum(dist, (x - x[pick]) ** 2)
    return np.sort(np.array(centres))


def _histogram(x: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted means and weights of ``x`` bucketed by its float16 bits relative to max |x| (see above)."""
    scale = float(np.abs(x).max()) or 1.0
    drop = 0
    while (1 << (16 - drop)) * k > EXACT_BUDGET and drop < 10:
        drop += 1
    keys = (x / scale).astype(np.float16).view(np.uint16) >> drop
    _, inverse = np.unique(keys, return_inverse=True)
    mass = np.bincount(inverse, weights=w)
    means = np.bincount(inverse, weights=w * x) / mass
    order = np.argsort(means)  # bit-pattern order is not value order for negative values
    return means[order], mass[order]


def _pad(centroids: np.ndarray, k: int) -> np.ndarray:
    return np.concatenate([centroids, np.full(k - centroids.size, centroids[-1])])


def kmeans1d_centroids(values: torch.Tensor, k: int, *, method: KMeansMethod = "auto", seed: int = 0,
                       max_iter: int = 100, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k`` sorted centroids (float32 ``[k]``) of the 1-D k-means of ``values`` (any shape);
    ``weights`` (``values``' shape, > 0): the multiplicity of each value (default 1)."""
    _check(values, k, method)
    flat = values.detach().double().cpu().reshape(-1).numpy()
    if weights is None:
        x, counts = np.unique(flat, return_counts=True)
        w = counts.astype(np.float64)
    else:
        if weights.shape != values.shape or not bool((weights > 0).all()):
            raise ValueError(f"weights must be positive with the values' shape {tuple(values.shape)}; "
                             f"got shape {tuple(weights.shape)}")
        x, inverse = np.unique(flat, return_inverse=True)
        w = np.bincount(inverse, weights=weights.detach().double().cpu().reshape(-1).numpy())
    if x.size <= k:
        return torch.from_numpy(_pad(x, k)).float()
    if method == "exact" or (method == "auto" and x.size * k <= EXACT_BUDGET):
        centroids = exact_kmeans_sorted(x, w, k)
    elif method == "auto":
        hx, hw = _histogram(x, w, k)
        init = exact_kmeans_sorted(hx, hw, k) if hx.size > k else _pad(hx, k)
        centroids = lloyd_sorted(x, w, init, min(max_iter, AUTO_LLOYD_ITERS))
    else:
        centroids = lloyd_sorted(x, w, kmeans_plus_plus(x, w, k, seed), max_iter)
    return torch.from_numpy(np.sort(centroids)).float()


def kmeans1d(values: torch.Tensor, k: int, *, method: KMeansMethod = "auto", seed: int = 0,
             max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of ``values`` (any shape, finite floats).

    Args:
        values: the values to cluster.
        k: number of clusters (>= 1).
        method: ``"exact"``, ``"lloyd"`` or ``"auto"`` (see the module docstring).
        seed: k-means++ seed (``"lloyd"`` only).
        max_iter: Lloyd iterations at most (``"auto"`` uses at most :data:`AUTO_LLOYD_ITERS`).
    Returns:
        ``(centroids, assignment)``: sorted float32 centroids ``[k]`` and, for each value, the index of
        its nearest centroid (int64, ``values``' shape; ties to the lower index).
    """
    centroids = kmeans1d_centroids(values, k, method=method, seed=seed, max_iter=max_iter)
    flat = values.detach().double().cpu().reshape(-1).numpy()
    assignment = _assign_sorted(flat, centroids.double().numpy())
    return centroids, torch.from_numpy(assignment).reshape(values.shape)
