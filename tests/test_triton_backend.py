"""Triton kernels under the Triton interpreter (CPU), against the torch backend and float64 sums.

Triton decides interpreter-or-GPU when a kernel is decorated, i.e. when the backend file is imported,
and reads ``TRITON_INTERPRET`` then. So this module loads its own private copy of
``cem_fast/backends/triton_backend.py`` with the variable set and restores the environment at once:
the real ``cem_fast.backends.triton_backend`` module (used by the rest of the suite, and by the GPU
tests) is never touched, and no other test sees the variable. While this module's tests run, a
fixture sets it again (the launchers and ``is_available`` read it at call time).
"""

from __future__ import annotations

import importlib.util
import itertools
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from cem_fast.backends import torch_backend as ref  # noqa: E402


def _load_interpreted_copy():
    path = os.path.join(os.path.dirname(ref.__file__), "triton_backend.py")
    spec = importlib.util.spec_from_file_location("cem_fast_triton_backend_interpreted", path)
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    assert module.kernels_interpreted()
    return module


tb = _load_interpreted_copy()

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def gen(rng):
    return rng  # seeded from the test's node id; gen.initial_seed() names the inputs of a failure


def make_inputs(gen, B, D, C, m, dtype, spread=1.0):
    acc = tb.accumulation_dtype(dtype)
    z = torch.randn(B, D, generator=gen).to(dtype)
    labels = torch.randint(0, C, (B,), generator=gen)
    centroids = (spread * torch.randn(C * m, D, generator=gen)).to(acc)
    return z, labels, centroids


def f64_distances(z, labels, centroids, m, class_conditional):
    """[B, cand] float64 squared distances to each row's candidates and the candidates' indices."""
    K, D = centroids.shape
    z64, c64 = z.double(), centroids.double()
    if class_conditional:
        cand = labels[:, None] * m + torch.arange(m)[None, :]
    else:
        cand = torch.arange(K).expand(z.shape[0], K)
    d2 = ((z64[:, None, :] - c64[cand]) ** 2).sum(-1)
    return d2, cand


def f64_stats(z, assign, centroids):
    K, D = centroids.shape
    diff = z.double() - centroids.double()[assign]
    counts = torch.zeros(K, dtype=torch.float64).index_add_(0, assign, torch.ones(len(assign), dtype=torch.float64))
    sqdev = torch.zeros(K, D, dtype=torch.float64).index_add_(0, assign, diff * diff)
    return counts, sqdev


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-5)


def check_against_references(z, labels, centroids, m, cc, seed, use_atomics=False):
    a, counts, sqdev = tb.assign_stats(z, labels, centroids, m, cc, use_atomics=use_atomics)
    acc = centroids.dtype
    assert a.dtype == torch.int64 and a.shape == (z.shape[0],), seed
    assert counts.dtype == acc and sqdev.dtype == acc and sqdev.shape == centroids.shape, seed
    a_ref, counts_ref, sqdev_ref = ref.assign_stats(z, labels, centroids, m, cc)
    # the same distances in the same dtype: on continuous random data the argmin agrees exactly
    assert torch.equal(a, a_ref), f"seed {seed}: assignments differ from the torch backend"
    # and the chosen cluster is a float64 nearest one (up to the accumulation dtype's rounding)
    d2, cand = f64_distances(z, labels, centroids, m, cc)
    chosen = d2.gather(1, (a[:, None] - cand[:, :1]) if cc else a[:, None]).squeeze(1)
    best = d2.min(1).values
    slack = 1e-12 if acc == torch.float64 else 1e-5
    assert torch.all(chosen <= best * (1 + slack) + slack), f"seed {seed}: not a nearest centroid"
    counts64, sqdev64 = f64_stats(z, a, centroids)
    assert torch.equal(counts.double(), counts64), seed
    torch.testing.assert_close(sqdev.double(), sqdev64, **tol(acc), msg=lambda s: f"seed {seed}: {s}")
    torch.testing.assert_close(sqdev, sqdev_ref, **tol(acc), msg=lambda s: f"seed {seed}: {s}")
    return a, counts, sqdev


# --------------------------------------------------------------------------- assign_stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cc", [True, False])
def test_assign_stats_matches_references(gen, dtype, cc):
    z, labels, centroids = make_inputs(gen, B=67, D=37, C=4, m=3, dtype=dtype)
    check_against_references(z, labels, centroids, 3, cc, gen.initial_seed())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_atomics_path_matches(gen, dtype):
    z, labels, centroids = make_inputs(gen, B=45, D=50, C=3, m=2, dtype=dtype)
    for cc in (True, False):
        check_against_references(z, labels, centroids, 2, cc, gen.initial_seed(), use_atomics=True)


