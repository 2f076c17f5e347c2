"""CEMLoss's public behaviour: state_dict, refit, warm-up, bad input, theory helpers."""

import math

import pytest
import torch

import cem_fast
from cem_fast import CEMLoss, entropy_bound, mse_lower_bound, official_cem_weight


def blobs(C=3, m=2, D=6, per=40, seed=0, spread=0.01):
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(C, m, D, generator=g) * 4
    x = centers[:, :, None, :] + spread * torch.randn(C, m, per, D, generator=g)
    y = torch.arange(C)[:, None, None].expand(C, m, per)
    return centers, x.reshape(-1, D), y.reshape(-1)


@pytest.mark.parametrize("variant", ["paper", "official", "official-trained"])
def test_state_dict_round_trip(variant):
    _, x, y = blobs()
    a = CEMLoss(3, 2, variant=variant, dataset_size=240).refit(x, y)
    b = CEMLoss(3, 2, variant=variant, dataset_size=240)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b.state_dict()[k]), k
    z, yy = x[:50].clone(), y[:50]
    assert float(a(z, yy)) == float(b(z, yy))


def test_state_dict_from_other_configuration_is_rejected():
    _, x, y = blobs()
    a = CEMLoss(3, 2, variant="paper").refit(x, y)
    with pytest.raises(ValueError, match="configuration"):
        CEMLoss(3, 2, variant="official").load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="configuration"):
        CEMLoss(3, 4, variant="paper").load_state_dict(a.state_dict())


@pytest.mark.parametrize("variant", ["paper", "official", "official-trained"])
def test_refit_recovers_separated_clusters(variant):
    centers, x, y = blobs(C=3, m=2, D=6)
    cem = CEMLoss(3, 2, variant=variant, dataset_size=240).refit(x, y)
    for c in range(3):
        got = cem.centroids[c]
        d = torch.cdist(got, centers[c])
        assert float(d.min(1).values.max()) < 0.05, (c, d)
    if variant == "paper":
        assert torch.allclose(cem.pi.sum(), torch.tensor(1.0))
        assert torch.allclose(cem.pi, torch.full((3, 2), 1 / 6), atol=1e-6)
        assert float(cem.variance.mean()) == pytest.approx(1e-4, rel=0.2)
    if variant == "official-trained":
        assert torch.allclose(cem.pi, torch.full((3, 2), 0.5), atol=1e-6)


def test_refit_is_warm_started_and_deterministic():
    _, x, y = blobs(seed=1)
    a = CEMLoss(3, 2).refit(x, y)
    b = CEMLoss(3, 2).refit(x, y)
    assert torch.equal(a.centroids, b.centroids)
    first = a.centroids.clone()
    a.refit(x, y)  # warm start from converged centroids: nothing moves
    assert torch.allclose(a.centroids, first)


def test_refit_unconditional_and_absent_class():
    _, x, y = blobs()
    cem = CEMLoss(3, 2, class_conditional=False).refit(x)
    assert cem.centroids.shape == (3, 2, 6)
    loss = cem(x[:10].requires_grad_(), None)
    assert torch.isfinite(loss)
    with pytest.warns(RuntimeWarning, match="no features"):
        CEMLoss(4, 2).refit(x, y)  # class 3 has no features


def test_collapse_warning():
    x = torch.full((50, 4), 0.5)
    with pytest.warns(RuntimeWarning, match="collapsed"):
        CEMLoss(1, 2).refit(x, torch.zeros(50, dtype=torch.int64))


