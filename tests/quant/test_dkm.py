"""DKM: the distinct-value implementation equals the naive N x K one (values, centroids, gradients)."""

import pytest
import torch

from qready.quant.palettize.codebook import kmeans_lut
from qready.quant.palettize.dkm import (
    DKMWeight,
    dkm_naive,
    dkm_unique,
    gather,
    initial_centroids,
    pack_index,
    unique_values,
    unpack_index,
)


def reference_dkm(w: torch.Tensor, c0: torch.Tensor, tau: float, iters: int) -> torch.Tensor:
    """DKM written out directly for one group (independent of the library's helpers)."""
    c = c0.clone()
    for _ in range(iters):
        a = torch.softmax(-((w.reshape(-1, 1) - c.reshape(1, -1)) ** 2) / tau, dim=1)
        c = (a * w.reshape(-1, 1)).sum(0) / a.sum(0)
    return (a @ c).reshape(w.shape)


def setup(grouped: bool, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 40, generator=gen, dtype=dtype)
    w[0, :12] = w[1, 3]  # repeated values share a bucket
    w[4, :5] = 0.0
    n_groups = 3 if grouped else 1
    groups = torch.arange(6).div(2, rounding_mode="floor").repeat_interleave(40) if grouped else None
    c0 = torch.sort(torch.randn(n_groups, 4, generator=gen, dtype=dtype), dim=1).values
    tau = torch.full((n_groups,), 0.3, dtype=dtype)
    upstream = torch.randn(6, 40, generator=gen, dtype=dtype)
    return w.requires_grad_(), groups, c0, tau, upstream


def run(fn, w, *args, upstream, **kwargs):
    out, c = fn(w, *args, **kwargs)
    (grad,) = torch.autograd.grad((out * upstream).sum(), w)
    return out.detach(), c, grad


def test_naive_matches_direct_formula() -> None:
    w, _, c0, tau, upstream = setup(grouped=False)
    out, _ = dkm_naive(w, c0, tau, iters=3)
    torch.testing.assert_close(out, reference_dkm(w, c0[0], 0.3, 3))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("chunk", [7, 1 << 14])
def test_unique_equals_naive_values_and_gradients(grouped: bool, chunk: int) -> None:
    w, groups, c0, tau, upstream = setup(grouped)
    ref = run(dkm_naive, w, c0, tau, 3, groups, upstream=upstream)
    got = run(dkm_unique, w, c0, tau, 3, groups, upstream=upstream, chunk=chunk)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ref[2].abs().max() > 0.1  # a non-trivial gradient was compared


