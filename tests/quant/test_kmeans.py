"""Exact 1-D k-means against brute force; Lloyd/auto against exact; errors."""

import itertools

import numpy as np
import pytest
import torch

from qready.quant.palettize import kmeans as km
from qready.quant.palettize.kmeans import kmeans1d, kmeans1d_centroids


def brute_force_sse(values: np.ndarray, k: int) -> float:
    """Minimum SSE over all splits of the sorted values into k contiguous non-empty runs."""
    x = np.sort(values)
    best = np.inf
    for cuts in itertools.combinations(range(1, x.size), k - 1):
        edges = [0, *cuts, x.size]
        sse = sum(((x[a:b] - x[a:b].mean()) ** 2).sum() for a, b in zip(edges[:-1], edges[1:], strict=True))
        best = min(best, sse)
    return best


def sse(values: torch.Tensor, centroids: torch.Tensor) -> float:
    v = values.double().reshape(-1, 1)
    return float((v - centroids.double()[None]).square().min(dim=1).values.sum())


@pytest.mark.parametrize("seed", range(40))
def test_exact_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 10))
    values = rng.normal(size=n)
    if seed % 2:
        values = np.round(values, 1)  # duplicates: weighted distinct values
    k = int(rng.integers(1, min(n, 5) + 1))
    if np.unique(values).size < k:
        k = np.unique(values).size
    centroids, assignment = kmeans1d(torch.from_numpy(values), k, method="exact")
    assert centroids.shape == (k,)
    assert torch.all(centroids[1:] >= centroids[:-1])
    t = torch.from_numpy(values)
    assert sse(t, centroids) == pytest.approx(brute_force_sse(values, k), rel=1e-5, abs=1e-6)
    nearest = (t[:, None] - centroids.double()[None]).abs().argmin(dim=1)
    assert torch.equal(assignment, nearest)


def test_fewer_distinct_values_than_k_are_kept_exactly() -> None:
    values = torch.tensor([0.5, -1.0, 0.5, 2.0])
    centroids, assignment = kmeans1d(values, 8)
    assert centroids.shape == (8,)
    assert set(centroids.tolist()) == {-1.0, 0.5, 2.0}
    assert torch.equal(centroids[assignment], values)


@pytest.mark.parametrize("k", [2, 4, 16])
def test_lloyd_and_auto_are_close_to_exact(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    gaussian = torch.randn(3000, generator=torch.Generator().manual_seed(k))
    lloyd = sse(gaussian, kmeans1d_centroids(gaussian, k, method="lloyd"))
    exact_gaussian = sse(gaussian, kmeans1d_centroids(gaussian, k, method="exact"))
    assert exact_gaussian <= lloyd * (1 + 1e-9)
    assert lloyd <= exact_gaussian * 1.1
    values = gaussian**3  # heavy tails: where the histogram's log-spaced buckets matter
    exact = sse(values, kmeans1d_centroids(values, k, method="exact"))
    monkeypatch.setattr(km, "EXACT_BUDGET", 2048 * k)  # force the histogram (<= 2048 buckets) + Lloyd path
    auto = sse(values, kmeans1d_centroids(values, k, method="auto"))
    assert exact <= auto * (1 + 1e-9) <= exact * 1.02


def test_exact_divide_and_conquer_matches_quadratic_dp() -> None:
    """A larger case: the O(k n log n) solver against a plain O(k n^2) DP."""
    rng = np.random.default_rng(0)
    x = np.sort(np.unique(rng.standard_t(3, size=300)))
    w = rng.integers(1, 4, size=x.size).astype(float)
    k = 5
    n = x.size

    def cost(a: int, b: int) -> float:
        xs, ws = x[a:b], w[a:b]
        mean = (ws * xs).sum() / ws.sum()
        return float((ws * (xs - mean) ** 2).sum())

    costs = np.full((n + 1, n + 1), np.inf)
    for a in range(n):
        for b in range(a + 1, n + 1):
            costs[a, b] = cost(a, b)
    d = costs[0].copy()  # one cluster
    for _ in range(2, k + 1):
        d = np.min(d[:, None] + costs, axis=0)
    centroids = km.exact_kmeans_sorted(x, w, k)
    got = float((w[:, None] * (x[:, None] - centroids[None]) ** 2).min(axis=1).sum())
    assert got == pytest.approx(d[n], rel=1e-9)
    assert got < float(costs[0, n])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be >= 1, got 0"),
        ({"k": 2, "method": "fast"}, "method must be one of"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kmeans1d(torch.randn(10), **kwargs)


def test_non_finite_and_non_float_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        kmeans1d(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(TypeError, match="floating-point"):
        kmeans1d(torch.arange(5), 2)
