"""GPU checks of the Triton and CUDA kernels against the torch backend and float64 sums.

Run on a machine with a CUDA device (``bench/gpu_check.sh``); without one every test is collected and
skipped. Inputs are random draws seeded from the test's id; a failure message names the seed.
"""

from __future__ import annotations

import pytest
import torch

from cem_fast.backends import torch_backend as ref

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the GPU tests need one (bench/gpu_check.sh on a GPU machine)"
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEV = "cuda"


def _triton():
    pytest.importorskip("triton", reason="triton is not installed")
    from cem_fast.backends import triton_backend

    if triton_backend.kernels_interpreted():
        pytest.skip("TRITON_INTERPRET was set when the Triton backend was imported: not a GPU run")
    return triton_backend


class _Cuda:
    """The CUDA extension with the backend call signature (``use_atomics`` is a Triton-only option)."""

    def __init__(self):
        from cem_fast.backends.extension import load_cuda_extension

        self.ext = load_cuda_extension()

    def assign_stats(self, z, labels, centroids, m, class_conditional, use_atomics=False):
        assert not use_atomics
        return self.ext.assign_stats(z, labels, centroids, m, class_conditional)

    def scatter_grad(self, z, assign, centroids, coef):
        return self.ext.scatter_grad(z, assign, centroids, coef)


@pytest.fixture(scope="module")
def cuda_ext():
    return _Cuda()  # a build failure is a test failure here, not a skip


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    # cuda_ext only for the cuda case: a CUDA build failure must not turn every Triton test into an error
    return _triton() if request.param == "triton" else request.getfixturevalue("cuda_ext")


@pytest.fixture
def gen(rng):
    return rng  # seeded from the test's node id (tests/conftest.py)


def make_inputs(gen, B, D, C, m, dtype):
    acc = ref.accumulation_dtype(dtype)
    z = torch.randn(B, D, generator=gen).to(dtype)
    labels = torch.randint(0, C, (B,), generator=gen)
    centroids = torch.randn(C * m, D, generator=gen).to(acc)
    return z.to(DEV), labels.to(DEV), centroids.to(DEV)


def f64_d2(z, labels, centroids, m, cc):
    z64, c64 = z.double(), centroids.double()
    if cc:
        cand = labels[:, None] * m + torch.arange(m, device=z.device)[None, :]
        d2 = ((z64[:, None, :] - c64[cand]) ** 2).sum(-1)
    else:
        cand = torch.arange(centroids.shape[0], device=z.device).expand(z.shape[0], -1)
        d2 = torch.cdist(z64, c64) ** 2
    return d2, cand


def check_assign_stats(be, z, labels, centroids, m, cc, seed, use_atomics=False):
    acc = centroids.dtype
    a, counts, sqdev = be.assign_stats(z, labels, centroids, m, cc, use_atomics=use_atomics)
    assert a.dtype == torch.int64 and counts.dtype == acc and sqdev.dtype == acc
    d2, cand = f64_d2(z, labels, centroids, m, cc)
    col = (a - cand[:, 0]) if cc else a
    chosen = d2.gather(1, col[:, None]).squeeze(1)
    top2 = d2.topk(min(2, d2.shape[1]), dim=1, largest=False).values
    slack = 1e-10 if acc == torch.float64 else 1e-4
    assert torch.all(chosen <= top2[:, 0] * (1 + slack) + slack), f"seed {seed}: not a nearest centroid"
    # where the float64 gap is clear of rounding, the torch backend must agree exactly
    a_ref, _, _ = ref.assign_stats(z, labels, centroids, m, cc)
    if d2.shape[1] > 1:
        clear = (top2[:, -1] - top2[:, 0]) > 1e-3 * top2[:, 0] + 1e-3
    else:
        clear = torch.ones_like(a, dtype=torch.bool)
    assert torch.equal(a[clear], a_ref[clear]), f"seed {seed}: assignments differ from the torch backend"
    K, D = centroids.shape
    diff = z.double() - centroids.double()[a]
    counts64 = torch.zeros(K, dtype=torch.float64, device=DEV).index_add_(0, a, torch.ones_like(a, dtype=torch.float64))
    sqdev64 = torch.zeros(K, D, dtype=torch.float64, device=DEV).index_add_(0, a, diff * diff)
    assert torch.equal(counts.double(), counts64), seed
    tol = dict(rtol=1e-11, atol=1e-11) if acc == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sqdev.double(), sqdev64, **tol, msg=lambda s: f"seed {seed}: {s}")
    return a, counts, sqdev


