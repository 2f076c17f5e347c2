"""Time the CEM loss: our fast paths, the float64 reference and (optionally) the authors' functions.

    python bench/bench_loss.py --official-repo /tmp/cem_official            # full table
    python bench/bench_loss.py --official-repo /tmp/cem_official --quick    # the bar configuration only
    python bench/bench_loss.py --official-repo /tmp/cem_official --parity   # loss/grad errors vs the authors

For each configuration (batch 128, features [128, 8, 8, 8] or [128, 8, 16, 16], 10 or 100 classes,
3 or 10 clusters per class, sigmoid-range float32 features) it reports the median forward, backward and
forward+backward time (``torch.utils.benchmark``, ``blocked_autorange``) of every variant on every
backend available for the device, of ``cem_fast.reference.reference_loss`` (float64 Python loops, a few
runs only) and of the authors' ``compute_class_means`` (GMM and PP), with the authors' fwd+bwd time
divided by each row's. Backward is timed on a retained graph (``autograd.grad(..., retain_graph=True)``).
The paper variant runs with ``covariance="diag"``. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.harness import Clock, available_backends, device_arg, loadavg, machine, statements, write_csv  # noqa: E402
from bench.official import PARITY_SPECS, Official, official_arg, parity, parity_case  # noqa: E402
from cem_fast import CEMLoss  # noqa: E402
from cem_fast.reference import reference_loss  # noqa: E402

VARIANTS = ("paper", "official", "official-trained")
BATCH = 128
SIGMA = 0.025
BATCHES_PER_EPOCH = 391  # CIFAR-10 at batch 128: the PP loss's epoch size
BAR = {"H": 8, "C": 10, "m": 10}  # the bar: D=512, 10 classes, m=10, forward+backward
PARITY_TOL = 1e-6
KINDS = ("fwd", "bwd", "fwdbwd")


@dataclass(frozen=True)
class Config:
    H: int  # features [B, 8, H, H]
    C: int
    m: int

    @property
    def D(self) -> int:
        return 8 * self.H * self.H


@dataclass
class Row:
    config: Config
    impl: str
    backend: str
    fwd: float  # medians, seconds
    bwd: float
    fwdbwd: float
    fwdbwd_min: float  # the fastest forward+backward block: the least disturbed by other load
    runs: str  # blocks (or single runs) behind fwd/bwd/fwdbwd
    ratios: dict = field(default_factory=dict)  # authors' median fwd+bwd / this row's
    min_ratios: dict = field(default_factory=dict)  # the same with the minima


# --------------------------------------------------------------------------- the contenders


def paper_state(case, C: int, m: int):
    """Mixture weights over all clusters (sum 1) and small diagonal variances for the paper variant."""
    gen = torch.Generator().manual_seed(1)
    var = torch.rand(C, m, case.centroids.shape[-1], generator=gen, dtype=torch.float64) * 0.05
    return case.weights / C, var.to(case.centroids)


def ours(variant: str, backend: str, case, cfg: Config) -> Callable:
    kw = {"dataset_size": BATCHES_PER_EPOCH * BATCH} if variant != "official" else {}
    cem = CEMLoss(cfg.C, cfg.m, sigma=SIGMA, variant=variant, backend=backend, **kw).to(case.z.device)
    if variant == "paper":
        cem.set_clusters(case.centroids, *paper_state(case, cfg.C, cfg.m))
    elif variant == "official-trained":
        cem.set_clusters(case.centroids, case.weights, case.variances)
    else:
        cem.set_clusters(case.centroids)
    labels = case.labels
    return lambda z: cem(z, labels)


def reference(variant: str, case, cfg: Config) -> Callable:
    cent = case.centroids.double()
    pi, var = (None, None)
    if variant == "paper":
        pi, var = paper_state(case, cfg.C, cfg.m)
    elif variant == "official-trained":
        pi, var = case.weights, case.variances
    kw = dict(
        variant=variant,
        sigma=SIGMA,
        pi=None if pi is None else pi.double(),
        variance=None if var is None else var.double(),
        dataset_size=None if variant == "official" else float(BATCHES_PER_EPOCH * BATCH),
    )
    labels = case.labels
    return lambda z: reference_loss(z.reshape(z.shape[0], -1), labels, cent, **kw)[0]


def authors(official: Official, which: str, case, cfg: Config) -> Callable:
    labels, cents = case.labels, case.centroids_list
    if which == "GMM":
        return lambda z: official.gmm_loss(z, labels, cents, sigma=SIGMA)
    weights, variances = case.weights_list, case.variances_list
    return lambda z: official.pp_loss(
        z,
        labels,
        cents,
        weights,
        variances,
        sigma=SIGMA,
        num_classes=cfg.C,
        batches_per_epoch=BATCHES_PER_EPOCH,
        batch_size=BATCH,
    )


def run_config(
    cfg: Config,
    device: torch.device,
    clock: Clock,
    reference_runs: int,
    backend_names: list,
    official: Optional[Official],
    with_reference: bool,
    progress,
) -> list:
    case = parity_case(BATCH, cfg.C, cfg.m, cfg.H, seed=0, dtype=torch.float32, device=device)
    progress.set_description(f"D={cfg.D} C={cfg.C} m={cfg.m}")
    fast = {(f"ours {v}", b): ours(v, b, case, cfg) for v in VARIANTS for b in backend_names}
    if official is not None:
        fast.update({(f"authors {w}", "-"): authors(official, w, case, cfg) for w in ("GMM", "PP")})
    times = clock.measure(
        {(*key, kind): fn for key, loss_fn in fast.items() for kind, fn in statements(loss_fn, case.z).items()},
        progress,
    )
    progress.update(1)
    if with_reference:
        z64 = case.z.double()
        for v in VARIANTS:
            progress.set_postfix_str(f"reference {v}")
            stmts = statements(reference(v, case, cfg), z64)
            times.update(
                {(f"reference {v} (f64)", "-", kind): t for kind, t in clock.single_runs(stmts, reference_runs).items()}
            )
            progress.update(1)
    keys = list(dict.fromkeys(k[:2] for k in times))
    rows = [
        Row(
            cfg,
            impl,
            backend,
            *(times[(impl, backend, kind)].median for kind in KINDS),
            times[(impl, backend, "fwdbwd")].minimum,
            "/".join(str(times[(impl, backend, kind)].runs) for kind in KINDS),
        )
        for impl, backend in keys
    ]
    theirs = {r.impl.split()[1]: r for r in rows if r.impl.startswith("authors")}
    for r in rows:
        r.ratios = {k: t.fwdbwd / r.fwdbwd for k, t in theirs.items()}
        r.min_ratios = {k: t.fwdbwd_min / r.fwdbwd_min for k, t in theirs.items()}
    return rows


# --------------------------------------------------------------------------- output


def markdown(rows: list, with_authors: bool) -> str:
    head = ["features", "D", "C", "m", "implementation", "backend", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd min ms"]
    if with_authors:
        head += ["GMM / this (f+b)", "PP / this (f+b)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r.config
        cells = [
            f"[{BATCH},8,{c.H},{c.H}]",
            str(c.D),
            str(c.C),
            str(c.m),
            r.impl,
            r.backend,
            f"{r.fwd * 1e3:.3f}",
            f"{r.bwd * 1e3:.3f}",
            f"{r.fwdbwd * 1e3:.3f}",
            f"{r.fwdbwd_min * 1e3:.3f}",
        ]
        if with_authors:
            cells += [f"{r.ratios[k]:.1f}x" if k in r.ratios else "" for k in ("GMM", "PP")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_summary(rows: list) -> str:
    bar = [r for r in rows if (r.config.H, r.config.C, r.config.m) == (BAR["H"], BAR["C"], BAR["m"])]
    if not bar or not bar[0].ratios:
        return ""
    out = [
        f"Bar (D={8 * BAR['H'] ** 2}, C={BAR['C']}, m={BAR['m']}, forward+backward, authors' time / ours; "
        f"medians, and in brackets minima):"
    ]
    for r in bar:
        if r.impl.startswith("ours"):
            verdict = "meets" if min(r.ratios.values()) >= 10 else "MISSES"
            out.append(
                f"  {r.impl:<24} {r.backend:<6} vs GMM {r.ratios['GMM']:6.1f}x ({r.min_ratios['GMM']:.1f}x)"
                f"  vs PP {r.ratios['PP']:6.1f}x ({r.min_ratios['PP']:.1f}x)"
                f"  ({verdict} the 10x bar against both, medians)"
            )
    return "\n".join(out)


CSV_HEADER = [
    "batch",
    "H",
    "D",
    "C",
    "m",
    "impl",
    "backend",
    "fwd_s",
    "bwd_s",
    "fwdbwd_s",
    "fwdbwd_min_s",
    "runs",
    "gmm_over_this",
    "pp_over_this",
]


def csv_rows(rows: list) -> list:
    return [
        [
            BATCH,
            r.config.H,
            r.config.D,
            r.config.C,
            r.config.m,
            r.impl,
            r.backend,
            r.fwd,
            r.bwd,
            r.fwdbwd,
            r.fwdbwd_min,
            r.runs,
            r.ratios.get("GMM", ""),
            r.ratios.get("PP", ""),
        ]
        for r in rows
    ]


# --------------------------------------------------------------------------- parity


def run_parity(official: Official, backend_names: list) -> bool:
    print(
        f"Parity against the authors' compute_class_means (float64, tolerance {PARITY_TOL:g}); "
        f"official-trained runs with replicate_index_bug=True"
    )
    print(
        "| case | backend | authors' loss | our loss | loss rel err | grad rel err | "
        "corrected default: loss (rel diff loss / grad vs authors) |"
    )
    print("|---|---|---|---|---|---|---|")
    ok = True
    for spec in tqdm(PARITY_SPECS, desc="parity", file=sys.stderr):
        for backend in backend_names:
            r = parity(official, spec, backend=backend)
            ok &= r["loss_rel_err"] < PARITY_TOL and r["grad_rel_err"] < PARITY_TOL
            corrected = (
                f"{r['corrected_loss']:.6g} ({r['corrected_vs_theirs_loss']:.2g} / {r['corrected_vs_theirs_grad']:.2g})"
                if "corrected_loss" in r
                else "-"
            )
            print(
                f"| {r['case']} | {backend} | {r['theirs']:.12g} | {r['ours']:.12g} | {r['loss_rel_err']:.2e} | "
                f"{r['grad_rel_err']:.2e} | {corrected} |"
            )
    print("PARITY OK" if ok else "PARITY FAILED")
    return ok


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--official-repo",
        metavar="PATH",
        help="checkout of github.com/xiasong0501/CEM (with model_training_GMM.py and "
        "model_training_paral_pruning.py); adds the authors' functions and the ratios",
    )
    p.add_argument("--parity", action="store_true", help="compare loss and gradient with the authors' and exit")
    p.add_argument("--quick", action="store_true", help="the bar configuration only, shorter timing (smoke test)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds per blocked_autorange call (default 0.1, 0.05 with --quick)",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds per configuration (default 5, 2 with --quick)"
    )
    p.add_argument("--reference-runs", type=int, default=3, help="timed runs of the float64 reference (default 3)")
    p.add_argument("--no-reference", action="store_true", help="skip the float64 reference")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.reference_runs < 1:
        p.error(f"--reference-runs must be >= 1, got {args.reference_runs}")
    if args.parity and not args.official_repo:
        p.error("--parity needs --official-repo PATH")
    args.device = device_arg(p, args.device)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    official = official_arg(args.official_repo)
    print(f"backends: building/loading for {args.device} ...", file=sys.stderr)
    backend_names = available_backends(args.device)
    if args.parity:
        return 0 if run_parity(official, backend_names) else 1

    if args.quick:
        configs = [Config(**BAR)]
    else:
        configs = [Config(H, C, m) for H in (8, 16) for C in (10, 100) for m in (3, 10)]
    clock = Clock(
        args.device,
        args.threads,
        args.min_run_time or (0.05 if args.quick else 0.1),
        args.rounds or (2 if args.quick else 5),
        slow_runs=args.reference_runs,
    )
    per_config = 1 + (0 if args.no_reference else len(VARIANTS))
    rows = []
    print(f"load average before: {loadavg()}", file=sys.stderr)
    with tqdm(total=per_config * len(configs), desc="bench", file=sys.stderr) as progress:
        for cfg in configs:
            rows += run_config(
                cfg, args.device, clock, args.reference_runs, backend_names, official, not args.no_reference, progress
            )
    print(
        f"{machine(args.device)}; device {args.device}, threads {args.threads}, batch {BATCH}, "
        f"float32 features (reference: float64); medians of {clock.rounds} interleaved rounds of "
        f"blocked_autorange({clock.min_run_time:g} s); reference: median of {args.reference_runs} runs"
    )
    print(markdown(rows, official is not None))
    summary = bar_summary(rows)
    if summary:
        print()
        print(summary)
    if args.csv:
        write_csv(args.csv, CSV_HEADER, csv_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