@pytest.mark.parametrize("B,D,C,m", [(1, 8, 3, 2), (5, 513, 2, 3), (40, 37, 5, 1), (33, 1, 2, 4), (70, 20, 2, 20)])
@pytest.mark.parametrize("cc", [True, False])
def test_edge_shapes(gen, B, D, C, m, cc):
    # D = 513 crosses several D tiles with a ragged tail; m = 20 and K = 40 span several candidate blocks
    z, labels, centroids = make_inputs(gen, B, D, C, m, torch.float32)
    check_against_references(z, labels, centroids, m, cc, gen.initial_seed())


def test_empty_clusters_and_absent_classes(gen):
    C, m, D = 5, 3, 24
    z, _, centroids = make_inputs(gen, 30, D, C, m, torch.float32)
    labels = torch.where(torch.rand(30, generator=gen) < 0.5, 1, 3)  # classes 0, 2, 4 absent
    centroids[3 * m + 1] += 100.0  # a cluster nobody is near
    a, counts, sqdev = check_against_references(z, labels, centroids, m, True, gen.initial_seed())
    for c in (0, 2, 4):
        assert torch.all(counts[c * m : (c + 1) * m] == 0) and torch.all(sqdev[c * m : (c + 1) * m] == 0)
    assert counts[3 * m + 1] == 0 and torch.all(sqdev[3 * m + 1] == 0)
    assert counts.sum() == 30


def test_batch_of_zero_rows():
    centroids = torch.randn(6, 9)
    a, counts, sqdev = tb.assign_stats(torch.empty(0, 9), torch.empty(0, dtype=torch.int64), centroids, 3, True)
    assert a.shape == (0,) and torch.all(counts == 0) and counts.shape == (6,) and torch.all(sqdev == 0)
    dz = tb.scatter_grad(torch.empty(0, 9), torch.empty(0, dtype=torch.int64), centroids, torch.ones(6, 9))
    assert dz.shape == (0, 9)


@pytest.mark.parametrize("cc", [True, False])
def test_ties_go_to_the_lowest_index(gen, cc):
    C, m, D = 3, 4, 21
    z, labels, centroids = make_inputs(gen, 16, D, C, m, torch.float32, spread=5.0)
    labels[:] = 1
    # clusters 5 and 7 (class 1, j = 1 and 3) are identical and sit on the points: an exact tie
    centroids[7] = centroids[5] = z[0].float()
    z[:] = z[0] + 1e-3 * torch.randn(16, D, generator=gen)
    a, _, _ = tb.assign_stats(z, labels, centroids, m, cc)
    assert torch.all(a == 5), gen.initial_seed()
    # across classes (unconditional): duplicate cluster 9 into cluster 2
    if not cc:
        centroids[2] = centroids[9] = centroids[5] + 0.0
        centroids[5] += 1.0
        centroids[7] += 1.0
        a, _, _ = tb.assign_stats(z, labels, centroids, m, False)
        assert torch.all(a == 2), gen.initial_seed()


@pytest.mark.parametrize("cc", [True, False])
def test_ties_across_candidate_blocks(gen, cc):
    # m = 20 candidates are scored 16 at a time: the tie spans two blocks
    C, m, D = 2, 20, 9
    z, labels, centroids = make_inputs(gen, 8, D, C, m, torch.float32, spread=5.0)
    labels[:] = 1
    z[:] = z[0] + 1e-3 * torch.randn(8, D, generator=gen)
    centroids[m + 18] = centroids[m + 2] = z[0].float()
    if not cc:
        centroids[3] = z[0].float()
    a, _, _ = tb.assign_stats(z, labels, centroids, m, cc)
    assert torch.all(a == (m + 2 if cc else 3)), gen.initial_seed()


def test_non_contiguous_z_and_int32_labels(gen):
    z, labels, centroids = make_inputs(gen, 24, 19, 3, 2, torch.float32)
    zt = z.t().contiguous().t()  # column-major view
    assert not zt.is_contiguous()
    a1 = tb.assign_stats(zt, labels.int(), centroids, 2, True)
    a2 = tb.assign_stats(z, labels, centroids, 2, True)
    for x, y in zip(a1, a2):
        assert torch.equal(x, y)


def test_out_of_range_labels_are_excluded(gen):
    z, labels, centroids = make_inputs(gen, 12, 10, 3, 2, torch.float32)
    labels[4], labels[7] = -1, 3
    a, counts, _ = tb.assign_stats(z, labels, centroids, 2, True)
    assert a[4] == -1 and a[7] == -1 and counts.sum() == 10
    dz = tb.scatter_grad(z, a, centroids, torch.ones_like(centroids))
    assert torch.all(dz[4] == 0) and torch.all(dz[7] == 0) and torch.any(dz[0] != 0)
    K, D = centroids.shape
    mg = tb.matrix_grad(z, a, centroids, torch.ones(K, D, D))  # dz is not zero-filled: the kernel writes them
    assert torch.all(mg[4] == 0) and torch.all(mg[7] == 0) and torch.any(mg[0] != 0)


