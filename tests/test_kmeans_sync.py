"""The refit's k-means: deterministic across runs, and at most one host synchronisation per Lloyd iteration.

On the CPU nothing synchronises, so ``bench.sync_counter.SyncCounter`` counts the operations that would on
a GPU. The counted run uses the GPU's defaults (``segmented=False, segment_sums="matmul"``) on CPU tensors;
``tests/gpu`` repeats the count with ``torch.cuda.set_sync_debug_mode`` on a GPU.
"""

import pytest
import torch

from bench.sync_counter import SyncCounter
from cem_fast.clustering import cluster_counts, cluster_sums, kmeans

GPU_DEFAULTS = {"segmented": False, "segment_sums": "matmul"}


def spread_features(n=3000, C=3, D=4, seed=0):
    """Uniform rows with no cluster structure: Lloyd needs many iterations to settle."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def syncs(x, y, C, m, max_iter, init="kmeans++", **kw):
    prev = x[: C * m].reshape(C, m, -1) if init == "warm" else None
    with SyncCounter() as counter:
        r = kmeans(
            x, y, C, m, init=init, centroids=prev, max_iter=max_iter, generator=torch.Generator().manual_seed(3), **kw
        )
    return counter.seen, r


def test_the_counter_sees_the_syncs_it_claims_to():
    a = torch.arange(6)
    with SyncCounter() as counter:
        torch.equal(a, a)
        bool(a.any())
        a.sum().item()
        a.tolist()
        torch.bincount(a)
        a[a > 2]
    scalar = "aten._local_scalar_dense.default"
    assert counter.seen == [
        "aten.equal.default",
        scalar,
        scalar,
        "Tensor.tolist",
        "aten.bincount.default",
        "aten.index.Tensor",
    ]


@pytest.mark.parametrize("init", ["kmeans++", "random", "warm"])
def test_at_most_one_sync_per_lloyd_iteration(init):
    C, m = 3, 8
    x, y = spread_features(C=C)
    base, r0 = syncs(x, y, C, m, 0, init, **GPU_DEFAULTS)
    assert r0.iterations == 0
    assert len(base) <= 2, base  # before the loop: the absent-class check only (and kmeans++)
    for k in (1, 4, 8):
        seen, r = syncs(x, y, C, m, k, init, **GPU_DEFAULTS)
        assert r.iterations == k, "the data must not converge within the iterations counted"
        loop = seen[len(base) :]
        assert seen[: len(base)] == base
        assert len(loop) <= k, loop
        assert set(loop) <= {"aten.equal.default"}, loop


def test_cpu_defaults_also_sync_at_most_once_per_iteration():
    C, m = 3, 8
    x, y = spread_features(C=C)
    base, _ = syncs(x, y, C, m, 0, "warm")
    seen, r = syncs(x, y, C, m, 6, "warm")
    assert r.iterations == 6 and len(seen) - len(base) <= 6, seen


@pytest.mark.parametrize("kw", [{}, GPU_DEFAULTS], ids=["cpu-defaults", "gpu-defaults"])
@pytest.mark.parametrize("init", ["kmeans++", "random", "warm"])
def test_repeated_refits_are_identical(kw, init):
    C, m = 4, 5
    x, y = spread_features(n=2500, C=C, D=7, seed=1)
    runs = [syncs(x, y, C, m, 30, init, **kw)[1] for _ in range(3)]
    for r in runs[1:]:
        for name in ("centroids", "assign", "counts", "sq_dist"):
            assert torch.equal(getattr(r, name), getattr(runs[0], name)), name
        assert r.iterations == runs[0].iterations


def test_matmul_and_index_add_sums_agree():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20_000, 9, generator=g, dtype=torch.float64)  # more rows than one GEMM chunk
    assign = torch.randint(0, 13, (20_000,), generator=g)
    assign[assign == 5] = 4  # an empty cluster
    s_mm, n_mm = cluster_sums(x, assign, 13, "matmul")
    s_ia, n_ia = cluster_sums(x, assign, 13, "index_add")
    assert torch.equal(n_mm, n_ia) and torch.equal(n_mm, torch.bincount(assign, minlength=13).double())
    torch.testing.assert_close(s_mm, s_ia, rtol=1e-12, atol=1e-10)
    assert torch.all(s_mm[5] == 0)
    assert torch.equal(cluster_counts(assign, 13), torch.bincount(assign, minlength=13))


def test_gpu_defaults_find_the_same_clusters_as_cpu_defaults():
    from tests.test_clustering import features

    x, y = features(5, 3, 6, per_class=40, seed=3)
    a = kmeans(x, y, 5, 3, generator=torch.Generator().manual_seed(0), max_iter=100)
    b = kmeans(x, y, 5, 3, generator=torch.Generator().manual_seed(0), max_iter=100, **GPU_DEFAULTS)
    assert torch.equal(a.assign, b.assign) and a.iterations == b.iterations
    torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-12, atol=1e-12)


def test_bad_segment_sums_is_rejected():
    x, y = spread_features(n=50)
    with pytest.raises(ValueError, match="segment_sums"):
        kmeans(x, y, 3, 2, segment_sums="atomics")
