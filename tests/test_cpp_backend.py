"""The C++/OpenMP backend (csrc/cem_cpu.cpp) against the torch backend and a float64 computation,
its determinism and input checks, the extension loader, and ``python -m cem_fast.build``."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from cem_fast.backends import cpp_backend, cuda_backend, extension, torch_backend

REPO = Path(__file__).resolve().parent.parent
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def ext():
    return extension.load_cpp_extension()


def make_inputs(B, D, classes, m, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    acc = torch_backend.accumulation_dtype(dtype)
    z = torch.randn(B, D, generator=gen).to(dtype)
    labels = torch.randint(0, classes, (B,), generator=gen)
    centroids = torch.randn(classes * m, D, generator=gen, dtype=acc)
    coef = torch.randn(classes * m, D, generator=gen, dtype=acc)
    return z, labels, centroids, coef


def float64_stats(z, labels, centroids, m, class_conditional):
    """Written from the definition, in float64: argmin of squared distances (own class's clusters only)."""
    zd, mu = z.double(), centroids.double()
    K = mu.shape[0]
    d2 = ((zd[:, None, :] - mu[None]) ** 2).sum(-1)
    if class_conditional:
        cls = torch.arange(K) // m
        d2 = torch.where(cls[None, :] == labels[:, None], d2, torch.full_like(d2, float("inf")))
    a = d2.argmin(1) if z.shape[0] else torch.zeros(0, dtype=torch.int64)
    counts = torch.zeros(K, dtype=torch.float64).index_add_(0, a, torch.ones(len(a), dtype=torch.float64))
    sqdev = torch.zeros(K, zd.shape[1], dtype=torch.float64).index_add_(0, a, (zd - mu[a]) ** 2)
    return a, counts, sqdev


def tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-5)