def test_warmup():
    z = torch.rand(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(RuntimeError, match="refit"):
        CEMLoss(2, 2)(z, y)
    loss = CEMLoss(2, 2, warmup="zero")(z, y)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert z.grad is not None and float(z.grad.abs().sum()) == 0.0


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(num_classes=2.5), TypeError, "num_classes"),
        (dict(num_classes=2, sigma=0.0), ValueError, "sigma"),
        (dict(num_classes=2, sigma=-1), ValueError, "sigma"),
        (dict(num_classes=2, variant="gmm"), ValueError, "variant"),
        (dict(num_classes=2, covariance="full", variant="official"), ValueError, "covariance"),
        (dict(num_classes=2, reduction="mean"), ValueError, "reduction"),
        (dict(num_classes=2, clusters_per_class=0), ValueError, "clusters_per_class"),
        (dict(num_classes=2, variant="official", bogus=1), TypeError, "bogus"),
        (dict(num_classes=2, backend="fast"), ValueError, "backend"),
        (dict(num_classes=2, warmup="skip"), ValueError, "warmup"),
        (dict(num_classes=2, variant="official-trained", log_entropy=2), ValueError, "log_entropy"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CEMLoss(**kwargs)


def fitted(variant="paper"):
    _, x, y = blobs()
    return CEMLoss(3, 2, variant=variant, dataset_size=240).refit(x, y)


@pytest.mark.parametrize(
    "z,y,exc,match",
    [
        (torch.rand(5), torch.zeros(5, dtype=torch.int64), ValueError, "z"),
        (torch.randint(0, 2, (5, 6)), torch.zeros(5, dtype=torch.int64), TypeError, "z"),
        ([[0.0] * 6], torch.zeros(1, dtype=torch.int64), TypeError, "z"),
        (torch.rand(5, 6), torch.zeros(4, dtype=torch.int64), ValueError, "labels"),
        (torch.rand(5, 6), torch.zeros(5), TypeError, "labels"),
        (torch.rand(5, 6), torch.full((5,), 3), ValueError, "labels"),
        (torch.rand(5, 6), torch.full((5,), -1), ValueError, "labels"),
        (torch.rand(5, 7), torch.zeros(5, dtype=torch.int64), ValueError, "features per sample"),
        (torch.tensor([[float("nan")] * 6]), torch.zeros(1, dtype=torch.int64), ValueError, "NaN"),
        (torch.tensor([[float("inf")] * 6]), torch.zeros(1, dtype=torch.int64), ValueError, "NaN or Inf"),
    ],
)
def test_bad_forward_arguments(z, y, exc, match):
    with pytest.raises(exc, match=match):
        fitted()(z, y)


def test_missing_labels_and_batch_larger_than_dataset():
    cem = fitted()
    with pytest.raises(ValueError, match="labels"):
        cem(torch.rand(3, 6))
    small = CEMLoss(3, 2, dataset_size=4)
    small.set_clusters(cem.centroids, cem.pi, cem.variance)
    with pytest.raises(ValueError, match="dataset_size"):
        small(torch.rand(5, 6), torch.zeros(5, dtype=torch.int64))


def test_set_clusters_validation():
    cem = CEMLoss(3, 2)
    with pytest.raises(ValueError, match="centroids"):
        cem.set_clusters(torch.rand(3, 3, 4))
    with pytest.raises(ValueError, match="weights"):
        cem.set_clusters(torch.rand(3, 2, 4), torch.rand(2, 2))
    with pytest.raises(ValueError, match="variances"):
        cem.set_clusters(torch.rand(3, 2, 4), variances=torch.rand(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        cem.set_clusters(torch.full((3, 2, 4), float("nan")))
    cem.set_clusters(torch.rand(3, 2, 4))
    assert cem.fitted and cem.feature_dim == 4


def test_refit_bad_input():
    cem = CEMLoss(3, 2)
    with pytest.raises(ValueError, match="labels"):
        cem.refit(torch.rand(10, 4))
    with pytest.raises(ValueError, match="labels"):
        cem.refit(torch.rand(10, 4), torch.full((10,), 5))
    with pytest.raises(ValueError, match="NaN"):
        cem.refit(torch.full((10, 4), float("nan")), torch.zeros(10, dtype=torch.int64))


def test_entropy_bound_matches_formula():
    pi = torch.tensor([0.25, 0.75], dtype=torch.float64)
    var = torch.tensor([[0.1, 0.2], [0.3, 0.0]], dtype=torch.float64)
    s = 0.5
    expect = -(
        0.25 * (-math.log(0.25) + 0.5 * (math.log(1 + 0.1 / 0.25) + math.log(1 + 0.2 / 0.25)))
        + 0.75 * (-math.log(0.75) + 0.5 * math.log(1 + 0.3 / 0.25))
    )
    assert float(entropy_bound(pi, var, s)) == pytest.approx(expect, rel=1e-12)
    full = torch.diag_embed(var)
    assert float(entropy_bound(pi, full, s)) == pytest.approx(expect, rel=1e-12)
    v = var.clone().requires_grad_(True)
    entropy_bound(pi, v, s).backward()
    assert v.grad is not None and bool((v.grad < 0).all())  # more variance -> lower bound on H(x|z) decreases
    assert torch.isfinite(fitted().entropy_bound())


def test_mse_lower_bound():
    assert mse_lower_bound(0.0, 10) == pytest.approx(1 / (2 * math.pi * math.e))
    h = torch.tensor(3.0)
    assert float(mse_lower_bound(h, 3)) == pytest.approx(math.exp(2) / (2 * math.pi * math.e))
    with pytest.raises(ValueError, match="d"):
        mse_lower_bound(1.0, 0)


def test_official_cem_weight():
    assert official_cem_weight(16, 0.05) == pytest.approx(0.32)
    assert official_cem_weight(16, 0.01) == pytest.approx(1.6)
    assert official_cem_weight(16, 4e-4) == 16
    with pytest.raises(ValueError, match="lr"):
        official_cem_weight(16, 0)


def test_public_surface():
    for name in ("CEMLoss", "cem_loss", "entropy_bound", "mse_lower_bound", "official_cem_weight"):
        assert hasattr(cem_fast, name)


@pytest.mark.parametrize("variant", ["paper", "official", "official-trained"])
def test_empty_batch_gives_zero_loss_and_keeps_state(variant):
    cem = fitted(variant)
    before = cem.pi.clone(), cem.variance.clone()
    z = torch.rand(0, 6, requires_grad=True)
    loss = cem(z, torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert float(loss.detach()) == 0.0 or variant == "paper"
    assert z.grad.shape == (0, 6)
    if variant != "paper":
        assert torch.equal(cem.pi, before[0])


def test_feature_spread_is_the_mean_per_dimension_variance():
    g = torch.Generator().manual_seed(0)
    z = 5.0 + 0.1 * torch.randn(9000, 2, 3, 5, generator=g)  # more rows than one chunk, an offset
    want = z.double().reshape(9000, -1).var(0, unbiased=False).mean()
    assert cem_fast.feature_spread(z) == pytest.approx(float(want), rel=1e-5)
    assert math.isnan(cem_fast.feature_spread(z[:1]))
    assert cem_fast.feature_spread(torch.ones(4, 7)) == 0.0


def test_variant_registry():
    from cem_fast.variants import get_variant, variant_type

    assert cem_fast.VARIANTS == ("paper", "official", "official-trained")
    for name in cem_fast.VARIANTS:
        impl = get_variant(name)
        assert impl.name == name and CEMLoss(2, variant=name).m == impl.default_clusters
    assert sorted(get_variant(n).code for n in cem_fast.VARIANTS) == [0, 1, 2]  # csrc/cem_cpu_variants.h
    assert get_variant("official-trained", var_threshold=0.5).options["var_threshold"] == 0.5
    with pytest.raises(ValueError, match="variant must be one of"):
        variant_type("gmm")
    with pytest.raises(TypeError, match="var_threshold"):
        get_variant("paper", var_threshold=0.5)
    with pytest.raises(ValueError, match="var_threshold"):
        get_variant("official-trained", var_threshold=-1.0)