@pytest.mark.parametrize("grouped", [False, True])
def test_float16_buckets_equal_naive_on_bucket_means(grouped: bool) -> None:
    """Above the exact limit, buckets are float16 values; the result is naive DKM on the bucket
    means with the gradient passed straight through (the documented definition)."""
    w, groups, c0, tau, upstream = setup(grouped)
    w = (w.detach() + 1e-5 * torch.randn_like(w)).requires_grad_()  # near-equal values share fp16 buckets
    u, inverse, counts, _ = unique_values(w.detach().reshape(-1), groups, exact=False)
    assert u.numel() < w.numel()  # some buckets hold several different float32 values
    snapped = gather(u, inverse).reshape(w.shape) + (w - w.detach())
    out, c = dkm_naive(snapped, c0, tau, 3, groups)
    (grad,) = torch.autograd.grad((out * upstream).sum(), w)
    got = run(dkm_unique, w, c0, tau, 3, groups, upstream=upstream, exact_limit=0)
    for a, b in zip(got, (out.detach(), c, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_of_the_custom_backward() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True)
    c0 = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64)
    tau = torch.tensor([0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: dkm_unique(x, c0, tau, 2, chunk=5)[0], (w,))


def saved_elements(fn) -> int:
    """Elements of all tensors autograd saves for backward while running ``fn``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_saved_memory_does_not_scale_with_n_times_k() -> None:
    n, k, iters = 200_000, 16, 3
    w = torch.randn(n, requires_grad=True)
    c0 = torch.linspace(-2, 2, k)[None]
    tau = torch.tensor([0.01])
    naive = saved_elements(lambda: dkm_naive(w, c0, tau, iters))
    ours = saved_elements(lambda: dkm_unique(w, c0, tau, iters))
    assert naive >= iters * n * k
    assert ours <= 2 * n + 2 * 65536 + 100 * k  # the inverse index plus O(distinct values)
    assert naive / ours > 10


def test_parametrization_trains_soft_and_evaluates_hard() -> None:
    w = torch.randn(16, 32)
    p = DKMWeight(w, bits=2, tau=0.05)
    assert p.centroids.shape == (1, 4)
    before = p.centroids.clone()
    p.train()
    soft = p(w + 0.1)
    assert soft.shape == w.shape
    assert not torch.equal(p.centroids, before)  # carried centroids moved
    p.eval()
    hard = p(w)
    assert hard.unique().numel() <= 4
    assert set(hard.unique().tolist()) <= set(p.centroids[0].tolist())


def test_group_parametrization_has_one_lut_per_group() -> None:
    w = torch.randn(10, 3, 3)
    p = DKMWeight(w, bits=1, group_size=4).eval()
    assert p.centroids.shape == (3, 2)
    hard = p(w)
    for g, rows in enumerate(hard.split(4)):
        assert set(rows.unique().tolist()) <= set(p.centroids[g].tolist())


@pytest.mark.parametrize("bits", [0, 5, 8])
def test_dkm_bits_outside_1_to_4_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match=r"bits must be one of \[1, 2, 3, 4\]"):
        DKMWeight(torch.randn(4, 4), bits=bits)


@pytest.mark.parametrize(("kwargs", "match"), [({"tau": 0}, "tau"), ({"iters": 0}, "iters"), ({"impl": "x"}, "impl")])
def test_invalid_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DKMWeight(torch.randn(4, 4), bits=2, **kwargs)


# --- memory floor: a packed index is the only per-weight tensor DKM keeps -------------------------


@pytest.mark.parametrize(("m", "dtype"), [(1, torch.int16), (1 << 16, torch.int16), ((1 << 16) + 1, torch.int32)])
def test_index_packing_round_trips(m: int, dtype: torch.dtype) -> None:
    index = torch.tensor([0, m - 1, m // 2])
    packed = pack_index(index, m)
    assert packed.dtype == dtype
    assert torch.equal(unpack_index(packed, slice(None)).long(), index)


@pytest.mark.parametrize("grouped", [False, True])
def test_float16_buckets_match_a_direct_unique(grouped: bool) -> None:
    """Bucketing by table equals ``torch.unique`` of the (group, float16 bits) keys."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 400, generator=gen) * 0.05
    groups = torch.arange(300).div(100, rounding_mode="floor").repeat_interleave(400) if grouped else None
    u, index, counts, ugroups = unique_values(w.reshape(-1), groups, exact=False)
    keys = (w.reshape(-1) / w.abs().max()).half().view(torch.int16).long() & 0xFFFF
    if grouped:
        keys = keys + (groups << 16)
    ukeys, inverse, ref_counts = torch.unique(keys, return_inverse=True, return_counts=True)
    ref_u = torch.zeros(ukeys.numel(), dtype=torch.float64).index_add_(0, inverse, w.reshape(-1).double())
    assert index.dtype == (torch.int16 if ukeys.numel() <= 1 << 16 else torch.int32)
    assert torch.equal(unpack_index(index, slice(None)).long(), inverse)
    assert torch.equal(counts, ref_counts.float())
    torch.testing.assert_close(u.double(), ref_u / ref_counts, rtol=1e-6, atol=1e-9)
    assert torch.equal(gather(u, index), u[inverse])
    if grouped:
        assert torch.equal(ugroups, ukeys >> 16)


def saved_bytes(fn) -> int:
    """Bytes of all tensors autograd saves for backward while running ``fn``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_saved_state_is_two_bytes_per_weight_plus_the_buckets() -> None:
    n, k, iters = 1 << 18, 16, 3
    w = (0.02 * torch.randn(n)).requires_grad_()
    c0 = 0.02 * torch.linspace(-2, 2, k)[None]
    saved = saved_bytes(lambda: dkm_unique(w, c0, torch.tensor([1e-5]), iters))
    per_bucket = 4 * 3 + 8  # u, counts, slope (float32) and slack
    assert saved <= 2 * n + per_bucket * (1 << 16) + 4 * (3 * iters + 2) * k + 64


def test_large_layer_starts_from_bucket_kmeans() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(70, 1000, generator=gen) * 0.05  # above the exact-bucketing limit
    fast = initial_centroids(w, 2, None, "auto")
    exact = kmeans_lut(w, 2, None, "exact")
    assert fast.shape == (1, 4)
    assert (fast - exact).abs().max() < 1e-3 * w.std()
    grouped = initial_centroids(w, 2, 35, "auto")
    for g, rows in enumerate(w.split(35)):
        assert (grouped[g] - kmeans_lut(rows, 2, None, "exact")[0]).abs().max() < 1e-3 * w.std()