def test_deterministic(gen):
    # the default path only: the interpreter runs programs one at a time, so the opt-in atomics path would be
    # reproducible here too, which it is not on a GPU (tests/gpu checks it against float64 sums instead)
    z, labels, centroids = make_inputs(gen, 64, 70, 2, 3, torch.float32)
    first = tb.assign_stats(z, labels, centroids, 3, True)
    second = tb.assign_stats(z, labels, centroids, 3, True)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- scatter_grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coef_cols", ["D", "1"])
def test_scatter_grad_matches_references(gen, dtype, coef_cols):
    z, labels, centroids = make_inputs(gen, 41, 37, 3, 2, dtype)
    K, D = centroids.shape
    assign = torch.randint(0, K, (41,), generator=gen)
    coef = torch.randn(K, D if coef_cols == "D" else 1, generator=gen).to(centroids.dtype)
    dz = tb.scatter_grad(z, assign, centroids, coef)
    assert dz.dtype == dtype and dz.shape == z.shape
    exact = coef.double()[assign] * (z.double() - centroids.double()[assign])
    expected = ref.scatter_grad(z, assign, centroids, coef)
    if dtype == torch.bfloat16:
        # the interpreter rounds float32 -> bfloat16 toward zero (a GPU rounds to nearest even):
        # allow one bfloat16 ulp here; the GPU tests ask for bitwise equality
        torch.testing.assert_close(dz.double(), exact, rtol=2**-7, atol=1e-6)
    else:
        assert torch.equal(dz, expected), f"seed {gen.initial_seed()}: differs from the torch backend"
        torch.testing.assert_close(
            dz.double(),
            exact,
            **(
                tol(torch.float64)
                if dtype == torch.float64
                else dict(rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-5)
            ),
        )


def test_scatter_grad_ragged_tiles(gen):
    z, _, centroids = make_inputs(gen, 3, 513, 2, 2, torch.float32)
    assign = torch.tensor([3, 0, 3])
    coef = torch.randn(4, 513, generator=gen)
    assert torch.equal(tb.scatter_grad(z, assign, centroids, coef), ref.scatter_grad(z, assign, centroids, coef))


# --------------------------------------------------------------------------- full covariance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_second_moments_and_grad(gen, dtype):
    B, D, K = 40, 37, 5
    z, _, centroids = make_inputs(gen, B, D, 5, 1, dtype)
    assign = torch.randint(0, K - 1, (B,), generator=gen)  # cluster K-1 stays empty
    moments = tb.cluster_second_moments(z, assign, centroids, K)
    diff = z.double() - centroids.double()[assign]
    expected = torch.zeros(K, D, D, dtype=torch.float64).index_add_(0, assign, diff[:, :, None] * diff[:, None, :])
    acc = centroids.dtype
    assert moments.dtype == acc and moments.shape == (K, D, D)
    torch.testing.assert_close(moments.double(), expected, **tol(acc))
    assert torch.equal(moments, moments.transpose(1, 2)) and torch.all(moments[K - 1] == 0)

    g = torch.randn(K, D, D, generator=gen, dtype=torch.float64)
    g = (g + g.transpose(1, 2)).to(acc)  # a symmetric upstream gradient
    zg = z.double().requires_grad_(True)
    d = zg - centroids.double()[assign]
    m64 = torch.zeros(K, D, D, dtype=torch.float64).index_add(0, assign, d[:, :, None] * d[:, None, :])
    (m64 * g.double()).sum().backward()
    dz = tb.second_moments_grad(z, assign, centroids, g)
    assert dz.dtype == dtype
    if dtype == torch.bfloat16:
        torch.testing.assert_close(dz.double(), zg.grad, rtol=2**-7, atol=1e-3)
    else:
        torch.testing.assert_close(
            dz.double(), zg.grad, **(tol(acc) if acc == torch.float64 else dict(rtol=1e-4, atol=1e-4))
        )
    # matrix_grad with a non-symmetric coefficient: dz_i = coef[a_i] @ (z_i - mu)
    coef = torch.randn(K, D, D, generator=gen).to(acc)
    expected_mg = torch.einsum("bij,bj->bi", coef.double()[assign], diff)
    out = tb.matrix_grad(z, assign, centroids, coef)
    if dtype == torch.bfloat16:
        torch.testing.assert_close(out.double(), expected_mg, rtol=2**-7, atol=1e-3)
    else:
        torch.testing.assert_close(
            out.double(), expected_mg, **(tol(acc) if acc == torch.float64 else dict(rtol=1e-4, atol=1e-4))
        )


