"""The GPU first-light checks of one backend, run by ``bench/gpu_check.sh`` (one process per group of checks).

    python bench/gpu_checks.py --backend triton [--device cuda] [--tiny] [--checks kernels,loss,...]

Checks (``--checks``, in this order by default):

* ``kernels``: ``assign_stats`` and ``scatter_grad`` against float64 at B in {128, 8192}, D = 2048, fp32 and
  bf16 (``bench.agreement``: statistics from the backend's own assignment, differences only at near-ties);
* ``loss``: ``CEMLoss`` of every variant (loss, gradient and the paper variant's state update) against the
  same loss in float64 (the ``torch`` backend on float64 copies of the inputs and state); bf16 is held to
  ``BF16_MULTIPLE`` x the error of the ``torch`` backend on the same bf16 input (same-precision PyTorch);
* ``nosync``: no host synchronisation in forward, backward and state update, per variant and covariance;
* ``graph-step``: a training step with ``CEMLoss`` captured in a CUDA graph and replayed;
  ``graph-<variant>-<covariance>``: a captured forward+backward replayed on new inputs equals eager, and
  the replay's time;
* ``timings``: forward+backward eager (back-to-back, warm L2) and L2-flushed (``do_bench``), against the
  ``torch`` backend and the bytes that must move (``bench.harness.loss_bytes``) at the measured copy bandwidth;
* ``fullcov``: the paper variant with full covariance at D = 512, 30 clusters: parity and time;
* ``refit``: one refit of 50,000 x 2048: time (k-means++ and warm), host syncs per Lloyd iteration,
  and two fresh refits bitwise equal.

Each check prints ``CHECK <backend> <name> PASS|FAIL|SKIPPED <detail>`` and timings as
``TIME <backend> <name> <value> <unit> [<goal>]``. A check that raises is a FAIL; since a failed CUDA graph
capture or a device fault can poison the process (pytorch#171263), the script then stops and prints
``REMAINING <checks>`` (exit status 3) so that ``bench/gpu_check_runner.py`` reruns those in a fresh
process. ``--tiny`` shrinks every shape for the CPU dry run (the Triton interpreter), where CUDA-only
checks print SKIPPED.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.agreement import check_assign_stats  # noqa: E402
from bench.harness import Clock, loss_bytes, machine, state_bytes, tight_loop  # noqa: E402
from bench.sync_counter import host_syncs  # noqa: E402
from cem_fast import CEMLoss, backends  # noqa: E402
from cem_fast.backends import torch_backend  # noqa: E402

VARIANTS = (("paper", "diag"), ("official", "diag"), ("official-trained", "diag"), ("paper", "full"))
DIAG_VARIANTS = VARIANTS[:3]
FP32_TOL = 1e-5  # relative error of loss and gradient against float64
# bf16 bar: this multiple of the torch backend's error on the same bf16 input. That error is one rounding of
# dz to bf16 (~2^-9 relative); an implementation that truncates instead (the Triton interpreter's conversion
# measured 2.0x torch's error on the CPU) or rounds twice reaches 2x; 3x leaves room for accumulation order
# and still fails a gradient computed in bf16 (>= 8x).
BF16_MULTIPLE = 3.0
GRAPH_CHECKS = ["graph-step"] + [f"graph-{v}-{c}" for v, c in VARIANTS]
ALL_CHECKS = ["kernels", "loss", "nosync", *GRAPH_CHECKS, "timings", "fullcov", "refit"]
CUDA_ONLY = set(GRAPH_CHECKS)
GOALS = {"eager128": 50e-6, "graph128": 20e-6, "vs_torch": 5.0, "bytes8192": 2.0, "fullcov": 2e-3, "refit": 1.0}


class Shapes:
    """The lease's shapes, or tiny ones for the CPU dry run."""

    def __init__(self, tiny: bool):
        self.batches = (16, 64) if tiny else (128, 8192)
        self.D = 48 if tiny else 2048
        self.C, self.m = 10, 3
        self.full_D = 24 if tiny else 512
        self.refit = (1500, 32) if tiny else (50_000, 2048)
        self.fit_rows = 200 if tiny else 3000


FAILURES = []


def report(backend, name, status, detail=""):
    if status == "FAIL":
        FAILURES.append(name)
    print(f"CHECK {backend} {name} {status} {detail}".rstrip(), flush=True)


