"""cem_fast.clustering (k-means inside each class) and the statistics CEMLoss.refit builds from it."""

import pytest
import torch

from cem_fast import CEMLoss
from cem_fast.clustering import kmeans


def features(C, m, D, per_class, seed, dtype=torch.float64, absent=()):
    """Rows near ``m`` modes per class, classes interleaved (not sorted) and of unequal sizes."""
    g = torch.Generator().manual_seed(seed)
    modes = torch.rand(C, m, D, generator=g, dtype=dtype)
    sizes = [0 if c in absent else per_class + c for c in range(C)]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    y = y[torch.randperm(len(y), generator=g)]
    x = modes[y, torch.randint(0, m, (len(y),), generator=g)] + 0.2 * torch.randn(len(y), D, generator=g, dtype=dtype)
    return x, y


def brute_force_nearest(x, y, centroids):
    """Flat index of the nearest centroid of each row's class, by explicit squared differences."""
    C, m, _ = centroids.shape
    d2 = ((x[:, None, :] - centroids[y]) ** 2).sum(-1)  # [N, m]
    return y * m + d2.argmin(1)


@pytest.mark.parametrize("init", ["kmeans++", "random", "warm"])
@pytest.mark.parametrize("C,m,D", [(1, 3, 5), (4, 3, 7), (7, 2, 33)])
def test_segmented_and_one_gemm_paths_agree(init, C, m, D):
    x, y = features(C, m, D, per_class=30, seed=C + D)
    prev = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[: C * m]].reshape(C, m, D)
    runs = [
        kmeans(
            x,
            y,
            C,
            m,
            init=init,
            centroids=prev if init == "warm" else None,
            generator=torch.Generator().manual_seed(5),
            segmented=s,
        )
        for s in (True, False)
    ]
    a, b = runs
    assert torch.equal(a.assign, b.assign) and torch.equal(a.counts, b.counts) and a.iterations == b.iterations
    torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-12, atol=1e-12)
    for r in runs:
        direct = ((x - r.centroids.reshape(C * m, D)[r.assign]) ** 2).sum(1)
        torch.testing.assert_close(r.sq_dist, direct, rtol=1e-9, atol=1e-12)
        assert torch.equal(r.assign, brute_force_nearest(x, y, r.centroids))
        assert torch.equal(r.counts, torch.bincount(r.assign, minlength=C * m).double())


