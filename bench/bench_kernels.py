"""Kernels and refit: every backend's CEMLoss and kernel pair over the issue's grid, and the k-means refit.

    python bench/bench_kernels.py --official-repo /tmp/cem_official --csv /tmp/kernels.csv   # CPU, full grid
    python bench/bench_kernels.py --device cuda --official-repo /tmp/cem_official            # GPU
    python bench/bench_kernels.py --quick                                                    # smoke run

Grid: B in {128, 1024, 8192}, D in {512, 2048}, 10 or 100 classes, m in {3, 10}; sigmoid-range float32
features (``bench.official.parity_case``). Levels:

* ``loss``: the whole ``CEMLoss`` forward, backward (on a retained graph) and forward+backward per
  backend and variant (``bench.bench_loss.ours``), and the authors' ``compute_class_means`` GMM and PP
  (``bench.bench_loss.authors``) when ``--official-repo`` is given;
* ``kernel``: ``assign_stats`` (fwd), ``scatter_grad`` (bwd) and both (``bench_backends_cpu.step``).

Timing: on CPU ``torch.utils.benchmark`` ``blocked_autorange`` medians, contenders interleaved over
``--rounds`` rounds; a call slower than ``SLOW_S`` gets ``--slow-runs`` single runs instead. On CUDA
``triton.testing.do_bench`` medians (L2 flushed between reps) and a no-flush number: the median over
repeats of a tight loop of back-to-back calls timed with CUDA events (warm L2, launch overlap).
GB/s is against the bytes that must move (``loss_bytes``, ``kernel_bytes``).

Refit: seconds of ``CEMLoss.refit`` (variant official-trained: k-means++ then warm starts) against the
authors' per-class loop restated in ``bench/official_kmeans.py``, on 50,000 synthetic features x D,
10 classes x 10 clusters: a first refit (k-means++) and a warm refit on the next epoch's features.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench import official_kmeans  # noqa: E402
from bench.bench_backends_cpu import step  # noqa: E402
from bench.bench_loss import BATCH, BATCHES_PER_EPOCH, Config, authors, ours  # noqa: E402
from bench.harness import (  # noqa: E402
    SLOW_S,
    Clock,
    Timing,
    available_backends,
    device_arg,
    kernel_bytes,
    loadavg,
    loss_bytes,
    machine,
    state_bytes,
    statements,
    write_csv,
)
from bench.official import Official, official_arg, parity_case  # noqa: E402
from cem_fast import CEMLoss, backends  # noqa: E402

KINDS = ("fwd", "bwd", "fwdbwd")
SIZES = (128, 1024, 8192)
DIMS = (512, 2048)
CLASSES = (10, 100)
CLUSTERS = (3, 10)
BAR = dict(B=128, D=2048, C=10, m=3)  # the CPU "done when": cpp >= 2x torch and >= 20x the authors
BAR_VS_TORCH, BAR_VS_AUTHORS = 2.0, 20.0
REFIT_N, REFIT_C, REFIT_M = 50_000, 10, 10


@dataclass
class Row:
    level: str  # "loss" or "kernel"
    B: int
    D: int
    C: int
    m: int
    impl: str  # "ours <variant>", "authors GMM|PP" or "kernels"
    backend: str
    times: Dict[str, Timing]
    nbytes: Dict[str, int]
    ratios: Dict[str, float] = field(default_factory=dict)  # e.g. "torch/this", "GMM/this" on fwdbwd


# --------------------------------------------------------------------------- contenders of one configuration


def loss_rows(
    B,
    D,
    C,
    m,
    device,
    timer: Clock,
    backend_names,
    variants,
    official: Optional[Official],
    progress,
    official_batches=SIZES,
) -> list:
    cfg = Config(int(round((D // 8) ** 0.5)), C, m)
    case = parity_case(B, C, m, cfg.H, seed=0, dtype=torch.float32, device=device)
    contenders, state = {}, {}
    for v in variants:
        for b in backend_names:
            contenders[(f"ours {v}", b)] = ours(v, b, case, cfg)
            state[(f"ours {v}", b)] = state_bytes(v, C * m, D)
    if official is not None and B in official_batches:
        for which in ("GMM", "PP"):
            contenders[(f"authors {which}", "-")] = authors(official, which, case, cfg)
            state[(f"authors {which}", "-")] = state_bytes(
                "official" if which == "GMM" else "official-trained", C * m, D
            )
    stmts = {
        (name, b, kind): f
        for (name, b), loss_fn in contenders.items()
        for kind, f in statements(loss_fn, case.z).items()
    }
    t = timer.measure(stmts, progress)
    return [
        Row(
            "loss",
            B,
            D,
            C,
            m,
            name,
            b,
            {k: t[(name, b, k)] for k in KINDS},
            loss_bytes(B, D, C * m, 4, state[(name, b)]),
        )
        for (name, b) in contenders
    ]


def kernel_rows(B, D, C, m, device, timer: Clock, backend_names, progress) -> list:
    gen = torch.Generator().manual_seed(0)
    K = C * m
    z = torch.randn(B, D, generator=gen).to(device)
    labels = torch.randint(0, C, (B,), generator=gen).to(device)
    cent = torch.randn(K, D, generator=gen).to(device)
    coef = torch.randn(K, D, generator=gen).to(device)
    stmts = {}
    for b in backend_names:
        mod = backends.get(b)
        a = mod.assign_stats(z, labels, cent, m, True)[0]
        stmts[(b, "fwd")] = lambda mod=mod: mod.assign_stats(z, labels, cent, m, True)
        stmts[(b, "bwd")] = lambda mod=mod, a=a: mod.scatter_grad(z, a, cent, coef)
        stmts[(b, "fwdbwd")] = lambda mod=mod: step(mod, z, labels, cent, coef, m, True)
    t = timer.measure(stmts, progress)
    return [
        Row("kernel", B, D, C, m, "kernels", b, {k: t[(b, k)] for k in KINDS}, kernel_bytes(B, D, K, 4))
        for b in backend_names
    ]


def add_ratios(rows: list) -> None:
    """Per configuration and level: torch's forward+backward / this row's, and the authors' / this row's."""
    for r in rows:
        same = [o for o in rows if (o.level, o.B, o.D, o.C, o.m) == (r.level, r.B, r.D, r.C, r.m)]
        for o in same:
            if o.backend == "torch" and (r.level == "kernel" or o.impl == r.impl):
                r.ratios["torch/this"] = o.times["fwdbwd"].median / r.times["fwdbwd"].median
            if o.impl.startswith("authors"):
                r.ratios[f"{o.impl.split()[1]}/this"] = o.times["fwdbwd"].median / r.times["fwdbwd"].median


# --------------------------------------------------------------------------- refit


def refit_features(N: int, D: int, C: int, m: int, seed: int, device) -> Tuple[torch.Tensor, torch.Tensor, Callable]:
    """Sigmoid-range features with ``m`` true modes per class, and a maker of the next epoch's pass."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % C
    modes = torch.randn(C, m, D, generator=gen)
    mode_of = torch.randint(0, m, (N,), generator=gen)

    def epoch(s: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 1 + s)
        return torch.sigmoid(modes[labels, mode_of] + torch.randn(N, D, generator=g)).to(device)

    return epoch(0), labels.to(device), epoch


