"""Loss-level checks and timings of CEMLoss per backend: the second half of bench/gpu_check.sh.

1. every variant through every backend of the device against the float64 reference (fresh random inputs,
   fp32 and bf16, an empty cluster and an absent class included), and the paper's full covariance;
   on CUDA a GPU backend that failed to build counts as a failure (it would otherwise fall back silently);
2. no host synchronisation inside forward + backward (``torch.cuda.set_sync_debug_mode("error")``);
3. a training step with CEMLoss captured in a CUDA graph and replayed, and a captured forward+backward
   replayed on new inputs against an eager run on the same inputs;
4. timings (medians): fused forward+backward per backend at B in {128, 8192}, D = 2048, against the
   ``torch`` backend and the bytes that must move; full covariance at D = 512 with 30 clusters; a
   refit of 50,000 x 2048 features.

Runs on the CPU too (``--device cpu``: sections 2-3 are skipped there), which is how CI keeps it working.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from cem_fast import CEMLoss, backends
from cem_fast.reference import reference_loss

VARIANTS = ("paper", "official", "official-trained")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def errors(loss, grad, ref, ref_grad):
    """Relative error of a loss and of its gradient against the float64 reference."""
    ref = float(ref.detach())
    return abs(float(loss.detach()) - ref) / abs(ref), rel(grad, ref_grad)


def device_backends(device):
    names = []
    for name in ("torch", "cpp", "cuda", "triton"):
        if backends.resolve(name, device) == name:
            names.append(name)
    return names


def make(variant, C, m, D, device, backend, gen, validate=True):
    cem = CEMLoss(C, m, variant=variant, dataset_size=50_000, backend=backend, validate=validate).to(device)
    x = torch.rand(max(20 * C * m, 200), D, generator=gen)
    y = torch.arange(x.shape[0]) % C
    cem.refit(x.to(device), y.to(device))
    return cem


def check_parity(device, names, gen) -> int:
    failures = 0
    C, m, D, B = 7, 3, 517, 96
    for variant in VARIANTS:
        for backend in names:
            for dtype in (torch.float32, torch.bfloat16):
                cem = make(variant, C, m, D, device, backend, gen)
                far = cem.centroids.clone()
                far[:, -1] += 50.0                      # an empty cluster in every class
                cem.set_clusters(far, cem.pi, cem.variance)
                state = {k: v.clone() for k, v in (("pi", cem.pi), ("var", cem.variance))}
                z = torch.rand(B, D, generator=gen).to(dtype)
                y = torch.randint(0, C - 1, (B,), generator=gen)            # class C-1 absent
                zz = z.to(device).requires_grad_(True)
                loss = cem(zz, y.to(device))
                loss.backward()
                z64 = z.double().requires_grad_(True)
                ref, _, _ = reference_loss(z64, y, far.double().cpu(), variant=variant, sigma=cem.sigma,
                                           pi=state["pi"].double().cpu(), variance=state["var"].double().cpu(),
                                           dataset_size=50_000, var_threshold=cem.var_threshold)
                (g,) = torch.autograd.grad(ref, z64)
                el, eg = errors(loss, zz.grad, ref, g)
                ok = el <= TOL[dtype] and eg <= TOL[dtype]
                failures += not ok
                print(f"parity {variant:16s} {backend:7s} {str(dtype):15s} loss rel err {el:.2e}  grad rel err {eg:.2e}"
                      f"  {'ok' if ok else 'FAIL'}")
    return failures + check_full_parity(device, names, gen)


def check_full_parity(device, names, gen) -> int:
    """The paper variant with full covariance (fp32) against the float64 reference, per backend.

    The bar is the error of the same computation in fp32 PyTorch (the ``torch`` backend, measured first):
    the inverse of a covariance with condition number ~100 costs fp32 about 1e-5 on its own.
    """
    failures = 0
    bar = None
    C, m, D, B = 5, 2, 70, 120
    for backend in names:
        cem = CEMLoss(C, m, covariance="full", dataset_size=50_000, backend=backend).to(device)
        x = torch.rand(400, D, generator=gen)
        cem.refit(x.to(device), (torch.arange(400) % C).to(device))
        pi0, var0 = cem.pi.double().cpu(), cem.variance.double().cpu()
        z = torch.rand(B, D, generator=gen)
        y = torch.randint(0, C, (B,), generator=gen)
        zz = z.to(device).requires_grad_(True)
        loss = cem(zz, y.to(device))
        loss.backward()
        z64 = z.double().requires_grad_(True)
        ref, _, _ = reference_loss(z64, y, cem.centroids.double().cpu(), variant="paper", sigma=cem.sigma, pi=pi0,
                                   variance=var0, dataset_size=50_000, covariance="full")
        (g,) = torch.autograd.grad(ref, z64)
        el, eg = errors(loss, zz.grad, ref, g)
        if bar is None:                       # the torch backend: plain fp32 PyTorch
            bar = max(TOL[torch.float32], 2 * el, 2 * eg)
            ok = max(el, eg) <= 1e-4
        else:
            ok = el <= bar and eg <= bar
        failures += not ok
        print(f"parity paper full cov   {backend:7s} torch.float32   loss rel err {el:.2e}  grad rel err {eg:.2e}"
              f"  (bar {bar:.1e}) {'ok' if ok else 'FAIL'}")
    return failures


def check_no_sync_and_graph(device, names, gen) -> int:
    failures = 0
    for backend in names:
        cem = make("paper", 10, 3, 2048, device, backend, gen, validate=False)
        z = torch.rand(128, 2048, device=device, requires_grad=True)
        y = torch.randint(0, 10, (128,), device=device)
        cem(z, y).backward()                                         # warm-up (builds, autotune, caches)
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            cem(z, y).backward()
            print(f"no host sync in forward+backward: {backend} ok")
        except RuntimeError as exc:
            failures += 1
            print(f"no host sync in forward+backward: {backend} FAIL ({exc})")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        enc = torch.nn.Sequential(torch.nn.Linear(64, 2048), torch.nn.Sigmoid()).to(device)
        head = torch.nn.Linear(2048, 10).to(device)
        opt = torch.optim.SGD(list(enc.parameters()) + list(head.parameters()), lr=0.01, capturable=True) \
            if "capturable" in torch.optim.SGD.__init__.__code__.co_varnames else \
            torch.optim.SGD(list(enc.parameters()) + list(head.parameters()), lr=0.01)
        x = torch.randn(128, 64, device=device)

        def step():
            opt.zero_grad(set_to_none=False)
            f = enc(x)
            loss = torch.nn.functional.cross_entropy(head(f + 0.025 * torch.randn_like(f)), y) + 16 * cem(f, y)
            loss.backward()
            opt.step()
            return loss
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_loss = step()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            ok = bool(torch.isfinite(static_loss))
            failures += not ok
            print(f"CUDA graph capture of a training step with CEMLoss: {backend} {'ok' if ok else 'FAIL (non-finite)'}")
        except Exception as exc:  # report and go on: the other checks still matter
            failures += 1
            print(f"CUDA graph capture of a training step with CEMLoss: {backend} FAIL ({type(exc).__name__}: {exc})")
        failures += check_graph_replay(cem, y, device, backend, gen)
    return failures


def check_graph_replay(cem, y, device, backend, gen) -> int:
    """A captured forward+backward, replayed on new inputs, gives what an eager run on them gives."""
    cem.eval()                                   # the state stays fixed, so eager and replay see the same clusters
    try:
        z = torch.rand(128, 2048, device=device, requires_grad=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                cem(z, y).backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = cem(z, y)
            out.backward()
        with torch.no_grad():
            z.copy_(torch.rand(z.shape, generator=gen).to(device))
            z.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ze = z.detach().clone().requires_grad_(True)
        want = cem(ze, y)
        want.backward()
        el, eg = abs(float(out) - float(want)) / max(abs(float(want)), 1e-30), rel(z.grad, ze.grad)
        ok = el <= 1e-6 and eg <= 1e-6
        print(f"CUDA graph replay on new inputs = eager: {backend} loss rel err {el:.1e} grad rel err {eg:.1e} "
              f"{'ok' if ok else 'FAIL'}")
        return int(not ok)
    except Exception as exc:
        print(f"CUDA graph replay on new inputs = eager: {backend} FAIL ({type(exc).__name__}: {exc})")
        return 1
    finally:
        cem.train()


def timeit(fn, device, reps=50):
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=max(reps, 25), return_mode="median") * 1e-3
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def timings(device, names, gen, quick) -> None:
    copy_bw = None
    if device.type == "cuda":
        a = torch.empty(1 << 28, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        t = timeit(lambda: b.copy_(a), device)
        copy_bw = 2 * a.numel() / t
        print(f"measured device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    print("\n| variant | B | D | classes | m | backend | fwd+bwd (us) | vs torch | bytes-bound time (us) |")
    print("|---|---|---|---|---|---|---|---|---|")
    shapes = [(128, 2048, 10, 3)] if quick else [(128, 2048, 10, 3), (1024, 2048, 10, 3), (8192, 2048, 10, 3),
                                                 (8192, 512, 100, 10)]
    for variant in ("paper", "official-trained"):
        for B, D, C, m in shapes:
            base = None
            for backend in names:
                cem = make(variant, C, m, D, device, backend, gen, validate=False)
                z = torch.rand(B, D, device=device, requires_grad=True)
                y = torch.randint(0, C, (B,), device=device)
                t = timeit(lambda: cem(z, y).backward(), device, reps=10 if quick else 50)
                base = t if backend == "torch" else base
                # must move: z read twice (forward, backward), dz written once, centroids read twice
                need = (3 * B * D + 2 * C * m * D) * 4
                bound = f"{need / copy_bw * 1e6:.1f}" if copy_bw else "-"
                ratio = f"{base / t:.2f}x" if base else "-"
                print(f"| {variant} | {B} | {D} | {C} | {m} | {backend} | {t * 1e6:.0f} | {ratio} | {bound} |")
    D = 128 if quick else 512
    feats = torch.rand(3000, D, generator=gen).to(device)
    z = torch.rand(128, D, device=device, requires_grad=True)
    y = torch.randint(0, 10, (128,), device=device)
    print()
    for backend in names:
        cem = CEMLoss(10, 3, variant="paper", covariance="full", dataset_size=50_000, backend=backend).to(device)
        cem.refit(feats, (torch.arange(3000) % 10).to(device))
        t = timeit(lambda: cem(z, y).backward(), device, reps=5 if quick else 20)
        print(f"full covariance, D={D}, 30 clusters, B=128, {backend}: fwd+bwd {t * 1e3:.2f} ms")
    N, D = (5000, 256) if quick else (50_000, 2048)
    x = torch.rand(N, D, generator=gen).to(device)
    yy = (torch.arange(N) % 10).to(device)
    for label, fresh in (("k-means++ start", True), ("warm start", False)):
        cem = CEMLoss(10, 3).to(device)
        if not fresh:
            cem.refit(x, yy)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        cem.refit(x, yy)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"refit of {N} x {D} features ({label}): {time.perf_counter() - t0:.3f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (CI smoke)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(1234)
    names = device_backends(device)
    print(f"device {device}, backends {names}, torch {torch.__version__}")
    failures = 0
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            if name not in names:
                failures += 1
                print(f"backend {name}: unavailable on {device} FAIL (see the warning above)")
    failures += check_parity(device, names, gen)
    if device.type == "cuda":
        failures += check_no_sync_and_graph(device, names, gen)
    timings(device, names, gen, args.quick)
    print(f"\n{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