def test_converged_result_is_a_lloyd_fixed_point():
    x, y = features(5, 3, 6, per_class=40, seed=3)
    r = kmeans(x, y, 5, 3, generator=torch.Generator().manual_seed(0), max_iter=100)
    assert r.iterations < 100
    flat = r.centroids.reshape(15, 6)
    for k in range(15):
        members = x[r.assign == k]
        if len(members):
            torch.testing.assert_close(flat[k], members.mean(0))
    assert torch.equal(r.assign // 3, y)  # every row stays inside its class


def test_absent_class_and_class_smaller_than_m():
    x, y = features(4, 3, 5, per_class=2, seed=2, absent=(1,))  # sizes 2, 0, 4, 5; m = 3
    prev = torch.zeros(4, 3, 5, dtype=x.dtype)
    for segmented in (True, False):
        r = kmeans(x, y, 4, 3, init="warm", centroids=prev + 0.5, segmented=segmented)
        assert torch.equal(r.centroids[1], prev[1] + 0.5)  # the absent class keeps its centroids
        assert int(r.counts.view(4, 3)[1].sum()) == 0
        assert torch.isfinite(r.centroids).all() and torch.isfinite(r.sq_dist).all()
    with pytest.warns(RuntimeWarning, match="no features"):
        kmeans(x, y, 4, 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("segmented", [True, False])
def test_kmeanspp_never_draws_a_row_twice(segmented):
    # each class holds exactly m distinct rows, so D^2 sampling must pick every one of them once (the chosen
    # rows get weight exactly 0, whatever the rounding of the GEMM expansion at this offset)
    g = torch.Generator().manual_seed(0)
    C, m, D = 6, 4, 3
    x = torch.rand(C * m, D, generator=g) * 100 + 1e3  # large offset: the GEMM expansion rounds
    y = torch.arange(C).repeat_interleave(m)
    for seed in range(5):
        r = kmeans(x, y, C, m, max_iter=0, generator=torch.Generator().manual_seed(seed), segmented=segmented)
        for c in range(C):
            assert torch.equal(r.centroids[c].sort(0).values, x[y == c].sort(0).values)


@pytest.mark.parametrize(
    "variant,covariance", [("paper", "diag"), ("paper", "full"), ("official", "diag"), ("official-trained", "diag")]
)
def test_refit_statistics_match_a_direct_computation(variant, covariance):
    C, m, D = 4, 3, 6
    x, y = features(C, m, D, per_class=25, seed=7, absent=(2,))
    cem = CEMLoss(C, m, variant=variant, covariance=covariance, dataset_size=len(x))
    with pytest.warns(RuntimeWarning, match="no features"):
        cem.refit(x, y)
    assert cem.last_refit_iterations >= 1
    assign = brute_force_nearest(x, y, cem.centroids.double())
    counts = torch.bincount(assign, minlength=C * m).double()
    class_n = counts.view(C, m).sum(1, keepdim=True)
    diff = x - cem.centroids.double().reshape(C * m, D)[assign]
    if variant == "paper":
        torch.testing.assert_close(cem.pi.double(), (counts / len(x)).view(C, m))
        if covariance == "diag":
            var = torch.zeros(C * m, D, dtype=x.dtype).index_add_(0, assign, diff**2) / counts.clamp_min(1)[:, None]
        else:
            var = torch.stack([diff[assign == k].t() @ diff[assign == k] for k in range(C * m)])
            var = var / counts.clamp_min(1)[:, None, None]
        torch.testing.assert_close(cem.variance.double().reshape(var.shape), var)
    else:
        torch.testing.assert_close(cem.pi.double(), counts.view(C, m) / class_n.clamp_min(1))
    if variant == "official-trained":
        var = torch.zeros(C * m, dtype=x.dtype).index_add_(0, assign, (diff**2).mean(1)) / counts.clamp_min(1)
        torch.testing.assert_close(cem.variance.double().reshape(-1), var, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("segmented", [True, False])
def test_repeated_centroids_tie_to_the_lowest_index(segmented):
    # A class with fewer rows than m gets repeated centroids; a row is exactly as near to each copy, but the
    # GEMM's rounding differs per output column on some BLAS builds (a few ulps: MKL's float64 GEMV on AMD), so
    # without skipping the copies the assignment (and the refit's pi) would depend on that rounding.
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.rand(3, 512, generator=g, dtype=torch.float64)
        y = torch.tensor([0, 1, 1])  # class 0: one row, class 1: two, m = 3
        r = kmeans(x, y, 2, 3, generator=torch.Generator().manual_seed(0), segmented=segmented)
        assert torch.equal(r.centroids[0], x[0].expand(3, -1))
        assert int(r.assign[0]) == 0 and r.counts.tolist()[:3] == [1.0, 0.0, 0.0]


def test_torch_backend_assign_ties_repeated_centroids_to_the_lowest_index():
    from cem_fast.backends.torch_backend import assign
    from cem_fast.reference import reference_assign

    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        z = torch.rand(1, 512, generator=g, dtype=torch.float64)
        other = torch.rand(1, 512, generator=g, dtype=torch.float64)
        cent = torch.cat([z.expand(3, -1), other, z + 1e-3, z])  # [6, D]: class 0 = 3 copies of z
        for labels, cc in ((torch.tensor([0]), True), (torch.tensor([1]), True), (torch.tensor([0]), False)):
            expected = [c * 3 + j for c, j in reference_assign(z, labels, cent.view(2, 3, -1), cc)]
            assert assign(z, labels, cent, 3, cc).tolist() == expected