def refit_rows(D: int, device, N: int, C: int, m: int, with_authors: bool, runs: int, progress) -> list:
    """Seconds of a first (k-means++) and a warm refit, ours and (optionally) the authors' loop."""
    x0, y, epoch = refit_features(N, D, C, m, seed=0, device=device)
    x1 = epoch(1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def clock(fn) -> float:
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t, out

    rows = []
    first, warm, iters = [], [], ()
    for r in range(runs):
        progress.set_postfix_str(f"refit ours D={D} run {r + 1}/{runs}")
        cem = CEMLoss(C, m, variant="official-trained", dataset_size=N).to(device)
        first.append(clock(lambda: cem.refit(x0, y))[0])
        it_first = cem.last_refit_iterations
        warm.append(clock(lambda: cem.refit(x1, y))[0])
        iters = (it_first, cem.last_refit_iterations)
    rows.append(
        dict(
            impl="ours CEMLoss.refit (official-trained)",
            D=D,
            N=N,
            C=C,
            m=m,
            first_s=statistics.median(first),
            warm_s=statistics.median(warm),
            runs=runs,
            iterations=f"{iters[0]} / {iters[1]} (all classes)",
            covariance_s="",
        )
    )
    if with_authors:
        progress.set_postfix_str(f"refit authors D={D}")
        gen = torch.Generator().manual_seed(0)
        t_first, fits = clock(lambda: official_kmeans.refit(x0, y, C, m, covariances=False, generator=gen))
        t_warm, fits1 = clock(lambda: official_kmeans.refit(x1, y, C, m, previous=fits, covariances=False))
        # the covariances their refit also builds every epoch, timed on the warm result's assignment
        t_cov, _ = clock(
            lambda: [
                official_kmeans.class_statistics(
                    x1[y == c], f.centroids, torch.cdist(x1[y == c], f.centroids).argmin(1), covariances=True
                )
                for c, f in enumerate(fits1)
                if f is not None
            ]
        )
        rows.append(
            dict(
                impl="authors' per-class loop (official_kmeans.py)",
                D=D,
                N=N,
                C=C,
                m=m,
                first_s=t_first,
                warm_s=t_warm,
                runs=1,
                iterations=f"{_max_iterations(fits)} / {_max_iterations(fits1)}",
                covariance_s=t_cov,
            )
        )
    return rows


def _max_iterations(fits) -> int:
    return max(f.iterations for f in fits if f is not None)


# --------------------------------------------------------------------------- output


def _ms(t: Optional[float]) -> str:
    return "" if t is None else f"{t * 1e3:.3f}"


def markdown(rows: list, cuda: bool) -> str:
    head = [
        "level",
        "B",
        "D",
        "C",
        "m",
        "implementation",
        "backend",
        "fwd ms",
        "bwd ms",
        "fwd+bwd ms",
        "fwd+bwd GB/s",
        "fwd+bwd min ms",
    ]
    if cuda:
        head += ["no-flush fwd ms", "no-flush bwd ms", "no-flush fwd+bwd ms", "no-flush GB/s"]
    head += ["torch / this", "GMM / this", "PP / this"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r.times
        cells = [
            r.level,
            str(r.B),
            str(r.D),
            str(r.C),
            str(r.m),
            r.impl,
            r.backend,
            *(_ms(t[k].median) for k in KINDS),
            f"{r.nbytes['fwdbwd'] / t['fwdbwd'].median / 1e9:.2f}",
            _ms(t["fwdbwd"].minimum),
        ]
        if cuda:
            cells += [*(_ms(t[k].noflush) for k in KINDS), f"{r.nbytes['fwdbwd'] / t['fwdbwd'].noflush / 1e9:.2f}"]
        cells += [f"{r.ratios[k]:.1f}x" if k in r.ratios else "" for k in ("torch/this", "GMM/this", "PP/this")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def refit_markdown(rows: list) -> str:
    lines = [
        "| implementation | N | D | C | m | first refit s (k-means++) | warm refit s | runs | "
        "Lloyd iterations (max per class, first / warm) | + full covariances s |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        cov = f"{r['covariance_s']:.2f}" if r["covariance_s"] != "" else ""
        lines.append(
            f"| {r['impl']} | {r['N']} | {r['D']} | {r['C']} | {r['m']} | {r['first_s']:.3f} | "
            f"{r['warm_s']:.3f} | {r['runs']} | {r['iterations']} | {cov} |"
        )
    ours_ = {r["D"]: r for r in rows if r["impl"].startswith("ours")}
    for r in rows:
        if r["impl"].startswith("authors"):
            o = ours_[r["D"]]
            lines.append(
                f"\nD={r['D']}: authors' loop / ours: first {r['first_s'] / o['first_s']:.1f}x, "
                f"warm {r['warm_s'] / o['warm_s']:.1f}x (without their covariances)"
            )
    return "\n".join(lines)


def bar_summary(rows: list) -> str:
    """The CPU "done when" at B=128, D=2048, 10 classes, m=3: cpp vs torch and vs the authors (fwd+bwd)."""
    bar = [r for r in rows if r.level == "loss" and (r.B, r.D, r.C, r.m) == tuple(BAR.values())]
    cpp = [r for r in bar if r.backend == "cpp"]
    if not cpp:
        return ""
    out = [
        f"Bar (B={BAR['B']}, D={BAR['D']}, C={BAR['C']}, m={BAR['m']}, forward+backward medians): "
        f"cpp >= {BAR_VS_TORCH:g}x torch and >= {BAR_VS_AUTHORS:g}x the authors' function"
    ]
    for r in cpp:
        parts = [f"  {r.impl:<24} cpp {r.times['fwdbwd'].median * 1e3:.3f} ms"]
        vt = r.ratios.get("torch/this")
        if vt is not None:
            parts.append(f"vs torch {vt:.2f}x ({'meets' if vt >= BAR_VS_TORCH else 'MISSES'})")
        for k in ("GMM", "PP"):
            v = r.ratios.get(f"{k}/this")
            if v is not None:
                parts.append(f"vs authors {k} {v:.1f}x ({'meets' if v >= BAR_VS_AUTHORS else 'MISSES'})")
        mins = {
            o.backend if o.impl == r.impl else o.impl.split()[-1]: o.times["fwdbwd"].minimum
            for o in bar
            if o.impl == r.impl or o.impl.startswith("authors")
        }
        here = r.times["fwdbwd"].minimum
        parts.append("minima: " + ", ".join(f"{k} / cpp {v / here:.1f}x" for k, v in mins.items() if k != "cpp"))
        out.append(", ".join(parts))
    return "\n".join(out)


CSV_HEADER = [
    "device",
    "level",
    "B",
    "D",
    "C",
    "m",
    "impl",
    "backend",
    "kind",
    "median_s",
    "min_s",
    "runs",
    "bytes",
    "gbps",
    "noflush_s",
    "noflush_gbps",
    "torch_over_this",
    "gmm_over_this",
    "pp_over_this",
]


def csv_rows(rows: list, refits: list, device) -> list:
    out = []
    for r in rows:
        for k in KINDS:
            t, nb = r.times[k], r.nbytes[k]
            out.append(
                [
                    device,
                    r.level,
                    r.B,
                    r.D,
                    r.C,
                    r.m,
                    r.impl,
                    r.backend,
                    k,
                    t.median,
                    t.minimum,
                    t.runs,
                    nb,
                    nb / t.median / 1e9,
                    "" if t.noflush is None else t.noflush,
                    "" if t.noflush is None else nb / t.noflush / 1e9,
                    *(r.ratios.get(x, "") if k == "fwdbwd" else "" for x in ("torch/this", "GMM/this", "PP/this")),
                ]
            )
    for r in refits:
        for kind in ("first", "warm"):
            out.append(
                [
                    device,
                    "refit",
                    r["N"],
                    r["D"],
                    r["C"],
                    r["m"],
                    r["impl"],
                    "-",
                    kind,
                    r[f"{kind}_s"],
                    "",
                    r["runs"],
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="B=128, D=512 and 2048, 10 classes, m=3, short timing, small refit (a smoke run)",
    )
    p.add_argument("--csv", default=None, help="write every number to this CSV")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU (default 2)")
    p.add_argument("--official-repo", default=None, help="checkout of github.com/xiasong0501/CEM (authors' rows)")
    p.add_argument(
        "--official-batches",
        type=int,
        nargs="+",
        default=list(SIZES),
        help="batch sizes at which the authors' functions are timed (default all; at B=8192 one "
        "call of theirs takes seconds on a CPU)",
    )
    p.add_argument("--no-refit", action="store_true", help="skip the refit timing")
    p.add_argument("--refit-only", action="store_true", help="only the refit timing (no loss or kernel grid)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["official-trained"],
        choices=["paper", "official", "official-trained"],
        help="CEMLoss variants timed (default official-trained, the loss the authors train with)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, 1 with --quick)")
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds per blocked_autorange block (default 0.05, 0.01 with --quick)",
    )
    p.add_argument("--slow-runs", type=int, default=3, help=f"single runs of calls slower than {SLOW_S} s")
    p.add_argument(
        "--refit-dims",
        type=int,
        nargs="+",
        default=None,
        help="refit feature dimensions (default 512 on CPU, 2048 on CUDA)",
    )
    p.add_argument("--refit-runs", type=int, default=3, help="runs of our refit (median); the authors' runs once")
    p.add_argument("--batches", type=int, nargs="+", default=None, help=f"batch sizes of the grid (default {SIZES})")
    p.add_argument("--dims", type=int, nargs="+", default=None, help=f"feature dimensions of the grid (default {DIMS})")
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        choices=["torch", "cpp", "cuda", "triton"],
        help="time only these backends (default: every one available on the device)",
    )
    args = p.parse_args(argv)
    for name in ("threads", "slow_runs", "refit_runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.min_run_time is not None and args.min_run_time <= 0:
        p.error(f"--min-run-time must be > 0, got {args.min_run_time}")
    args.device = device_arg(p, args.device)
    return args


def main(argv=None) -> str:
    """Run the benchmark; prints and returns the markdown report."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    official = official_arg(args.official_repo)
    names = available_backends(args.device, args.backends)
    if args.no_refit and args.refit_only:
        raise SystemExit("error: --no-refit and --refit-only exclude each other")
    if args.refit_only:
        grid = []
    elif args.quick:
        grid = [(B, D, 10, 3) for B in args.batches or (128,) for D in args.dims or DIMS]
    else:
        grid = list(itertools.product(args.batches or SIZES, args.dims or DIMS, CLASSES, CLUSTERS))
    timer = Clock(
        args.device,
        args.threads,
        args.min_run_time or (0.01 if args.quick else 0.05),
        args.rounds or (1 if args.quick else 3),
        args.slow_runs,
        cuda_rep_ms=20 if args.quick else 100,
    )
    refit_dims = (
        []
        if args.no_refit
        else (args.refit_dims or ([64] if args.quick else [2048 if args.device.type == "cuda" else 512]))
    )
    n_refit = 2000 if args.quick else REFIT_N
    rows, refits = [], []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load0 = loadavg()
    with tqdm(total=2 * len(grid) + len(refit_dims), desc="bench_kernels", file=sys.stderr) as progress:
        for B, D, C, m in grid:
            progress.set_description(f"B={B} D={D} C={C} m={m}")
            rows += loss_rows(
                B, D, C, m, args.device, timer, names, args.variants, official, progress, args.official_batches
            )
            progress.update(1)
            rows += kernel_rows(B, D, C, m, args.device, timer, names, progress)
            progress.update(1)
        for D in refit_dims:
            refits += refit_rows(
                D, args.device, n_refit, REFIT_C, REFIT_M, official is not None, args.refit_runs, progress
            )
            progress.update(1)
    add_ratios(rows)
    cuda = args.device.type == "cuda"
    timing = (
        "triton.testing.do_bench medians (L2 flushed), no-flush: tight-loop medians"
        if cuda
        else f"medians of {timer.rounds} interleaved rounds of blocked_autorange({timer.min_run_time:g} s); "
        f"calls over {SLOW_S} s: {args.slow_runs} single runs"
    )
    parts = [
        f"{started}; {machine(args.device)}; device {args.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, threads {args.threads}, float32, "
        f"backends {', '.join(names)}, variants {', '.join(args.variants)}, authors' functions at B in "
        f"{args.official_batches if official else '(not given)'}, epoch size "
        f"{BATCHES_PER_EPOCH * BATCH}; {timing}; load average {load0} -> {loadavg()}"
    ]
    if rows:
        parts.append(markdown(rows, cuda))
    summary = bar_summary(rows)
    if summary:
        parts.append(summary)
    if refits:
        parts.append(refit_markdown(refits))
    text = "\n\n".join(parts)
    print(text)
    if args.csv:
        write_csv(args.csv, CSV_HEADER, csv_rows(rows, refits, args.device))
    return text


if __name__ == "__main__":
    main()