def report_cases(backend, name, lines, problems, what):
    """Print each case's line, then one CHECK line naming the failing cases."""
    for line in lines:
        print(f"  {name} {backend} {line}", flush=True)
    failing = f"; failing: {', '.join(problems)}" if problems else ""
    report(backend, name, "FAIL" if problems else "PASS", what + failing)


def ratio(backend, name, value, goal=None, at_least=True):
    g = ""
    if goal is not None:
        met = value >= goal if at_least else value <= goal
        g = f" goal{'>=' if at_least else '<='}{goal:g}x {'met' if met else 'NOT-met'}"
    print(f"RATIO {backend} {name} {value:.2f}x{g}", flush=True)


def timing(backend, name, seconds, goal=None, unit="us"):
    scale = {"us": 1e6, "ms": 1e3, "s": 1.0}[unit]
    g = ""
    if goal is not None:
        g = f" goal<{goal * scale:g}{unit} {'met' if seconds <= goal else 'NOT-met'}"
    print(f"TIME {backend} {name} {seconds * scale:.1f} {unit}{g}", flush=True)


def rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fitted(variant, covariance, backend, sh: Shapes, device, gen, D=None, validate=True) -> CEMLoss:
    """A CEMLoss refit on random features (20 rows per cluster at least), with one empty cluster."""
    D = D or sh.D
    cem = CEMLoss(
        sh.C, sh.m, variant=variant, covariance=covariance, dataset_size=50_000, backend=backend, validate=validate
    ).to(device)
    x = torch.rand(sh.fit_rows, D, generator=gen)
    cem.refit(x.to(device), (torch.arange(sh.fit_rows) % sh.C).to(device))
    return cem


def on_backend(cem: CEMLoss, name: str) -> CEMLoss:
    """A copy of ``cem`` (state included) that runs on backend ``name``."""
    other = copy.deepcopy(cem)
    other.backend = name
    return other


def twin64(cem: CEMLoss) -> CEMLoss:
    """The same loss and state in float64 on the torch backend: the reference."""
    ref = on_backend(cem, "torch")
    return ref.set_clusters(cem.centroids.double(), cem.pi.double(), cem.variance.double())


def loss_errors(cem, ref, z, y):
    """Relative errors (loss, gradient, state after the update) of ``cem`` against ``ref`` on ``z``."""
    a, b = copy.deepcopy(cem), copy.deepcopy(ref)
    za = z.detach().clone().requires_grad_(True)
    zb = z.detach().double().requires_grad_(True)
    la, lb = a(za, y), b(zb, y)
    la.backward()
    lb.backward()
    el = abs(float(la.detach()) - float(lb.detach())) / max(abs(float(lb.detach())), 1e-30)
    es = rel(a.variance, b.variance) if a.variant == "paper" else 0.0
    return el, rel(za.grad, zb.grad), es


# --------------------------------------------------------------------------- checks


def check_kernels(backend, sh, device, gen):
    mod = backends.get(backend)
    worst, problems = [], []
    K = sh.C * sh.m
    for B in sh.batches:
        for dtype in (torch.float32, torch.bfloat16):
            z = torch.randn(B, sh.D, generator=gen).to(dtype).to(device)
            y = torch.randint(0, sh.C, (B,), generator=gen).to(device)
            cent = torch.randn(K, sh.D, generator=gen).to(device)
            coef = torch.randn(K, sh.D, generator=gen).to(device)
            out = mod.assign_stats(z, y, cent, sh.m, True)
            ref_a = torch_backend.assign_stats(z, y, cent, sh.m, True)[0]
            ag = check_assign_stats(out, z, y, cent, sh.m, True, other_assign=ref_a)
            dz = mod.scatter_grad(z, out[0], cent, coef)
            want = coef.double()[out[0]] * (z.double() - cent.double()[out[0]])
            eg = rel(dz, want)
            gtol = FP32_TOL if dtype == torch.float32 else BF16_MULTIPLE * rel(want.to(dtype), want)  # one rounding
            tag = f"B={B} {str(dtype)[6:]}"
            worst.append(f"{tag}: {ag.describe()}, scatter_grad rel err {eg:.1e}")
            if not ag.ok(FP32_TOL) or eg > max(gtol, FP32_TOL):
                problems.append(tag)
    report_cases(
        backend,
        "kernels",
        worst,
        problems,
        f"assign_stats+scatter_grad vs float64, B in {sh.batches}, D={sh.D}, fp32+bf16",
    )


