"""CEMLoss (fast path) against the float64 reference: loss, gradient and state, across variants and edge cases."""

import math
import os

import pytest
import torch
from helpers import random_state, rel_err, run_reference

from cem_fast import CEMLoss
from cem_fast.backends import resolve

VARIANTS = ["paper", "official", "official-trained"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# The C++ backend is built on first use and must work here; test_loss_triton.py reruns this module with
# CEM_TEST_BACKENDS=triton under TRITON_INTERPRET=1 in a subprocess.
BACKENDS = os.environ.get("CEM_TEST_BACKENDS", "torch,cpp").split(",")


def make_loss(variant, C, m, D, gen, *, dtype=torch.float64, covariance="diag", backend="torch", **kw):
    cent, pi, var = random_state(variant, C, m, D, covariance=covariance, gen=gen, dtype=dtype)
    cem = CEMLoss(
        C, m, variant=variant, covariance=covariance, backend=backend, dataset_size=kw.pop("dataset_size", 500), **kw
    )
    cem.set_clusters(cent, pi, var)
    return cem, cent, pi, var


def check_against_reference(cem, z, y, variant, dtype, **ref_kw):
    pi0 = cem.pi.clone()
    var0 = cem.variance.clone()
    zz = z.clone().requires_grad_(True)
    loss = cem(zz, y)
    loss.backward()
    ref_loss, ref_grad, ref_pi, ref_var = run_reference(
        z,
        y,
        cem.centroids,
        pi0 if variant != "official" else None,
        var0 if variant != "official" else None,
        variant,
        sigma=cem.sigma,
        dataset_size=cem.dataset_size,
        covariance=cem.covariance,
        reduction=cem.reduction,
        class_conditional=cem.class_conditional,
        **cem.variant_impl.options,
        **ref_kw,
    )
    tol = TOL[dtype]
    loss = loss.detach()
    assert abs(float(loss) - float(ref_loss)) <= tol * max(abs(float(ref_loss)), 1e-12), (float(loss), float(ref_loss))
    g = zz.grad.reshape(z.shape[0], -1)
    if ref_grad.norm() == 0:
        assert float(g.double().norm()) == 0.0
    else:
        assert rel_err(g, ref_grad) <= tol, rel_err(g, ref_grad)
    if variant == "paper":
        assert rel_err(cem.pi, ref_pi) <= tol
        assert rel_err(cem.variance, ref_var) <= tol
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("class_conditional", [True, False])
def test_matches_reference(rng, backend, variant, dtype, class_conditional):
    assert resolve(backend, "cpu") == backend, f"backend {backend!r} is not available here"
    C, m, D, B = 5, 3, 37, 41  # non-power-of-2 D, several clusters per class
    cem, *_ = make_loss(
        variant,
        C,
        m,
        D,
        rng,
        dtype=torch.float64 if dtype == torch.float64 else torch.float32,
        class_conditional=class_conditional,
        backend=backend,
    )
    z = torch.rand(B, D, generator=rng, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (B,), generator=rng)
    check_against_reference(cem, z, y, variant, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_four_dim_input_and_full_precision(rng, variant):
    C, m = 3, 2
    cem, *_ = make_loss(variant, C, m, 2 * 3 * 3, rng)
    z = torch.rand(9, 2, 3, 3, generator=rng, dtype=torch.float64)
    y = torch.randint(0, C, (9,), generator=rng)
    check_against_reference(cem, z, y, variant, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ["one_sample", "empty_cluster", "absent_class", "all_in_one_cluster", "singletons"])
def test_edge_cases(rng, backend, variant, case):
    C, m, D = 4, 3, 8
    cem, cent, pi, var = make_loss(variant, C, m, D, rng, backend=backend)
    if case == "one_sample":
        z = torch.rand(1, D, generator=rng, dtype=torch.float64)
        y = torch.tensor([2])
    elif case == "empty_cluster":
        far = cem.centroids.clone()
        far[:, 2] += 100.0  # nobody is ever assigned to cluster 2 of any class
        cem.set_clusters(far, cem.pi, cem.variance)
        z = torch.rand(30, D, generator=rng, dtype=torch.float64)
        y = torch.randint(0, C, (30,), generator=rng)
    elif case == "absent_class":
        z = torch.rand(20, D, generator=rng, dtype=torch.float64)
        y = torch.randint(0, 2, (20,), generator=rng)  # classes 2 and 3 absent
    elif case == "all_in_one_cluster":
        z = cem.centroids[1, 0].expand(12, D) + 1e-3 * torch.rand(12, D, generator=rng, dtype=torch.float64)
        y = torch.full((12,), 1)
    else:  # every sample alone in its cluster
        z = cem.centroids[:, 0].clone() + 1e-3
        y = torch.arange(C)
    check_against_reference(cem, z, y, variant, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_entropy", [0, 1])
@pytest.mark.parametrize("bug", [False, True])
def test_official_trained_options(rng, backend, log_entropy, bug):
    C, m, D = 6, 5, 16
    cem, *_ = make_loss(
        "official-trained",
        C,
        m,
        D,
        rng,
        log_entropy=log_entropy,
        replicate_index_bug=bug,
        var_threshold=0.5,
        dataset_size=60,
        backend=backend,
    )  # a small N: the blend weight's cap
    z = torch.rand(25, D, generator=rng, dtype=torch.float64)
    y = torch.randint(1, C, (25,), generator=rng)  # class 0 absent: the bug then shifts rows
    check_against_reference(cem, z, y, "official-trained", torch.float64)


def test_index_bug_changes_the_loss_when_classes_are_uneven():
    C, m, D = 3, 2, 4
    gen = torch.Generator().manual_seed(3)
    cent, pi, var = random_state("official-trained", C, m, D, gen=gen)
    pi = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]], dtype=torch.float64)
    var = torch.tensor([[0.5, 0.5], [0.001, 0.001], [0.3, 0.3]], dtype=torch.float64)
    z = torch.rand(10, D, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    out = []
    for bug in (False, True):
        cem = CEMLoss(C, m, variant="official-trained", dataset_size=30, replicate_index_bug=bug, backend="torch")
        cem.set_clusters(cent, pi, var)
        out.append(float(cem(z, y)))
    assert out[0] != pytest.approx(out[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("D", [6, 37])
def test_paper_full_covariance(rng, backend, dtype, D):
    C, m = 3, 2
    cem, *_ = make_loss(
        "paper",
        C,
        m,
        D,
        rng,
        covariance="full",
        backend=backend,
        dtype=torch.float64 if dtype == torch.float64 else torch.float32,
    )
    z = torch.rand(17, D, generator=rng, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (17,), generator=rng)
    check_against_reference(cem, z, y, "paper", dtype)


def test_paper_streaming_updates_step_by_step(rng):
    """Three batches through CEMLoss against a hand-written loop of Eq. 5-7 carrying pi and Sigma."""
    C, m, D, N = 3, 2, 5, 200
    cem, cent, pi, var = make_loss("paper", C, m, D, rng, dataset_size=N)
    s2 = cem.sigma**2
    pi_h, var_h = pi.clone(), var.clone()
    for _ in range(3):
        z = torch.rand(16, D, generator=rng, dtype=torch.float64)
        y = torch.randint(0, C, (16,), generator=rng)
        loss = cem(z, y)
        expect = 0.0
        for c in range(C):
            d2 = ((z[:, None, :] - cent[c][None]) ** 2).sum(-1)
            a = d2.argmin(1)
            for j in range(m):
                members = (y == c) & (a == j)
                n = int(members.sum())
                pi_h[c, j] = (pi_h[c, j] * (N - 16) + n) / N  # Eq. 5
                if n:
                    dsig = ((z[members] - cent[c, j]) ** 2).mean(0)
                    alpha = min(n / (float(pi_h[c, j]) * N), 1.0)  # Eq. 6
                    var_h[c, j] = (1 - alpha) * var_h[c, j] + alpha * dsig
                p = float(pi_h[c, j])
                expect += p * (
                    -math.log(p) + 0.5 * torch.log(var_h[c, j] + s2).sum().item() - 0.5 * D * math.log(s2)
                )  # Eq. 7
        assert float(loss) == pytest.approx(expect / D, rel=1e-10)
        assert torch.allclose(cem.pi, pi_h, rtol=1e-12, atol=0)
        assert torch.allclose(cem.variance, var_h, rtol=1e-12, atol=0)


def test_eval_mode_reads_but_does_not_update_state(rng):
    cem, *_ = make_loss("paper", 3, 2, 5, rng)
    before = {k: v.clone() for k, v in cem.state_dict().items() if isinstance(v, torch.Tensor)}
    cem.eval()
    cem(torch.rand(8, 5, generator=rng, dtype=torch.float64), torch.randint(0, 3, (8,), generator=rng))
    for k, v in cem.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def test_reduction_sum_is_D_times_mean_dim(rng):
    cent, pi, var = random_state("paper", 2, 2, 7, gen=rng)
    z = torch.rand(6, 7, generator=rng, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=rng)
    vals = []
    for red in ("mean_dim", "sum"):
        cem = CEMLoss(2, 2, reduction=red, dataset_size=100, backend="torch").set_clusters(cent, pi, var)
        vals.append(float(cem(z, y)))
    assert vals[1] == pytest.approx(7 * vals[0], rel=1e-12)
