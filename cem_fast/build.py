"""Build (and check) the compiled backends: ``python -m cem_fast.build --check [--cuda] [--cpu]``.

It compiles the sources in ``csrc/`` (never an ahead-of-time build installed by setup.py; the result is
cached on disk). Without ``--cuda`` it builds the C++/OpenMP CPU extension; ``--cuda`` builds the CUDA
extension instead (add ``--cpu`` for both). ``--check`` then compares each against the ``torch`` backend on small random
inputs (the CUDA one only where a GPU is visible; without one it is built and imported, not run).
Prints where each extension lives; exits non-zero on any error, with the compiler's output.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

from .backends import torch_backend
from .backends.extension import build_cpp_extension, build_cuda_extension, csrc_dir, find_cuda_home

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_against_torch(ext, device: str) -> list[str]:
    """Problems found comparing ``ext`` with the torch backend (empty when all agree)."""
    problems = []
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for class_conditional in (True, False):
            B, D, classes, m = 67, 37, 4, 3
            acc = torch_backend.accumulation_dtype(dtype)
            z = torch.randn(B, D, generator=gen).to(dtype).to(device)
            labels = torch.randint(0, classes, (B,), generator=gen).to(device)
            centroids = torch.randn(classes * m, D, generator=gen, dtype=acc).to(device)
            coef = torch.randn(classes * m, D, generator=gen, dtype=acc).to(device)
            want = torch_backend.assign_stats(z, labels, centroids, m, class_conditional)
            got = ext.assign_stats(z, labels, centroids, m, class_conditional)
            want_dz = torch_backend.scatter_grad(z, want[0], centroids, coef)
            got_dz = ext.scatter_grad(z, want[0], centroids, coef)
            tol = dict(rtol=1e-10, atol=1e-10) if acc == torch.float64 else dict(rtol=1e-5, atol=1e-5)
            dz_tol = tol if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)
            case = f"{device} {dtype} class_conditional={class_conditional}"
            if not torch.equal(got[0].cpu(), want[0].cpu()):
                problems.append(f"{case}: assignments differ")
            elif not torch.equal(got[1].cpu(), want[1].cpu()):
                problems.append(f"{case}: counts differ")
            elif not torch.allclose(got[2].cpu(), want[2].cpu(), **tol):
                problems.append(f"{case}: sqdev differs by {(got[2] - want[2]).abs().max().item():.3g}")
            if got_dz.dtype != dtype or not torch.allclose(got_dz.cpu().double(), want_dz.cpu().double(), **dz_tol):
                problems.append(f"{case}: scatter_grad differs")
    return problems


def _build(label: str, loader, check: bool, device: str | None) -> bool:
    print(f"[cem_fast.build] building the {label} extension ...", flush=True)
    try:
        ext = loader()
    except Exception as exc:  # compiler errors come inside the message
        print(f"[cem_fast.build] {label} build FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return False
    tier = f" (instruction set: {ext.cpu_tier()})" if hasattr(ext, "cpu_tier") else ""
    print(f"[cem_fast.build] {label} extension: {ext.__file__}{tier}")
    if not check:
        return True
    if device is None:
        print(f"[cem_fast.build] {label}: no GPU visible, built and imported only (not run)")
        return True
    try:
        problems = check_against_torch(ext, device)
    except Exception:
        traceback.print_exc()
        return False
    for p in problems:
        print(f"[cem_fast.build] {label} check FAILED: {p}", file=sys.stderr)
    if not problems:
        print(f"[cem_fast.build] {label} check passed against the torch backend on {device}")
    return not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cem_fast.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the torch backend after building")
    parser.add_argument("--cuda", action="store_true", help="build the CUDA extension (nvcc) instead of the CPU one")
    parser.add_argument("--cpu", action="store_true", help="build the CPU extension too when --cuda is given")
    args = parser.parse_args(argv)
    ok = True
    if args.cpu or not args.cuda:
        ok &= _build("C++ CPU", lambda: build_cpp_extension(csrc_dir()), args.check, "cpu")
    if args.cuda:
        try:
            print(f"[cem_fast.build] CUDA toolkit: {find_cuda_home()}")
        except RuntimeError as exc:
            print(f"[cem_fast.build] {exc}", file=sys.stderr)
            return 1
        ok &= _build(
            "CUDA", lambda: build_cuda_extension(csrc_dir()), args.check, "cuda" if torch.cuda.is_available() else None
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
