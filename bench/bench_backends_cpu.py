"""CPU micro-benchmark of the backends' hot pair: ``assign_stats`` + ``scatter_grad`` (one forward + backward).

    python bench/bench_backends_cpu.py [--threads 2] [--quick] [--all-clusters]

Prints the median time of torch and cpp per shape (torch.utils.benchmark) and the speed-up torch / cpp.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch.utils.benchmark import Timer

from cem_fast.backends import cpp_backend, torch_backend


def step(backend, z, labels, centroids, coef, m, class_conditional):
    assign, _, _ = backend.assign_stats(z, labels, centroids, m, class_conditional)
    return backend.scatter_grad(z, assign, centroids, coef)


def median_seconds(backend, args, min_run_time):
    timer = Timer("step(backend, *args)", globals={"step": step, "backend": backend, "args": args})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="B=128 and 1024 only, shorter timing")
    parser.add_argument("--all-clusters", action="store_true", help="class_conditional=False (search all K)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpp_backend.is_available("cpu"):
        raise SystemExit("the cpp backend did not build; see the warning above")
    dtype = getattr(torch, args.dtype)
    acc = torch_backend.accumulation_dtype(dtype)
    cc = not args.all_clusters
    sizes = (128, 1024) if args.quick else (128, 1024, 8192)
    min_run_time = 0.2 if args.quick else 0.5
    print(
        f"threads={args.threads} dtype={args.dtype} class_conditional={cc} "
        f"cpu tier={cpp_backend.load_cpp_extension().cpu_tier()}"
    )
    print(f"{'B':>5} {'D':>5} {'classes':>7} {'m':>3} {'K':>5} | {'torch ms':>9} {'cpp ms':>9} {'speed-up':>8}")
    gen = torch.Generator().manual_seed(0)
    for B, D, classes, m in itertools.product(sizes, (512, 2048), (10, 100), (3, 10)):
        K = classes * m
        z = torch.randn(B, D, generator=gen).to(dtype)
        labels = torch.randint(0, classes, (B,), generator=gen)
        centroids = torch.randn(K, D, generator=gen, dtype=acc)
        coef = torch.randn(K, D, generator=gen, dtype=acc)
        inputs = (z, labels, centroids, coef, m, cc)
        t_torch = median_seconds(torch_backend, inputs, min_run_time)
        t_cpp = median_seconds(cpp_backend, inputs, min_run_time)
        print(
            f"{B:>5} {D:>5} {classes:>7} {m:>3} {K:>5} | {t_torch * 1e3:>9.3f} {t_cpp * 1e3:>9.3f} "
            f"{t_torch / t_cpp:>7.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