def check_loss(backend, sh, device, gen):
    problems, lines = [], []
    for variant, cov in DIAG_VARIANTS:
        cem = fitted(variant, cov, backend, sh, device, gen)
        base, ref = on_backend(cem, "torch"), twin64(cem)
        for B in sh.batches:
            y = torch.randint(0, sh.C - 1, (B,), generator=gen).to(device)  # the last class absent
            z32 = torch.rand(B, sh.D, generator=gen).to(device)
            for dtype in (torch.float32, torch.bfloat16):
                z = z32.to(dtype)
                errs = loss_errors(cem, ref, z, y)
                if dtype == torch.float32:
                    bar = FP32_TOL
                else:  # same-precision PyTorch: the torch backend on the same bf16 input
                    bar = max(FP32_TOL, BF16_MULTIPLE * max(loss_errors(base, ref, z, y)))
                ok = max(errs) <= bar
                tag = f"{variant} B={B} {str(dtype)[6:]}"
                lines.append(
                    f"{tag}: loss {errs[0]:.1e} grad {errs[1]:.1e} state {errs[2]:.1e} (bar {bar:.1e})"
                    f"{'' if ok else ' FAIL'}"
                )
                if not ok:
                    problems.append(tag)
    report_cases(
        backend,
        "loss",
        lines,
        problems,
        f"{len(lines)} cases vs float64 (fp32 bar {FP32_TOL:g}, bf16 bar {BF16_MULTIPLE:g}x torch's bf16 error)",
    )


def first_cem_frame(exc) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "cem_fast" in f.filename]
    f = frames[-1] if frames else traceback.extract_tb(exc.__traceback__)[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} {f.line}"


def check_nosync(backend, sh, device, gen):
    passed, failed = [], []
    B = sh.batches[0]
    for variant, cov in VARIANTS:
        D = sh.D if cov == "diag" else sh.full_D
        cem = fitted(variant, cov, backend, sh, device, gen, D=D, validate=False)
        z = torch.rand(B, D, device=device, requires_grad=True)
        y = torch.randint(0, sh.C, (B,), device=device)
        cem(z, y).backward()  # compile, build, autotune outside the count
        name = f"{variant}/{cov}"
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                cem(z, y).backward()  # train mode: the state update is inside
                passed.append(name)
            except RuntimeError as exc:
                failed.append(f"{name} ({first_cem_frame(exc)})")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            with host_syncs(device) as seen:
                cem(z, y).backward()
            (failed.append(f"{name} ({', '.join(sorted(set(seen)))})") if seen else passed.append(name))
    how = "cuda sync debug mode 'error'" if device.type == "cuda" else "ops that would sync on a GPU, counted on CPU"
    report(
        backend,
        "nosync",
        "FAIL" if failed else "PASS",
        f"forward+backward+state update at B={B} ({how}); pass: {', '.join(passed) or '-'}"
        + (f"; FAIL: {'; '.join(failed)}" if failed else ""),
    )


def training_step_graph(backend, sh, device, gen):
    B, D = sh.batches[0], sh.D
    cem = fitted("paper", "diag", backend, sh, device, gen, validate=False)
    enc = torch.nn.Sequential(torch.nn.Linear(64, D), torch.nn.Sigmoid()).to(device)
    head = torch.nn.Linear(D, sh.C).to(device)
    opt = torch.optim.SGD(list(enc.parameters()) + list(head.parameters()), lr=0.01)
    x = torch.randn(B, 64, device=device)
    y = torch.randint(0, sh.C, (B,), device=device)

    def step():
        opt.zero_grad(set_to_none=False)
        f = enc(x)
        loss = torch.nn.functional.cross_entropy(head(f + 0.025 * torch.randn_like(f)), y) + 16 * cem(f, y)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    before = cem.pi.clone()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    ok = bool(torch.isfinite(static_loss)) and not torch.equal(before, cem.pi)
    report(
        backend,
        "graph-step",
        "PASS" if ok else "FAIL",
        f"SGD step with CEMLoss (paper, B={B}, D={D}) captured, replayed 3x: loss {float(static_loss):.4g}, "
        f"state {'updated' if not torch.equal(before, cem.pi) else 'NOT updated'} by the replays",
    )