SHAPES = [(1, 37, 3, 2), (300, 513, 10, 3), (1000, 37, 4, 1)]
CASES = [(shape, dtype) for shape in SHAPES for dtype in DTYPES] + [
    ((2048, 512, 100, 10), torch.float32),
    ((2048, 512, 100, 10), torch.bfloat16),
    ((8192, 2048, 10, 3), torch.float32),
    ((8192, 2048, 10, 3), torch.bfloat16),  # > 4096 rows: the radix-sort path
    ((50000, 2048, 10, 3), torch.float32),
]  # a refit-sized batch


@pytest.mark.parametrize("shape,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("cc", [True, False])
def test_assign_stats(backend, gen, shape, dtype, cc):
    B, D, C, m = shape
    z, labels, centroids = make_inputs(gen, B, D, C, m, dtype)
    check_assign_stats(backend, z, labels, centroids, m, cc, gen.initial_seed())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_atomics_path(gen, dtype):
    tb = _triton()
    z, labels, centroids = make_inputs(gen, 3000, 256, 10, 3, dtype)
    for cc in (True, False):
        check_assign_stats(tb, z, labels, centroids, 3, cc, gen.initial_seed(), use_atomics=True)


def test_triton_and_cuda_agree(gen, cuda_ext):
    tb = _triton()
    z, labels, centroids = make_inputs(gen, 4096, 1000, 20, 5, torch.float32)
    a1, c1, s1 = tb.assign_stats(z, labels, centroids, 5, True)
    a2, c2, s2 = cuda_ext.assign_stats(z, labels, centroids, 5, True)
    d2, cand = f64_d2(z, labels, centroids, 5, True)
    top2 = d2.topk(2, dim=1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3 * top2[:, 0]
    assert torch.equal(a1[clear], a2[clear]), gen.initial_seed()
    if torch.equal(a1, a2):
        assert torch.equal(c1, c2)
        torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_grad_bitwise(backend, gen, dtype):
    z, _, centroids = make_inputs(gen, 777, 300, 7, 3, dtype)
    K, D = centroids.shape
    assign = torch.randint(0, K, (777,), generator=gen).to(DEV)
    for cols in (D, 1):
        coef = torch.randn(K, cols, generator=gen).to(centroids.dtype).to(DEV)
        dz = backend.scatter_grad(z, assign, centroids, coef)
        want = ref.scatter_grad(z, assign, centroids, coef)
        assert dz.dtype == dtype and torch.equal(dz, want), f"seed {gen.initial_seed()}, coef [K, {cols}]"


def test_scatter_grad_many_rows(backend, gen):
    # more rows than one grid dimension holds (65535) for the CUDA kernel's row loop
    z, _, centroids = make_inputs(gen, 70000, 3, 2, 2, torch.float32)
    assign = torch.randint(0, 4, (70000,), generator=gen).to(DEV)
    coef = torch.randn(4, 3, generator=gen).to(DEV)
    assert torch.equal(backend.scatter_grad(z, assign, centroids, coef), ref.scatter_grad(z, assign, centroids, coef))


@pytest.mark.parametrize("cc", [True, False])
def test_ties_go_to_the_lowest_index(backend, gen, cc):
    C, m, D = 3, 20, 33
    z, labels, centroids = make_inputs(gen, 64, D, C, m, torch.float32)
    labels[:] = 1
    z[:] = z[0] + 1e-3 * torch.randn(64, D, generator=gen).to(DEV)
    centroids[m + 3] = centroids[m + 2] = z[0]  # neighbouring candidates, scored in different unroll slots
    centroids[m + 18] = z[0]
    a, _, _ = backend.assign_stats(z, labels, centroids, m, cc)
    assert torch.all(a == m + 2), gen.initial_seed()


def test_deterministic(backend, gen):
    z, labels, centroids = make_inputs(gen, 8192, 512, 10, 3, torch.float32)
    first = backend.assign_stats(z, labels, centroids, 3, True)
    for _ in range(3):
        again = backend.assign_stats(z, labels, centroids, 3, True)
        for x, y in zip(first, again):
            assert torch.equal(x, y)


@pytest.mark.parametrize("B", [1024, 8192])  # both sort paths of the segment grouping
def test_no_host_sync(backend, gen, B):
    z, labels, centroids = make_inputs(gen, B, 512, 10, 3, torch.float32)
    coef = torch.randn_like(centroids)
    for cc in (True, False):  # compile / build outside the check
        backend.scatter_grad(z, backend.assign_stats(z, labels, centroids, 3, cc)[0], centroids, coef)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for cc in (True, False):
            a, counts, sqdev = backend.assign_stats(z, labels, centroids, 3, cc)
            backend.scatter_grad(z, a, centroids, coef)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_empty_batch_and_bad_labels(backend, gen):
    z, labels, centroids = make_inputs(gen, 16, 20, 3, 2, torch.float32)
    a, counts, sqdev = backend.assign_stats(z[:0], labels[:0], centroids, 2, True)
    assert a.shape == (0,) and torch.all(counts == 0) and torch.all(sqdev == 0)
    labels[3] = 7
    a, counts, _ = backend.assign_stats(z, labels, centroids, 2, True)
    assert a[3] == -1 and counts.sum() == 15


def test_non_contiguous_z(backend, gen):
    z, labels, centroids = make_inputs(gen, 100, 70, 3, 3, torch.float32)
    zt = z.t().contiguous().t()
    for x, y in zip(
        backend.assign_stats(zt, labels, centroids, 3, True), backend.assign_stats(z, labels, centroids, 3, True)
    ):
        assert torch.equal(x, y)


def test_strided_inputs_and_int32_labels(backend, gen):
    z, labels, centroids = make_inputs(gen, 300, 70, 4, 3, torch.float32)
    want = backend.assign_stats(z, labels, centroids, 3, True)
    ct = centroids.t().contiguous().t()  # column-major centroids
    for x, y in zip(backend.assign_stats(z, labels.int(), ct, 3, True), want):
        assert torch.equal(x, y)
    coef = torch.randn(12, 70, generator=gen).to(DEV).t().contiguous().t()
    a2 = torch.stack([want[0], want[0]], 1)[:, 0]  # assign with stride 2
    assert not a2.is_contiguous()
    zt = z.t().contiguous().t()
    assert torch.equal(
        backend.scatter_grad(zt, a2, ct, coef), ref.scatter_grad(z, want[0], centroids, coef.contiguous())
    ), gen.initial_seed()


# Each bad call runs in a child process: on the first H200 run one of them crashed the interpreter (a segfault
# while raising), which ended the whole tests/gpu session; now a crash fails its own case only.
_BAD_INPUT_CASES = {
    "centroids must be Double": "ext.assign_stats(z.double(), lab, torch.randn(2, 3, device=DEV), 1, True)",
    "z must be a CUDA tensor": "ext.assign_stats(z.cpu(), lab.cpu(), torch.randn(2, 3), 1, True)",
    "not a multiple of m=3": "ext.assign_stats(z, lab, torch.randn(4, 3, device=DEV), 3, True)",
    "coef must be \\[K, D\\]": "ext.scatter_grad(z, lab, torch.randn(2, 3, device=DEV), torch.randn(2, 2, device=DEV))",
}
_BAD_INPUT_CHILD = """
import re, torch
from cem_fast.backends.extension import load_cuda_extension
ext, DEV = load_cuda_extension(), "cuda"
z = torch.randn(4, 3, device=DEV)
lab = torch.zeros(4, dtype=torch.int64, device=DEV)
try:
    CALL
except RuntimeError as err:
    print("raised:", bool(re.search(PATTERN, str(err))), str(err).splitlines()[0])
else:
    print("raised: none")
"""


@pytest.mark.parametrize("pattern", list(_BAD_INPUT_CASES))
def test_cuda_rejects_bad_input(cuda_ext, pattern):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = _BAD_INPUT_CHILD.replace("CALL", _BAD_INPUT_CASES[pattern]).replace("PATTERN", repr(pattern))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"the child crashed (exit {proc.returncode}): {proc.stderr[-3000:]}"
    assert "raised: True" in proc.stdout, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,D,K", [(500, 100, 6), (4096, 512, 30)])
def test_triton_second_moments(gen, dtype, B, D, K):
    tb = _triton()
    z, _, centroids = make_inputs(gen, B, D, K, 1, dtype)
    assign = torch.randint(0, K, (B,), generator=gen).to(DEV)
    got = tb.cluster_second_moments(z, assign, centroids, K)
    diff = z.double() - centroids.double()[assign]
    want = torch.zeros(K, D, D, dtype=torch.float64, device=DEV).index_add_(
        0, assign, diff[:, :, None] * diff[:, None, :]
    )
    tol = dict(rtol=1e-11, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got.double(), want, **tol)
    assert torch.equal(got, got.transpose(1, 2))
    g = torch.randn(K, D, D, device=DEV, dtype=torch.float64)
    g = (g + g.transpose(1, 2)).to(centroids.dtype)
    dz = tb.second_moments_grad(z, assign, centroids, g)
    want_dz = 2 * torch.einsum("bij,bj->bi", g.double()[assign], diff)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dz.double(), want_dz, **tol)


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_opcheck_on_gpu(name, gen, request):
    """The registered ops (schema, fake implementation, autograd) with CUDA tensors and a GPU backend."""
    from cem_fast import ops

    _triton() if name == "triton" else request.getfixturevalue("cuda_ext")
    z, labels, centroids = make_inputs(gen, 12, 10, 3, 2, torch.float32)
    for cc in (True, False):
        torch.library.opcheck(ops.assign_stats, (z.clone().requires_grad_(True), labels, centroids, 2, cc, name))
    a = ops.assign_stats(z, labels, centroids, 2, True, name)[2]
    coef = torch.randn(centroids.shape, generator=gen).to(DEV)
    torch.library.opcheck(ops.scatter_grad, (z, a, centroids, coef, name))


@pytest.mark.parametrize("name", ["triton", "cuda"])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_training_step_under_torch_compile_on_gpu(name, covariance, request):
    """Three SGD steps with CEMLoss, eager and under torch.compile (aot_eager), give the same losses."""
    from cem_fast import CEMLoss

    _triton() if name == "triton" else request.getfixturevalue("cuda_ext")

    def run(compiled):
        torch.manual_seed(0)
        enc = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Sigmoid()).to(DEV)
        head = torch.nn.Linear(40, 3).to(DEV)
        cem = CEMLoss(3, 2, covariance=covariance, dataset_size=64, backend=name, validate=False).to(DEV)
        x = torch.randn(64, 6, device=DEV)
        y = torch.arange(64, device=DEV) % 3
        with torch.no_grad():
            cem.refit(enc(x), y)
        opt = torch.optim.SGD(list(enc.parameters()) + list(head.parameters()), lr=0.1)

        def step(xb, yb):
            z = enc(xb)
            loss = torch.nn.functional.cross_entropy(head(z), yb) + 4.0 * cem(z, yb)
            loss.backward()
            return loss

        fn = torch.compile(step, backend="aot_eager") if compiled else step
        losses = []
        for _ in range(3):
            opt.zero_grad()
            losses.append(float(fn(x[:16], y[:16]).detach()))
            opt.step()
        return losses

    eager = run(False)
    torch._dynamo.reset()
    assert run(True) == pytest.approx(eager, rel=1e-5)