# --------------------------------------------------------------------------- availability and bad input


def test_is_available(monkeypatch):
    assert tb.is_available() and tb.is_available("cpu")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert tb.is_available("cpu") is False
    assert tb.is_available() is torch.cuda.is_available()
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="z must be a CUDA tensor"):
        tb.assign_stats(z, torch.zeros(4, dtype=torch.int64), torch.randn(2, 3), 1, True)


def _bad(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_bad_inputs():
    z, lab, cen = torch.randn(6, 4), torch.zeros(6, dtype=torch.int64), torch.randn(6, 4)
    f = tb.assign_stats
    _bad(ValueError, "^z must be 2-D", f, z[0], lab, cen, 3, True)
    _bad(TypeError, "^z must be float", f, z.int(), lab, cen, 3, True)
    _bad(TypeError, "^z must be a torch.Tensor", f, z.numpy(), lab, cen, 3, True)
    _bad(ValueError, "^z must have at least one feature", f, z[:, :0], lab, cen[:, :0], 3, True)
    _bad(TypeError, "^centroids must be torch.float32", f, z, lab, cen.double(), 3, True)
    _bad(TypeError, "^centroids must be torch.float64", f, z.double(), lab, cen, 3, True)
    _bad(ValueError, "^centroids has D=5", f, z, lab, torch.randn(6, 5), 3, True)
    _bad(ValueError, "^centroids is on meta", f, z, lab, cen.to("meta"), 3, True)
    _bad(TypeError, "^labels must be int64", f, z, lab.float(), cen, 3, True)
    _bad(ValueError, "^labels has 5 entries", f, z, lab[:5], cen, 3, True)
    _bad(ValueError, "^labels must be 1-D", f, z, lab[:, None], cen, 3, True)
    _bad(ValueError, "^m must be a positive int", f, z, lab, cen, 0, True)
    _bad(ValueError, "^m must be a positive int", f, z, lab, cen, 2.0, True)
    _bad(ValueError, "^centroids has K=6 rows, not a multiple of m=4", f, z, lab, cen, 4, True)
    _bad(TypeError, "^class_conditional must be a bool", f, z, lab, cen, 3, 1)
    _bad(TypeError, "^use_atomics must be a bool", f, z, lab, cen, 3, True, use_atomics="yes")
    g = tb.scatter_grad
    a = torch.zeros(6, dtype=torch.int64)
    _bad(TypeError, "^assign must be int64", g, z, a.int(), cen, torch.ones(6, 4))
    _bad(ValueError, "^assign has 5 entries", g, z, a[:5], cen, torch.ones(6, 4))
    _bad(ValueError, r"^coef must be \[K, D\]", g, z, a, cen, torch.ones(6, 3))
    _bad(ValueError, r"^coef must be \[K, D\]", g, z, a, cen, torch.ones(5, 4))
    _bad(TypeError, "^coef must be torch.float32", g, z, a, cen, torch.ones(6, 4, dtype=torch.float64))
    _bad(ValueError, "^coef must be 2-D", g, z, a, cen, torch.ones(6))
    _bad(ValueError, r"^coef must be \[K, D, D\]", tb.matrix_grad, z, a, cen, torch.ones(6, 4, 3))
    _bad(ValueError, "^K must equal", tb.cluster_second_moments, z, a, cen, 5)


# --------------------------------------------------------------------------- compiles for the GPU

_I32 = (
    "B",
    "D",
    "K",
    "M",
    "num_classes",
    "stride_zb",
    "stride_zd",
    "stride_cb",
    "stride_cd",
    "stride_kb",
    "stride_kd",
    "P",
    "rows_per_prog",
    "n_parts",
)
_F32 = ("c_hi", "c_lo", "n_hi", "n_lo", "scale_hi", "scale_lo", "factor", "t_hi", "t_lo")


def _compile_sm90(fn, ptr_types, constexprs, options=None):
    """Compile one kernel for sm_90 (H100/H200) with Triton's bundled ptxas: no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptr_types:
            signature[name] = ptr_types[name]
        elif name in _F32:
            signature[name] = "fp32"
        else:
            assert name in _I32, name
            signature[name] = "i32"
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options or {"num_warps": 4}
    )
    assert ".entry" in kernel.asm["ptx"]
    # spills are made by ptxas (register allocation), never visible in the PTX: ask ptxas
    import subprocess
    import tempfile

    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        info = subprocess.run(
            [knobs.nvidia.ptxas.path, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    assert " 0 bytes spill stores" in info, f"{fn.__name__} {constexprs}: register spills\n{info}"


@pytest.mark.parametrize("zt,acc", [("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")])
def test_kernels_compile_for_sm90(zt, acc, monkeypatch):
    """The interpreter does not type-check like the compiler does: compile the real kernels for an H200,
    with every tile configuration the launchers pick, and ask ptxas that nothing spills."""
    monkeypatch.delenv("TRITON_INTERPRET")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton has no ahead-of-time compile API ({exc})")
    from cem_fast.backends import triton_backend as real

    if real.kernels_interpreted():
        pytest.skip("TRITON_INTERPRET was set when the backend was imported in this process")
    z, a, i = f"*{zt}", f"*{acc}", "*i64"
    common = dict(
        z_ptr=z,
        cent_ptr=a,
        perm_ptr="*i32",
        starts_ptr="*i32",
        sqdev_ptr=a,
        counts_ptr=a,
        labels_ptr=i,
        assign_ptr=i,
        coef_ptr=a,
        dz_ptr=z,
        out_ptr=a,
        pcount_ptr="*i32",
        psq_ptr=a,
        pi_ptr=a,
        var_ptr=a,
        var_out_ptr=a,
        pi_out_ptr=a,
        lossp_ptr=a,
        loss_ptr=a,
        pi_src_ptr=a,
        pi_dst_ptr=a,
        gout_ptr=a,
    )
    f64 = acc == "fp64"
    acc_dtype = torch.float64 if f64 else torch.float32
    configs = {
        (cc, real._assign_blocks(cand, 2048, cc, acc_dtype))  # what the launchers pick
        for cc, cand in itertools.product((True, False), (1, 2, 3, 5, 10, 30))
    }
    st = real._stats_blocks(30, 2048, acc_dtype)
    for cc, (bb, bk, bd) in sorted(configs):
        _compile_sm90(
            real._assign_partial_kernel, common, dict(CLASS_COND=cc, BLOCK_B=bb, BLOCK_K=bk, BLOCK_D=bd, **st)
        )
    atomic = {
        (cc, real._atomic_blocks(cand, 2048, cc, acc_dtype))
        for cc, cand in itertools.product((True, False), (1, 2, 3, 5, 10, 30))
    }
    for cc, (bb, bk, bd) in sorted(atomic):
        _compile_sm90(real._assign_atomic_kernel, common, dict(CLASS_COND=cc, BLOCK_B=bb, BLOCK_K=bk, BLOCK_D=bd))
    for epi, cc, m in itertools.product((0, 1, 2, 3), (True, False), (1, 3, 20)):
        _compile_sm90(
            real._reduce_epilogue_kernel,
            common,
            dict(EPILOGUE=epi, CLASS_COND=cc, **real._reduce_blocks(2048, m, acc_dtype)),
            real.REDUCE_OPTIONS,
        )
    tiles = ((8, 4), (32, 16), (64, 32), (256, 8))  # up to _TRAINED_TILE
    for (kp, cp), cc, bug, log in itertools.product(tiles, (True, False), (False, True), (False, True)):
        _compile_sm90(
            real._trained_finish_kernel,
            common,
            dict(CLASS_COND=cc, INDEX_BUG=bug, LOG_ENTROPY=log, K_PAD=kp, C_PAD=cp, BLOCK_P=8),
        )
    for copy in (False, True):
        _compile_sm90(real._finish_kernel, common, dict(COPY_PI=copy, BLOCK=1024))
    for has_gout in (False, True):
        _compile_sm90(real._scatter_grad_kernel, common, dict(HAS_GOUT=has_gout, BLOCK_B=16, BLOCK_D=128))
    for K in (1, 3, 30, 100, 256):
        _compile_sm90(
            real._segments_kernel, dict(assign_ptr=i, perm_ptr="*i32", starts_ptr="*i32"), real._segment_blocks(K)
        )
    if zt != "bf16":
        moments, grad = real._full_cov_blocks(2048, acc_dtype)  # what the launchers pick
        _compile_sm90(real._second_moments_kernel, common, moments)
        _compile_sm90(real._matrix_grad_kernel, common, grad)


def test_batch_size_is_not_specialised(monkeypatch):
    """A ragged last batch must not recompile (fatal inside a CUDA graph capture): B is never specialised."""
    monkeypatch.delenv("TRITON_INTERPRET")
    from cem_fast.backends import triton_backend as real

    if real.kernels_interpreted():
        pytest.skip("TRITON_INTERPRET was set when the backend was imported in this process")
    for fn, names in (
        (real._assign_partial_kernel, ("B", "rows_per_prog")),
        (real._assign_atomic_kernel, ("B",)),
        (real._scatter_grad_kernel, ("B",)),
        (real._reduce_epilogue_kernel, ("P",)),
    ):
        skipped = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
        assert set(names) <= skipped, (fn.__name__, skipped)


@pytest.mark.parametrize("B,K", [(0, 3), (1, 1), (37, 5), (300, 30), (70, 300)])
def test_segments_are_a_stable_sort(gen, B, K):
    # one counting-sort kernel (a sort with int32 keys past 256 clusters); rows with assign -1 come first
    a = torch.randint(-1, K, (B,), generator=gen)
    perm, starts = tb._segments(a, K)
    keys, expected = torch.sort(a, stable=True)
    assert starts.dtype == torch.int32 and perm.dtype == (torch.int32 if K <= 256 else torch.int64)
    assert torch.equal(perm.long(), expected), gen.initial_seed()
    assert torch.equal(starts.long(), torch.searchsorted(keys, torch.arange(K + 1))), gen.initial_seed()


def test_scatter_grad_non_contiguous_assign(gen):
    z, _, centroids = make_inputs(gen, 12, 7, 2, 2, torch.float32)
    K = centroids.shape[0]
    pairs = torch.randint(0, K, (12, 2), generator=gen)
    a = pairs[:, 1]  # stride 2
    assert not a.is_contiguous()
    coef = torch.randn(K, 7, generator=gen)
    assert torch.equal(tb.scatter_grad(z, a, centroids, coef), ref.scatter_grad(z, a, centroids, coef))


# --------------------------------------------------------------------------- fused forward (forward_diag)

from helpers import random_state, rel_err, run_reference  # noqa: E402

from cem_fast.backends import KernelArgs  # noqa: E402
from cem_fast.variants import trained_threshold  # noqa: E402

FUSED_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
CODES = {"official": 0, "official-trained": 1, "paper": 2}


def fused_step(
    z,
    labels,
    cent,
    pi,
    var,
    variant,
    *,
    cc=True,
    sigma=0.1,
    N=300.0,
    mean_dim=True,
    update_state=False,
    log_entropy=True,
    bug=False,
):
    """forward_diag + scatter_grad (upstream gradient 1, factor 2) as CEMLoss runs them."""
    C, m, D = cent.shape
    acc = tb.accumulation_dtype(z.dtype)
    centroids = cent.reshape(C * m, D).to(acc)
    threshold = trained_threshold(sigma, 0.125) if variant == "official-trained" else 0.0
    args = KernelArgs(CODES[variant], m, cc, sigma, C, N, threshold, log_entropy, bug, mean_dim)
    loss, coef, new_pi, new_var, assign = tb.forward_diag(
        z, labels, centroids, pi, var, args, update_state=update_state
    )
    dz = tb.scatter_grad(z, assign, centroids, coef, torch.ones((), dtype=acc), 2.0)
    return loss, dz, new_pi, new_var, assign, coef


def check_fused(
    z, labels, cent, pi, var, variant, cc=True, sigma=0.1, N=300.0, mean_dim=True, log_entropy=True, bug=False
):
    dtype = z.dtype
    acc = tb.accumulation_dtype(dtype)
    # the reference gets the same (rounded) state: only the computation is compared
    cent, pi, var = cent.to(acc), pi.to(acc), var.to(acc)
    p0 = None if variant == "official" else pi.clone()
    v0 = var.clone() if variant != "official" else torch.zeros(*cent.shape[:2], 0, dtype=acc)
    loss, dz, new_pi, new_var, assign, _ = fused_step(
        z,
        labels,
        cent,
        p0 if p0 is not None else torch.zeros(cent.shape[:2], dtype=acc),
        v0,
        variant,
        cc=cc,
        sigma=sigma,
        N=N,
        mean_dim=mean_dim,
        log_entropy=log_entropy,
        bug=bug,
    )
    ref_loss, ref_grad, ref_pi, ref_var = run_reference(
        z,
        labels,
        cent,
        pi,
        var if variant != "official" else None,
        variant,
        sigma=sigma,
        dataset_size=N,
        reduction="mean_dim" if mean_dim else "sum",
        class_conditional=cc,
        log_entropy=int(log_entropy),
        replicate_index_bug=bug,
    )
    tol = FUSED_TOL[dtype]
    assert loss.dtype == acc and loss.shape == ()
    assert abs(float(loss) - float(ref_loss)) <= tol * max(abs(float(ref_loss)), 1e-12), (float(loss), float(ref_loss))
    assert dz.dtype == dtype and dz.shape == z.shape
    if ref_grad.norm() == 0:
        assert float(dz.double().norm()) == 0.0
    else:
        assert rel_err(dz, ref_grad) <= tol, rel_err(dz, ref_grad)
    if variant == "paper":
        assert rel_err(new_pi, ref_pi) <= tol and rel_err(new_var, ref_var) <= tol
        assert new_pi.shape == pi.shape and new_var.shape == var.shape
    return assign


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cc", [True, False])
def test_forward_diag_matches_float64_reference(gen, variant, dtype, cc):
    C, m, D, B = 4, 3, 37, 41  # non-power-of-2 D
    cent, pi, var = random_state("paper", C, m, D, gen=gen)
    z = torch.rand(B, D, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, C, (B,), generator=gen)
    check_fused(z, labels, cent, pi, var, variant, cc=cc, mean_dim=cc)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("case", ["one_sample", "empty_cluster", "absent_class", "ties", "wide"])
def test_forward_diag_edge_cases(gen, variant, case):
    C, m, D, B = 3, 2, 20, 30
    if case == "wide":
        D, B = 130, 70  # several D blocks and several assignment programs
    cent, pi, var = random_state("paper", C, m, D, gen=gen)
    z = torch.rand(B, D, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, C, (B,), generator=gen)
    if case == "one_sample":
        z, labels = z[:1], labels[:1]
    elif case == "empty_cluster":
        cent[1, 1] += 50.0  # nobody is near cluster 3
    elif case == "absent_class":
        labels = torch.where(labels == 2, 0, labels)
    elif case == "ties":
        cent[0, 1] = cent[0, 0]  # an exact tie: the lower index wins
        z[:] = cent[0, 0] + 1e-3 * torch.rand(B, D, generator=gen, dtype=torch.float64)
        labels[:] = 0
    assign = check_fused(z.float(), labels, cent, pi, var, variant)
    if case == "empty_cluster":
        assert not torch.any(assign == 3)
    if case == "ties":
        assert torch.all(assign == 0)


@pytest.mark.parametrize(
    "cc,log_entropy,bug", [(True, True, False), (True, False, False), (True, True, True), (False, True, False)]
)
def test_forward_diag_official_trained(gen, cc, log_entropy, bug):
    C, m, D, B = 4, 2, 21, 40
    cent, pi, var = random_state("official-trained", C, m, D, gen=gen)
    z = torch.rand(B, D, generator=gen, dtype=torch.float64).float()
    labels = torch.randint(0, C, (B,), generator=gen)
    if bug:
        labels = torch.where(labels == 1, 3, labels)  # uneven classes, one absent: the bug reads other rows
    assert 1 in tb.FUSED_VARIANT_CODES
    # N small enough that the blend weight reaches its cap for some clusters
    check_fused(z, labels, cent, pi, var, "official-trained", cc=cc, N=60.0, log_entropy=log_entropy, bug=bug)


def test_forward_diag_official_trained_many_clusters(gen, monkeypatch):
    # past one program's tile: the unfused path (assign_stats + PyTorch), same results
    C, m, D, B = 3, 2, 9, 30
    cent, pi, var = random_state("official-trained", C, m, D, gen=gen)
    z = torch.rand(B, D, generator=gen, dtype=torch.float64).float()
    labels = torch.randint(0, C, (B,), generator=gen)
    fused = fused_step(z, labels, cent.float(), pi.float(), var.float(), "official-trained", N=60.0, bug=True)
    monkeypatch.setattr(tb, "_TRAINED_TILE", 1)
    unfused = fused_step(z, labels, cent.float(), pi.float(), var.float(), "official-trained", N=60.0, bug=True)
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_forward_diag_updates_the_state_in_place_and_is_deterministic(gen):
    C, m, D, B = 3, 2, 24, 50
    cent, pi, var = random_state("paper", C, m, D, gen=gen, dtype=torch.float32)
    z = torch.rand(B, D, generator=gen)
    labels = torch.randint(0, C, (B,), generator=gen)
    out = fused_step(z, labels, cent, pi.clone(), var.clone(), "paper")
    pi2, var2 = pi.clone(), var.clone()
    inplace = fused_step(z, labels, cent, pi2, var2, "paper", update_state=True)
    assert inplace[2] is pi2 and inplace[3] is var2
    for a, b in zip(out, inplace):
        assert torch.equal(a, b)  # bit for bit: fixed-order sums, no atomics
    assert not torch.equal(pi2, pi) and not torch.equal(var2, var)


def test_forward_diag_bad_input(gen):
    z, labels, centroids = make_inputs(gen, 8, 5, 2, 2, torch.float32)
    pi, var = torch.full((2, 2), 0.25), torch.rand(2, 2, 5)
    args = KernelArgs(2, 2, True, 0.1, 2, 100.0, 0.0, True, False, True)
    with pytest.raises(ValueError, match="^variant_code"):
        tb.forward_diag(z, labels, centroids, pi, var, args._replace(variant_code=3))
    with pytest.raises(TypeError, match="^pi and variance must be torch.float32"):
        tb.forward_diag(z, labels, centroids, pi.double(), var, args)
    with pytest.raises(ValueError, match="^pi must hold K=4"):
        tb.forward_diag(z, labels, centroids, pi[:1], var, args)
    with pytest.raises(TypeError, match="^args must be a cem_fast.backends.KernelArgs"):
        tb.forward_diag(z, labels, centroids, pi, var, tuple(args))
    assert 0 in tb.FUSED_VARIANT_CODES and 2 in tb.FUSED_VARIANT_CODES


def test_scatter_grad_reads_grad_out_and_factor(gen):
    z, _, centroids = make_inputs(gen, 19, 11, 3, 2, torch.float32)
    K = centroids.shape[0]
    assign = torch.randint(0, K, (19,), generator=gen)
    g = torch.tensor(0.37)
    for cols in (1, 11):
        coef = torch.randn(K, cols, generator=gen)
        expected = ref.scatter_grad(z, assign, centroids, (coef * (g * 2.0)).expand(K, 11).contiguous())
        assert torch.equal(tb.scatter_grad(z, assign, centroids, coef, g, 2.0), expected)
    with pytest.raises(ValueError, match="^grad_out must be"):
        tb.scatter_grad(z, assign, centroids, coef, torch.ones(2), 2.0)


# --------------------------------------------------------------------------- on a GPU (skipped without one)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def real_tb(monkeypatch):
    """The compiled backend (not the interpreted copy)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    from cem_fast.backends import triton_backend as real

    if real.kernels_interpreted():
        pytest.skip("TRITON_INTERPRET was set when the backend was imported in this process")
    return real


def _gpu_case(gen, B, D=2048, C=10, m=3, dtype=torch.float32):
    cent, pi, var = random_state("paper", C, m, D, gen=gen, dtype=torch.float32)
    z = torch.rand(B, D, generator=gen).to(dtype)
    labels = torch.randint(0, C, (B,), generator=gen)
    return [t.cuda() for t in (z, labels, cent, pi, var)]


@needs_cuda
@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [128, 1000])
def test_gpu_fused_step_matches_float64_and_never_syncs(real_tb, gen, variant, dtype, B):
    z, labels, cent, pi, var = _gpu_case(gen, B, dtype=dtype)
    C, m, D = cent.shape
    code = CODES[variant]
    state = (pi.clone(), var.clone()) if variant == "paper" else (pi, torch.zeros(C, m, 0, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, coef, new_pi, new_var, assign = real_tb.forward_diag(
            z,
            labels,
            cent.reshape(C * m, D),
            *state,
            KernelArgs(code, m, True, 0.1, C, 20000.0, 0.0, True, False, True),
            update_state=True,
        )
        dz = real_tb.scatter_grad(z, assign, cent.reshape(C * m, D), coef, torch.ones((), device="cuda"), 2.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_loss, ref_grad, ref_pi, ref_var = run_reference(
        z.cpu(),
        labels.cpu(),
        cent.cpu(),
        pi.cpu(),
        var.cpu() if variant == "paper" else None,
        variant,
        sigma=0.1,
        dataset_size=20000.0,
    )
    tol = FUSED_TOL[dtype]
    assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss))
    assert rel_err(dz.cpu(), ref_grad) <= tol
    if variant == "paper":
        assert rel_err(new_pi.cpu(), ref_pi) <= tol and rel_err(new_var.cpu(), ref_var) <= tol


@needs_cuda
def test_gpu_fused_step_replays_in_a_cuda_graph_and_ragged_batches_do_not_recompile(real_tb, gen):
    z, labels, cent, pi, var = _gpu_case(gen, 128)
    C, m, D = cent.shape
    flat = cent.reshape(C * m, D)
    g = torch.ones((), device="cuda")

    def step(pi_, var_):
        args = KernelArgs(2, m, True, 0.1, C, 20000.0, 0.0, True, False, True)
        loss, coef, _, _, assign = real_tb.forward_diag(z, labels, flat, pi_, var_, args, update_state=True)
        return loss, real_tb.scatter_grad(z, assign, flat, coef, g, 2.0)

    eager_pi, eager_var = pi.clone(), var.clone()
    eager = step(eager_pi, eager_var)  # also compiles every kernel before the capture
    graph_pi, graph_var = pi.clone(), var.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(graph_pi, graph_var)
    graph_pi.copy_(pi)
    graph_var.copy_(var)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager + (eager_pi, eager_var), captured + (graph_pi, graph_var)):
        assert torch.equal(a, b)
    kernels = (real_tb._assign_partial_kernel, real_tb._reduce_epilogue_kernel, real_tb._scatter_grad_kernel)
    before = [sum(len(c[0]) for c in k.device_caches.values()) for k in kernels]
    z, labels = z[:100], labels[:100]  # a ragged last batch: same kernels, no recompilation
    step(pi.clone(), var.clone())
    assert [sum(len(c[0]) for c in k.device_caches.values()) for k in kernels] == before