def forward_backward_graph(backend, sh, device, gen, variant, cov):
    name = f"graph-{variant}-{cov}"
    D = sh.D if cov == "diag" else sh.full_D
    cem = fitted(variant, cov, backend, sh, device, gen, D=D, validate=False).eval()  # fixed state: replay = eager
    details, ok = [], True
    for B in sh.batches if (variant, cov) == ("paper", "diag") else sh.batches[:1]:
        z = torch.rand(B, D, device=device, requires_grad=True)
        y = torch.randint(0, sh.C, (B,), device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                z.grad = None
                cem(z, y).backward()
        torch.cuda.current_stream().wait_stream(side)
        z.grad = None  # allocated inside the graph's pool: each replay overwrites it
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = cem(z, y)
            out.backward()
        with torch.no_grad():
            z.copy_(torch.rand(z.shape, generator=gen).to(device))
        graph.replay()
        torch.cuda.synchronize()
        ze = z.detach().clone().requires_grad_(True)
        want = cem(ze, y)
        want.backward()
        el, eg = abs(float(out) - float(want)) / max(abs(float(want)), 1e-30), rel(z.grad, ze.grad)
        ok &= el <= 1e-6 and eg <= 1e-6
        t = tight_loop(graph.replay, 1e-4, repeats=5)
        details.append(f"B={B}: loss err {el:.0e} grad err {eg:.0e}")
        goal = GOALS["graph128"] if (B == 128 and cov == "diag" and variant == "paper") else None
        timing(backend, f"{name}-replay-B{B}-D{D}", t, goal)
    report(
        backend,
        name,
        "PASS" if ok else "FAIL",
        "captured fwd+bwd replayed on new inputs vs eager; " + "; ".join(details),
    )


def check_timings(backend, sh, device, gen):
    cuda = device.type == "cuda"
    clock = Clock(device, threads=torch.get_num_threads(), min_run_time=0.02 if not cuda else 0.05, rounds=1)
    copy_bw = None
    if cuda:
        a = torch.empty(1 << 28, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        copy_bw = 2 * a.numel() / clock.cuda(lambda: b.copy_(a), 1e-4).median
        print(f"  measured device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write, do_bench median)")
    for variant in ("paper", "official-trained"):
        for B in sh.batches:
            t = {}
            for name in dict.fromkeys(("torch", backend)):
                cem = fitted(variant, "diag", name, sh, device, gen, validate=False)
                z = torch.rand(B, sh.D, device=device, requires_grad=True)
                y = torch.randint(0, sh.C, (B,), device=device)
                t[name] = clock.measure({(name,): lambda: cem(z, y).backward()})[(name,)]
            mine, base = t[backend], t["torch"]
            eager = mine.noflush if cuda else mine.median
            tag = f"fwdbwd-{variant}-B{B}-D{sh.D}"
            goals = cuda and variant == "paper"  # the lease's goals: CUDA, B 128 and 8192
            timing(backend, f"{tag}-eager", eager, GOALS["eager128"] if goals and B == 128 else None)
            if cuda:
                timing(backend, f"{tag}-l2flushed", mine.median)
            speed = (base.noflush if cuda else base.median) / eager
            if backend != "torch":
                ratio(backend, f"{tag}-torch-over-this", speed, GOALS["vs_torch"] if goals and B == 128 else None)
            if copy_bw:
                need = loss_bytes(B, sh.D, sh.C * sh.m, 4, state_bytes(variant, sh.C * sh.m, sh.D))["fwdbwd"]
                print(f"  timings {backend} {tag}: bytes-bound {need / copy_bw * 1e6:.1f} us", flush=True)
                ratio(
                    backend,
                    f"{tag}-l2flushed-over-bytes-bound",
                    mine.median * copy_bw / need,
                    GOALS["bytes8192"] if goals and B == 8192 else None,
                    at_least=False,
                )
    report(backend, "timings", "PASS", "measured (goals in the TIME lines)")


def check_fullcov(backend, sh, device, gen):
    cem = fitted("paper", "full", backend, sh, device, gen, D=sh.full_D)
    ref = twin64(cem)
    B = sh.batches[0]
    z = torch.rand(B, sh.full_D, generator=gen).to(device)
    y = torch.randint(0, sh.C, (B,), generator=gen).to(device)
    errs = loss_errors(cem, ref, z, y)
    base = on_backend(cem, "torch")
    bar = max(FP32_TOL, 2 * max(loss_errors(base, ref, z, y)))  # fp32 PyTorch's own error on the inverse
    ok = max(errs) <= bar
    zz = z.clone().requires_grad_(True)
    clock = Clock(device, threads=torch.get_num_threads(), min_run_time=0.02, rounds=1, slow_runs=3)
    t = clock.measure({("f",): lambda: cem(zz, y).backward()})[("f",)]
    timing(
        backend,
        f"fullcov-D{sh.full_D}-K{sh.C * sh.m}-B{B}-fwdbwd",
        t.noflush or t.median,
        GOALS["fullcov"] if sh.full_D == 512 else None,
        unit="ms",
    )
    report(
        backend,
        "fullcov",
        "PASS" if ok else "FAIL",
        f"paper full covariance D={sh.full_D}, {sh.C * sh.m} clusters: loss {errs[0]:.1e} grad {errs[1]:.1e} "
        f"state {errs[2]:.1e} (bar {bar:.1e} = 2x the torch backend's fp32 error)",
    )


def check_refit(backend, sh, device, gen):
    N, D = sh.refit
    modes = torch.rand(sh.C, sh.m, D, generator=gen)
    y = torch.arange(N) % sh.C
    x = (modes[y, torch.randint(0, sh.m, (N,), generator=gen)] + 0.3 * torch.rand(N, D, generator=gen)).to(device)
    y = y.to(device)
    fits = [CEMLoss(sh.C, sh.m, dataset_size=N).to(device) for _ in range(2)]
    runs = [("k-means++", fits[0], x), ("k-means++-again", fits[1], x), ("warm", fits[0], x + 0.01)]
    for label, cem, feats in runs:
        with host_syncs(device) as seen:
            start = time.perf_counter()
            cem.refit(feats, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter() - start
        timing(backend, f"refit-{N}x{D}-{label}", t, GOALS["refit"] if N == 50_000 else None, unit="s")
        print(
            f"  refit {label}: {cem.last_refit_iterations} Lloyd iterations, {len(seen)} host syncs in the "
            f"whole refit (inside the Lloyd loop at most one per iteration, tests/test_kmeans_sync.py)",
            flush=True,
        )
        if label == "k-means++-again":
            same = all(torch.equal(getattr(fits[0], k), getattr(fits[1], k)) for k in ("centroids", "pi", "variance"))
    report(
        backend,
        "refit",
        "PASS" if same else "FAIL",
        f"{N}x{D}, {sh.C}x{sh.m} clusters: two fresh refits {'bitwise equal' if same else 'DIFFER'}",
    )


def run_check(name, backend, sh, device, gen):
    if name.startswith("graph-") and name != "graph-step":
        variant, cov = name[len("graph-") :].rsplit("-", 1)
        return forward_backward_graph(backend, sh, device, gen, variant, cov)
    fn = {
        "kernels": check_kernels,
        "loss": check_loss,
        "nosync": check_nosync,
        "graph-step": training_step_graph,
        "timings": check_timings,
        "fullcov": check_fullcov,
        "refit": check_refit,
    }[name]
    return fn(backend, sh, device, gen)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=backends.BACKENDS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run)")
    p.add_argument("--checks", default=",".join(ALL_CHECKS), help=f"comma-separated, from {ALL_CHECKS}")
    args = p.parse_args(argv)
    checks = [c for c in args.checks.split(",") if c]
    unknown = [c for c in checks if c not in ALL_CHECKS]
    if unknown:
        p.error(f"--checks: unknown {unknown}; choose from {ALL_CHECKS}")
    device = torch.device(args.device)
    sh = Shapes(args.tiny)
    print(f"# gpu_checks {args.backend} on {device}: {machine(device)}", flush=True)
    resolved = backends.resolve(args.backend, device)
    if resolved != args.backend:
        for name in checks:
            report(args.backend, name, "FAIL", f"backend unavailable on {device} (resolves to {resolved})")
        return 1
    failed = False
    for i, name in enumerate(checks):
        if name in CUDA_ONLY and device.type != "cuda":
            report(args.backend, name, "SKIPPED", "CUDA only")
            continue
        gen = torch.Generator().manual_seed(1234 + i)
        start = time.perf_counter()
        try:
            run_check(name, args.backend, sh, device, gen)
        except Exception as exc:  # report, then let a fresh process run the rest (a capture may have poisoned this one)
            report(
                args.backend,
                name,
                "FAIL",
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]} at {first_cem_frame(exc)}",
            )
            traceback.print_exc()
            rest = checks[i + 1 :]
            if rest and device.type == "cuda":
                print(f"REMAINING {','.join(rest)}", flush=True)
                return 3
            failed = True
        print(f"  ({name}: {time.perf_counter() - start:.1f} s)", flush=True)
    return 1 if failed or FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