# B, D, classes, m: tails of the 64-byte lanes (37, 513, 1), B = 0 and 1, K = 1, m = 1,
# many more clusters than rows (empty clusters, absent classes).
SHAPES = [
    (50, 37, 4, 3),
    (40, 513, 3, 2),
    (0, 8, 3, 2),
    (1, 5, 2, 3),
    (20, 16, 1, 1),
    (30, 64, 5, 1),
    (3, 32, 10, 3),
    (10, 1, 2, 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("class_conditional", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-D{}-C{}-m{}".format(*s))
def test_matches_torch_and_float64(ext, shape, class_conditional, dtype):
    B, D, classes, m = shape
    z, labels, centroids, coef = make_inputs(B, D, classes, m, dtype)
    a, counts, sqdev = ext.assign_stats(z, labels, centroids, m, class_conditional)
    ta, tcounts, tsqdev = torch_backend.assign_stats(z, labels, centroids, m, class_conditional)
    ra, rcounts, rsqdev = float64_stats(z, labels, centroids, m, class_conditional)

    assert a.dtype == torch.int64 and a.shape == (B,)
    assert counts.dtype == sqdev.dtype == centroids.dtype
    assert counts.shape == (classes * m,) and sqdev.shape == (classes * m, D)
    assert torch.equal(a, ta) and torch.equal(a, ra)
    assert torch.equal(counts, tcounts) and torch.equal(counts.double(), rcounts)
    # Same summation order as torch's index_add_: equal bit for bit; and close to the float64 truth.
    assert torch.equal(sqdev, tsqdev)
    torch.testing.assert_close(sqdev.double(), rsqdev, **tolerance(dtype))
    if class_conditional and B:
        assert torch.equal(a // m, labels)

    dz = ext.scatter_grad(z, a, centroids, coef)
    assert dz.dtype == dtype and dz.shape == z.shape
    assert torch.equal(dz, torch_backend.scatter_grad(z, a, centroids, coef))
    want = (coef.double()[a] * (z.double() - centroids.double()[a])).to(dtype)
    torch.testing.assert_close(
        dz, want, **(tolerance(dtype) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2))
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("class_conditional", [True, False])
def test_parallel_path_matches_torch(ext, class_conditional, dtype):
    """Big enough for the two-pass parallel path (assign by rows, then sum by columns), with 2 threads."""
    B, D, classes, m = 256, 513, 4, 3
    z, labels, centroids, coef = make_inputs(B, D, classes, m, dtype, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = ext.assign_stats(z, labels, centroids, m, class_conditional)
        dz = ext.scatter_grad(z, got[0], centroids, coef)
    finally:
        torch.set_num_threads(threads)
    want = torch_backend.assign_stats(z, labels, centroids, m, class_conditional)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    torch.testing.assert_close(
        got[2].double(), float64_stats(z, labels, centroids, m, class_conditional)[2], **tolerance(dtype)
    )
    assert torch.equal(dz, torch_backend.scatter_grad(z, got[0], centroids, coef))


def test_empty_labels_when_not_class_conditional(ext):
    z, _, centroids, _ = make_inputs(12, 9, 3, 2, torch.float32)
    a, counts, _ = ext.assign_stats(z, torch.empty(0, dtype=torch.int64), centroids, 2, False)
    assert torch.equal(a, torch_backend.assign(z, None, centroids, 2, False))
    assert counts.sum().item() == 12


def test_per_cluster_coefficient(ext):
    z, labels, centroids, coef = make_inputs(40, 21, 3, 2, torch.float32)
    a = torch_backend.assign(z, labels, centroids, 2, True)
    want = ext.scatter_grad(z, a, centroids, coef[:, :1].expand(-1, 21).contiguous())
    assert torch.equal(ext.scatter_grad(z, a, centroids, coef[:, :1].contiguous()), want)
    assert torch.equal(ext.scatter_grad(z, a, centroids, coef[:, 0].contiguous()), want)


def test_ties_go_to_the_lowest_index(ext):
    D, m = 19, 3
    centroids = torch.randn(2 * m, D)
    centroids[1] = centroids[0]  # class 0: clusters 0 and 1 identical
    centroids[5] = centroids[4]  # class 1: clusters 4 and 5 identical
    z = torch.cat([centroids[0:1] + 0.01, centroids[4:5] - 0.01, centroids[0:1]])
    labels = torch.tensor([0, 1, 0])
    a, *_ = ext.assign_stats(z, labels, centroids, m, True)
    assert a.tolist() == [0, 4, 0]
    a_all, *_ = ext.assign_stats(z, labels, centroids, m, False)
    assert a_all.tolist() == [0, 4, 0]
    dup = torch.zeros(4, D)  # all distances equal: the first cluster
    assert ext.assign_stats(torch.randn(5, D), labels[:0], dup, 1, False)[0].tolist() == [0] * 5


def test_nan_row_follows_torch_argmin(ext):
    z, labels, centroids, _ = make_inputs(6, 10, 2, 3, torch.float32)
    z[2, 3] = float("nan")
    centroids[4, 1] = float("nan")  # one NaN centroid: torch's argmin picks the first NaN
    for cc in (True, False):
        a = ext.assign_stats(z, labels, centroids, 3, cc)[0]
        assert torch.equal(a, torch_backend.assign(z, labels, centroids, 3, cc))


def test_non_contiguous_inputs(ext):
    z, labels, centroids, coef = make_inputs(33, 40, 3, 2, torch.float32)
    zt = z.t().contiguous().t()
    got = ext.assign_stats(zt, labels, centroids, 2, True)
    want = ext.assign_stats(z, labels, centroids, 2, True)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(ext.scatter_grad(zt, got[0], centroids, coef), ext.scatter_grad(z, got[0], centroids, coef))


def _tiers(ext):
    best = ext.cpu_tier()
    names = ["base", "avx2", "avx512"]
    return names[: names.index(best) + 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_deterministic_across_runs_threads_and_instruction_sets(ext, dtype):
    """Same bits on every run, with 1 or 2 threads, and on every instruction-set tier this CPU has."""
    z, labels, centroids, coef = make_inputs(700, 300, 10, 3, dtype, seed=3)
    threads, best = torch.get_num_threads(), ext.cpu_tier()
    results = []
    try:
        for tier in _tiers(ext):
            ext.set_cpu_tier(tier)
            for n in (1, 2):
                torch.set_num_threads(n)
                for cc in (True, False):
                    a, counts, sqdev = ext.assign_stats(z, labels, centroids, 3, cc)
                    results.append((cc, a, counts, sqdev, ext.scatter_grad(z, a, centroids, coef)))
    finally:
        torch.set_num_threads(threads)
        ext.set_cpu_tier(best)
    for cc in (True, False):
        runs = [r[1:] for r in results if r[0] == cc]
        assert len(runs) >= 2
        for run in runs[1:]:
            assert all(torch.equal(x, y) for x, y in zip(run, runs[0]))


def test_set_cpu_tier_rejects_unknown(ext):
    with pytest.raises(ValueError, match="tier"):
        ext.set_cpu_tier("sse9")


# --------------------------------------------------------------------------- the variants' math in C++


def _random_stats(K, D, dtype, gen, empty=(1, 4)):
    counts = torch.randint(0, 6, (K,), generator=gen).to(dtype)
    counts[list(empty)] = 0  # empty clusters; with m=2, clusters 4 and 5 of class 2 leave it absent when 5 is too
    sqdev = torch.rand(K, D, generator=gen, dtype=dtype) * counts[:, None] * 0.05
    return counts, sqdev


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("class_conditional", [True, False])
@pytest.mark.parametrize("variant", ["official", "official-trained", "paper"])
@pytest.mark.parametrize(
    "options",
    [
        dict(log_entropy=1, bug=False, mean_dim=True),
        dict(log_entropy=0, bug=True, mean_dim=False),
        dict(log_entropy=1, bug=True, mean_dim=True),
    ],
    ids=str,
)
def test_variant_math_matches_python(ext, variant, class_conditional, dtype, options):
    from cem_fast.variants import LossParams, get_variant, variant_type

    gen = torch.Generator().manual_seed(zlib.crc32(str((variant, class_conditional, str(dtype), options)).encode()))
    C, m, D, N, sigma, thr = 4, 2, 37, 40.0, 0.1, 0.5
    K = C * m
    counts, sqdev = _random_stats(K, D, dtype, gen, empty=(1, 4, 5))
    pi = torch.rand(C, m, generator=gen, dtype=dtype) * 0.3 + 0.01
    variance = torch.rand(*((C, m) if variant == "official-trained" else (C, m, D)), generator=gen, dtype=dtype) * 0.02
    given = dict(var_threshold=thr, log_entropy=options["log_entropy"], replicate_index_bug=options["bug"])
    impl = get_variant(variant, **{k: v for k, v in given.items() if k in variant_type(variant).defaults})
    params = LossParams(
        num_classes=C,
        m=m,
        sigma=sigma,
        class_conditional=class_conditional,
        dataset_size=N,
        reduction="mean_dim" if options["mean_dim"] else "sum",
    )
    got = ext.variant_math(counts, sqdev, pi, variance, *impl.kernel_args(params))
    # The python math in float64 (the C++ math runs in double whatever the dtype).
    c64, s64, p64, v64 = (t.double() for t in (counts, sqdev, pi, variance))
    loss, coef, new_pi, new_var = impl.math(c64, s64, p64, v64, params)
    tol = tolerance(dtype)
    assert got[0].dtype == dtype and got[0].dim() == 0
    torch.testing.assert_close(got[0].double(), loss, **tol)
    assert got[1].shape == coef.shape and got[1].dtype == dtype
    torch.testing.assert_close(got[1].double(), coef, **tol)
    torch.testing.assert_close(got[2].double().reshape(-1), new_pi.reshape(-1), **tol)
    torch.testing.assert_close(got[3].double().reshape(-1), new_var.reshape(-1), **tol)
    assert got[2].shape == pi.shape and got[3].shape == variance.shape


def test_forward_diag_is_assign_stats_then_variant_math(ext):
    z, labels, centroids, _ = make_inputs(33, 20, 3, 2, torch.float32)
    pi = torch.full((3, 2), 0.5)
    var = torch.full((3, 2), 0.01)
    args = (1, 2, True, 0.05, 3, 300.0, -3.0, True, False, True)
    loss, coef, new_pi, new_var, assign = ext.forward_diag(z, labels, centroids, pi, var, *args)
    a, counts, sqdev = ext.assign_stats(z, labels, centroids, 2, True)
    expected = ext.variant_math(counts, sqdev, pi, var, *args)
    assert torch.equal(assign, a)
    for x, y in zip((loss, coef, new_pi, new_var), expected):
        assert torch.equal(x, y)


def _bad_calls():
    z, labels, mu, coef = make_inputs(4, 3, 2, 2, torch.float32)
    a = torch.zeros(4, dtype=torch.int64)
    return [
        ("assign_stats", (z[0], labels, mu, 2, True), ValueError, "z must be 2-D"),
        ("assign_stats", (z.int(), labels, mu, 2, True), TypeError, "z must be float32"),
        ("assign_stats", (z, labels, mu.double(), 2, True), TypeError, "centroids must have the accumulation dtype"),
        ("assign_stats", (z, labels, mu[:, :2], 2, True), ValueError, "centroids must be \\[K, D\\]"),
        ("assign_stats", (z, labels[:3], mu, 2, True), ValueError, "labels must be 1-D of length B = 4"),
        ("assign_stats", (z, labels.int(), mu, 2, True), TypeError, "labels must be int64"),
        ("assign_stats", (z, labels + 5, mu, 2, True), ValueError, "labels must lie in \\[0, 2\\)"),
        ("assign_stats", (z, labels - 1 - labels, mu, 2, True), ValueError, "labels must lie in"),
        ("assign_stats", (z, labels, mu, 0, True), ValueError, "m \\(clusters per class\\) must be >= 1"),
        ("assign_stats", (z, labels, mu[:3], 2, True), ValueError, "must be num_classes \\* m"),
        ("assign_stats", (z, labels, mu[:0], 2, False), ValueError, "at least one row"),
        ("scatter_grad", (z, a + 4, mu, coef), ValueError, "assign must lie in \\[0, 4\\)"),
        ("scatter_grad", (z, a[:2], mu, coef), ValueError, "assign must be 1-D of length B"),
        ("scatter_grad", (z, a, mu, coef[:, :2]), ValueError, "coef must be \\[K, D\\]"),
        ("scatter_grad", (z, a, mu, coef.double()), TypeError, "coef must have the dtype of centroids"),
        ("scatter_grad", (z.double(), a, mu, coef), TypeError, "centroids must have the accumulation dtype float64"),
    ] + _bad_variant_math_calls()


def _bad_variant_math_calls():
    counts, sqdev = torch.ones(4), torch.rand(4, 3)
    pi, var = torch.full((2, 2), 0.5), torch.zeros(2, 2)
    opts = (2, True, 0.1, 2, 100.0, -3.0, True, False, True)
    return [
        ("variant_math", (counts, sqdev, pi, var, 3, *opts), ValueError, "variant must be 0"),
        ("variant_math", (counts[:3], sqdev, pi, var, 1, *opts), ValueError, "counts must be \\[K\\]"),
        ("variant_math", (counts, sqdev, pi, var, 1, 3, *opts[1:]), ValueError, "multiple of m"),
        ("variant_math", (counts.double(), sqdev, pi, var, 1, *opts), TypeError, "one dtype"),
        ("variant_math", (counts.int(), sqdev.int(), pi, var, 1, *opts), TypeError, "sqdev must be float32"),
        ("variant_math", (counts, sqdev, pi[:1], var, 1, *opts), ValueError, "pi must hold K = 4"),
        ("variant_math", (counts, sqdev, pi, var, 2, *opts), ValueError, "variance must hold 12"),
        (
            "variant_math",
            (counts, sqdev, pi, var, 1, *opts[:4], 0.0, *opts[5:]),
            ValueError,
            "dataset_size must be > 0",
        ),
    ]


@pytest.mark.parametrize("fn, args, error, match", _bad_calls(), ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_raises(ext, fn, args, error, match):
    with pytest.raises(error, match=match):
        getattr(ext, fn)(*args)


def test_backend_module_contract():
    assert cpp_backend.is_available("cpu")
    assert not cpp_backend.is_available("cuda")
    assert not cuda_backend.is_available("cpu")
    if not torch.cuda.is_available():
        assert not cuda_backend.is_available("cuda")
    z, labels, centroids, coef = make_inputs(9, 7, 3, 2, torch.float32)
    out = cpp_backend.assign_stats(z, labels, centroids, 2, True)
    assert all(torch.equal(x, y) for x, y in zip(out, torch_backend.assign_stats(z, labels, centroids, 2, True)))
    assert torch.equal(
        cpp_backend.scatter_grad(z, out[0], centroids, coef), torch_backend.scatter_grad(z, out[0], centroids, coef)
    )
    # the incoming gradient and a factor, and a [K, 1] coefficient broadcast by the backend
    g = torch.tensor(0.75)
    for c in (coef, coef[:, :1]):
        want = torch_backend.scatter_grad(z, out[0], centroids, c * (g * 3.0))
        assert torch.equal(torch_backend.scatter_grad(z, out[0], centroids, c, g, 3.0), want)
        assert torch.equal(cpp_backend.scatter_grad(z, out[0], centroids, c, grad_out=g, factor=3.0), want)


@pytest.mark.parametrize("name", ["torch", "cpp", "cuda", "triton"])
def test_every_backend_has_the_whole_contract(name):
    """Same functions with the same parameters in every backend (cem_fast/backends/__init__.py)."""
    import inspect

    from cem_fast import backends

    module = backends.get(name)
    want = {
        "is_available": ["device_type"],
        "assign_stats": ["z", "labels", "centroids", "m", "class_conditional"],
        "scatter_grad": ["z", "assign", "centroids", "coef", "grad_out", "factor"],
        "cluster_second_moments": ["z", "assign", "centroids"],
        "matrix_grad": ["z", "assign", "centroids", "coef", "scale"],
    }
    for fn, params in want.items():
        got = list(inspect.signature(getattr(module, fn)).parameters)
        assert got[: len(params)] == params, (name, fn, got)
    fused = {
        "forward_diag": ["z", "labels", "centroids", "pi", "variance", "args", "update_state"],
        "variant_math": ["counts", "sqdev", "pi", "variance", "args"],
    }
    for fn, params in fused.items():  # optional; when present, exactly these (args: a backends.KernelArgs)
        if hasattr(module, fn):
            assert isinstance(module.FUSED_VARIANT_CODES, frozenset)
            assert list(inspect.signature(getattr(module, fn)).parameters) == params, (name, fn)


# --------------------------------------------------------------------------- the loader


def test_csrc_and_cache_locations(tmp_path, monkeypatch):
    assert (extension.csrc_dir() / "cem_cpu.cpp").is_file()
    monkeypatch.setenv("CEM_FAST_CACHE", str(tmp_path))
    path = extension.cache_dir("x")
    assert path.is_dir() and path.parent.parent == tmp_path and path.name == "x"


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "lib64" / "libcudart.so").write_text("")
    return root


def test_find_cuda_home_respects_a_valid_cuda_home(tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "toolkit")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert extension.find_cuda_home() == str(toolkit.resolve())


def test_find_cuda_home_skips_an_invalid_cuda_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no nvcc, no libcudart: not a toolkit
    monkeypatch.delenv("CUDA_PATH", raising=False)
    try:
        home = extension.find_cuda_home()
    except RuntimeError as exc:  # a machine without any toolkit
        assert "no CUDA toolkit found" in str(exc)
    else:
        assert home != str(tmp_path)
        assert (Path(home) / "bin" / "nvcc").exists()


# --------------------------------------------------------------------------- python -m cem_fast.build


def _run_build(*flags):
    proc = subprocess.run(
        [sys.executable, "-m", "cem_fast.build", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_build_check_cpu():
    out = _run_build("--check")
    assert "C++ CPU check passed" in out


def test_build_check_cuda():
    """Compiles csrc/cem_cuda.cu with nvcc and imports it (runs it only where a GPU is visible)."""
    out = _run_build("--check", "--cuda")
    assert "CUDA extension:" in out
    if torch.cuda.is_available():
        assert "CUDA check passed" in out
