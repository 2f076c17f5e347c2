"""The torch.library ops: opcheck (schema, fake tensor, autograd registration) and torch.compile."""

import pytest
import torch

from cem_fast import CEMLoss, full_covariance, ops


def _inputs(gen, B=12, C=3, m=2, D=10, dtype=torch.float32):
    z = torch.rand(B, D, generator=gen, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=gen)
    cent = torch.rand(C * m, D, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return z, y, cent, m


@pytest.mark.parametrize("class_conditional", [True, False])
def test_opcheck_assign_stats(rng, class_conditional):
    z, y, cent, m = _inputs(rng)
    z.requires_grad_(True)
    torch.library.opcheck(ops.assign_stats, (z, y, cent, m, class_conditional, "torch"))


def test_opcheck_scatter_grad(rng):
    z, y, cent, m = _inputs(rng)
    _, _, a = ops.assign_stats(z, y, cent, m, True, "torch")
    coef = torch.rand(cent.shape, generator=rng)
    torch.library.opcheck(ops.scatter_grad, (z, a, cent, coef, "torch"))


def test_assign_stats_autograd_is_the_analytic_gradient(rng):
    z, y, cent, m = _inputs(rng, dtype=torch.float64)
    z.requires_grad_(True)
    torch.autograd.gradcheck(lambda t: ops.assign_stats(t, y, cent, m, True, "torch")[0], (z,))


def test_full_covariance_helpers_skip_unassigned_rows(rng):
    """``assign == -1`` (a GPU kernel's mark for a label out of range) belongs to no cluster and gets no gradient."""
    z, y, cent, m = _inputs(rng, dtype=torch.float64)
    _, _, a = ops.assign_stats(z, y, cent, m, True, "torch")
    a_bad = a.clone()
    a_bad[[0, 5]] = -1
    keep = a_bad >= 0
    want = full_covariance.second_moments(z[keep], a[keep], cent)
    assert torch.allclose(full_covariance.second_moments(z, a_bad, cent), want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(full_covariance.second_moments(z, a, cent), want)
    coef = torch.rand(cent.shape[0], cent.shape[1], cent.shape[1], generator=rng, dtype=torch.float64)
    coef = coef + coef.transpose(1, 2)
    dz = full_covariance.matrix_grad(z, a_bad, cent, coef)
    assert torch.equal(dz[~keep], torch.zeros_like(dz[~keep]))
    assert torch.allclose(dz[keep], full_covariance.matrix_grad(z[keep], a[keep], cent, coef), rtol=1e-12, atol=1e-12)
    # the grouped CPU forms (one GEMM per cluster) give the same, -1 rows included
    assert torch.allclose(full_covariance.cluster_second_moments(z, a_bad, cent), want, rtol=1e-12, atol=1e-12)
    spd = coef @ coef.transpose(1, 2) + torch.eye(coef.shape[1], dtype=coef.dtype)
    chol = torch.linalg.cholesky(spd)
    factor = torch.rand(cent.shape[0], generator=rng, dtype=torch.float64)
    want_dz = full_covariance.matrix_grad(z, a_bad, cent, torch.linalg.inv(spd) * factor[:, None, None])
    got = full_covariance.segmented_full_grad(z, a_bad, cent, chol, factor)
    assert torch.allclose(got, want_dz, rtol=1e-10, atol=1e-12)
    assert full_covariance.segmented_full_grad(z.float(), a_bad, cent, chol, factor).dtype == torch.float32


def test_opcheck_scatter_grad_with_incoming_gradient(rng):
    z, y, cent, m = _inputs(rng)
    _, _, a = ops.assign_stats(z, y, cent, m, True, "torch")
    coef = torch.rand(cent.shape[0], 1, generator=rng)
    g = torch.tensor(0.5)
    torch.library.opcheck(ops.scatter_grad, (z, a, cent, coef, "torch", g, 2.0))
    want = ops.scatter_grad(z, a, cent, coef.expand(cent.shape) * 1.0, "torch")
    assert torch.allclose(ops.scatter_grad(z, a, cent, coef, "torch", g, 2.0), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_coef_matrix_by_triangular_solves_matches_cholesky_inverse(rng, dtype):
    K, D = 4, 9
    a = torch.randn(K, D, D, generator=rng, dtype=torch.float64)
    chol = torch.linalg.cholesky(a @ a.transpose(1, 2) + torch.eye(D, dtype=torch.float64)).to(dtype)
    factor = torch.rand(K, generator=rng, dtype=torch.float64).to(dtype)
    got = full_covariance.coef_matrix(chol, factor)
    want = torch.cholesky_inverse(chol) * factor[:, None, None]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.dtype == dtype and torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_kernels_is_the_backend_module_in_eager_mode():
    from cem_fast import backends

    for name in ("torch", "cpp"):
        assert ops.kernels(name) is backends.get(name)


def _train_step_losses(compiled: bool, variant: str, covariance: str = "diag"):
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Sigmoid())
    head = torch.nn.Linear(8, 3)
    cem = CEMLoss(3, 2, variant=variant, covariance=covariance, dataset_size=64, backend="torch", validate=False)
    x = torch.randn(64, 6)
    y = torch.arange(64) % 3
    with torch.no_grad():
        cem.refit(enc(x), y)
    opt = torch.optim.SGD(list(enc.parameters()) + list(head.parameters()), lr=0.1)

    def step(xb, yb):
        z = enc(xb)
        loss = torch.nn.functional.cross_entropy(head(z + 0.025 * torch.randn_like(z)), yb) + 4.0 * cem(z, yb)
        loss.backward()
        return loss

    fn = torch.compile(step, backend="aot_eager", fullgraph=False) if compiled else step
    losses = []
    for i in range(3):
        torch.manual_seed(100 + i)
        opt.zero_grad()
        losses.append(float(fn(x[:16], y[:16]).detach()))
        opt.step()
    return losses, cem.state_dict()


@pytest.mark.parametrize("variant,covariance", [("paper", "diag"), ("official-trained", "diag"), ("paper", "full")])
def test_training_step_under_torch_compile(variant, covariance):
    # with full covariance, eager (CPU) solves per cluster and compiled traces the batched explicit inverse
    eager, s_eager = _train_step_losses(False, variant, covariance)
    torch._dynamo.reset()
    compiled, s_comp = _train_step_losses(True, variant, covariance)
    assert compiled == pytest.approx(eager, rel=1e-5)
    for k, v in s_eager.items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(v, s_comp[k], rtol=1e-5, atol=1e-7), k


# --------------------------------------------------------------------------- dispatch


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Empty the backend choice caches for one test, and again after it (monkeypatch undoes the patches)."""
    from cem_fast import backends

    backends._RESOLVED.clear()
    backends._PROBED.clear()
    yield backends
    monkeypatch.undo()
    backends._RESOLVED.clear()
    backends._PROBED.clear()


def test_a_backend_that_fails_to_load_warns_once_and_falls_back(fresh_dispatch, monkeypatch):
    import warnings

    backends = fresh_dispatch
    cpp = backends.get("cpp")
    monkeypatch.setattr(cpp, "is_available", lambda device_type: False)
    monkeypatch.setattr(cpp, "load_error", lambda device_type: "boom")
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve("auto", "cpu") == "torch"
        assert backends.resolve("cpp", torch.device("cpu")) == "torch"
        assert backends.resolve("auto", "cpu") == "torch"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "'cpp' is unavailable (boom)" in messages[0], messages
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="backend"):
        backends.resolve("auto", "cpu")


def test_a_backend_that_cannot_run_on_the_device_warns(fresh_dispatch, monkeypatch):
    backends = fresh_dispatch
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    with pytest.warns(RuntimeWarning, match="'cuda' cannot run on cpu tensors"):
        assert backends.resolve("cuda", "cpu") == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve("cpp", "cpu") == "torch"  # the environment variable wins


class _InPlaceBackend:
    """The torch backend plus a fused forward that writes the new state into pi and variance."""

    FUSED_VARIANT_CODES = frozenset({2})

    def __init__(self):
        from cem_fast.backends import torch_backend

        self._torch = torch_backend
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def forward_diag(self, z, labels, centroids, pi, variance, args, update_state=False):
        from cem_fast.variants import LossParams, get_variant

        self.calls += 1
        assign, counts, sqdev = self._torch.assign_stats(z, labels, centroids, args.m, args.class_conditional)
        p = LossParams(
            num_classes=args.num_classes,
            m=args.m,
            sigma=args.sigma,
            class_conditional=args.class_conditional,
            dataset_size=args.dataset_size,
            reduction="mean_dim" if args.mean_dim else "sum",
        )
        loss, coef, new_pi, new_var = get_variant("paper").math(counts, sqdev, pi, variance, p)
        if update_state:
            pi.copy_(new_pi)
            variance.copy_(new_var)
            new_pi, new_var = pi, variance
        return loss, coef, new_pi, new_var, assign


def test_a_fused_forward_that_updates_the_state_in_place(fresh_dispatch, monkeypatch, rng):
    """ops uses a backend's forward_diag; with update_state the state it writes in place is the module's."""
    from helpers import random_state

    backends = fresh_dispatch
    fake = _InPlaceBackend()
    monkeypatch.setitem(backends._LOADED, "fake", fake)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    C, m, D, B = 3, 2, 7, 20
    cent, pi, var = random_state("paper", C, m, D, gen=rng, dtype=torch.float32)
    z = torch.rand(B, D, generator=rng)
    y = torch.randint(0, C, (B,), generator=rng)
    results = {}
    for name in ("torch", "fake"):
        cem = CEMLoss(C, m, dataset_size=100, backend="torch").set_clusters(cent, pi, var)
        backends._RESOLVED.clear()
        backends._RESOLVED[("torch", None, "cpu")] = name
        zz = z.clone().requires_grad_(True)
        state = cem.pi
        loss = cem(zz, y)
        loss.backward()
        assert cem.pi is state  # the buffer object is kept either way
        results[name] = (loss.detach(), zz.grad, cem.pi.clone(), cem.variance.clone())
    assert fake.calls == 1
    for got, want in zip(results["fake"], results["torch"]):
        assert torch.equal(got, want)
    assert not torch.equal(results["torch"][2], pi)  # the state did change
