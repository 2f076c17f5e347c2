"""Named grids of runs, resumable: ``python -m reproduce.grid NAME`` (``--list``, ``--dry-run``).

A grid is a list of jobs run in order: a *run* job trains one run unless it has finished (resuming an
interrupted one; a run whose committed record exists is restored from it instead), then runs its attacks
unless their records exist, then writes its ``bound.json``
(``reproduce.bound``: Figure 3's entropy bound; not for a run that adds no noise); a *table* job writes a table
from the runs that exist. Rerunning a grid continues where it stopped, and a finished grid reruns as a
no-op (its tables are rewritten from the same records). Grids:

* ``cpu``: the ``--preset cpu`` runs behind ``reproduce/RESULTS.md`` on CIFAR-10 (``--data-root``,
  default ``<repo>/../shared/data`` or ``$CEM_FAST_DATA``), in ``runs/cpu``, ordered so that an
  interrupted grid leaves the most useful runs finished. Its table jobs write a working table beside the
  runs; what ``reproduce/results/`` publishes comes from the runs' records (``python -m reproduce.records
  save runs/cpu``, then ``python -m reproduce.results_check --write``).
* ``smoke``: two tiny runs and a table, seconds; shows the machinery.

Run layout (the one ``reproduce.table`` collects): ``ROOT/<dataset>_<arch>_<defence>_lam<L>_sigma<S>/seed<N>``.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from reproduce import pipeline
from reproduce.machine import default_device
from reproduce.rundir import RunDir

DECODER_SETTINGS = ("train_time", "infer_time")
# The decoder at the cpu preset: batch 64, over the preset's whole 30-epoch cosine schedule (the best held-out
# epoch kept).
CPU_ATTACK = {"batch_size": 64}
# The cpu grid trains its decoders under bf16 autocast where the CPU has bf16 kernels (a decoder epoch 2x
# faster; on the cpu-full lambda-0 and lambda-16 runs its MSE within 0.4 % of float32's, docs/audit.md); each
# record says which. The regime grid keeps float32: its first arms were attacked in float32.
CPU_GRID_ATTACKS = {"decoder": {**CPU_ATTACK, "bf16_autocast": "auto"}, "adaptive": {"bf16_autocast": "auto"}}


@dataclass(frozen=True)
class RunJob:
    """Train one run, then each ``(attack, settings)`` of ``attacks`` that has no record yet."""

    dataset: str
    defence: str
    sigma: float
    cem_lambda: float
    seed: int
    attacks: tuple = (("decoder", DECODER_SETTINGS),)
    arch: str = "vgg11_bn"
    train: tuple = ()  # extra reproduce.train settings, as (name, value) pairs

    @property
    def name(self) -> str:
        variant = dict(self.train).get("cem_variant", "paper")
        suffix = f"_{variant}" if self.cem_lambda and variant != "paper" else ""  # reproduce.table's Arm.name rule
        return f"{self.dataset}_{self.arch}_{self.defence}_lam{self.cem_lambda:g}_sigma{self.sigma:g}{suffix}/seed{self.seed}"

    def settings(self) -> dict:
        return {
            "dataset": self.dataset,
            "arch": self.arch,
            "defence": self.defence,
            "sigma": self.sigma,
            "cem_lambda": self.cem_lambda,
            "seed": self.seed,
            **dict(self.train),
        }

    def todo(self, root: Path, preset: Optional[str] = None) -> list[str]:
        """What is left of this job (empty: done); ``preset``: the grid's (to tell whether the run has noise)."""
        rd = RunDir(root / self.name)
        left = [] if rd.finished else [f"train ({rd.status()})"]
        for attack, settings in self.attacks:
            missing = settings if left else rd.missing_settings(attack, settings)
            left += [f"{attack} {s}" for s in missing]
        if rd.read_bound() is None and self.has_noise(root, preset):
            left.append("bound")
        return left

    def has_noise(self, root: Path, preset: Optional[str] = None) -> bool:
        """Whether the run sends noisy features (then it gets a ``bound.json``)."""
        from reproduce.bound import attacker_sigma

        config = pipeline.planned_config(root / self.name, preset=preset, overrides=self.settings())
        return attacker_sigma(config) > 0


@dataclass(frozen=True)
class TableJob:
    """Write table ``number`` (and its .csv) to ``out`` from the runs that exist (trains nothing)."""

    number: int
    out: str
    attacks: tuple = ("decoder", "gan")
    seeds: Optional[tuple] = None

    def todo(self, root: Path, out_dir: Path = Path(".")) -> list[str]:
        """``write OUT``, or nothing when the table exists (a grid that ran nothing rewrites no table)."""
        return [] if (Path(out_dir) / self.out).is_file() else [f"write {self.out}"]


@dataclass(frozen=True)
class Grid:
    name: str
    description: str
    preset: str
    jobs: tuple
    attack_overrides: dict = field(default_factory=dict)  # attack -> its run_attack overrides
    default_data_root: Optional[Callable[[], Optional[str]]] = None
    records: bool = False  # save each run's record (reproduce.records) as it trains and is attacked


def shared_data_root() -> Optional[str]:
    """``$CEM_FAST_DATA``, else ``<repo>/../shared/data`` when it exists, else None."""
    env = os.environ.get("CEM_FAST_DATA")
    if env:
        return env
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return str(beside) if beside.is_dir() else None


# The attack ladder every cpu-grid run gets: the decoder in both settings (to convergence), then the white-box
# and the noise-adaptive attacks at train time (both start from that decoder). Table 1's arms add the GAN.
LADDER = (("decoder", DECODER_SETTINGS), ("whitebox", ("train_time",)), ("adaptive", ("train_time",)))
TABLE1_LADDER = LADDER + (("gan", DECODER_SETTINGS),)
# Table 1's defences other than the noise ones this grid already seeds three times.
TABLE1_OTHERS = ("bottleneck", "nopeek", "dropout", "patrol", "ressfl", "noise_nopeek")


def _cpu_jobs() -> tuple:
    """The runs behind reproduce/RESULTS.md, the most useful first, so that a grid stopped early leaves them."""

    def noise(sigma, lam, seed):
        return RunJob("cifar10", "noise", sigma, lam, seed, attacks=LADDER)

    def arl(lam, seed):
        return RunJob("cifar10", "noise_arl", 0.025, lam, seed, attacks=TABLE1_LADDER)

    jobs = [
        # 1. The headline pair and Figure 4's control (more noise alone), seed 125.
        noise(0.025, 0, 125),
        noise(0.025, 16, 125),
        noise(0.1, 0, 125),
        # 2. Table 1's Noise_ARL rows, seed 125.
        arl(0, 125),
        arl(16, 125),
        # 3. Figure 4's single-seed arms: CEM at a lower weight, noise alone at sigma 0.05, 0.2 and 0.4 (sigma
        # 0.1 costs 1 point at this preset and CEM lambda 16 about 4: the regime grid's matched sigma needs a
        # sweep point past CEM's cost, reproduce.matched_sigma).
        noise(0.025, 4, 125),
        noise(0.05, 0, 125),
        noise(0.2, 0, 125),
        noise(0.4, 0, 125),
        # 4. Seeds 126 and 127 of the pair, the control and Noise_ARL.
        *[job for seed in (126, 127) for job in (noise(0.025, 0, seed), noise(0.025, 16, seed), noise(0.1, 0, seed))],
        *[arl(lam, seed) for seed in (126, 127) for lam in (0, 16)],
        TableJob(1, "runs/cpu/table1_cpu.md", attacks=("decoder", "gan"), seeds=(125, 126, 127)),
        # 5. Table 1's other defences with and without CEM, seed 125.
        *[
            RunJob("cifar10", defence, 0.025, lam, 125, attacks=TABLE1_LADDER)
            for defence in TABLE1_OTHERS
            for lam in (0, 16)
        ],
        TableJob(1, "runs/cpu/table1_cpu.md", attacks=("decoder", "gan"), seeds=(125, 126, 127)),
    ]
    return tuple(jobs)


def _regime_jobs(cpu_records: Optional[Path] = None) -> tuple:
    """Issue 17's deciding experiment at ``--preset cpu-full`` (all 50,000 images, so lambda is in the paper's
    units for the paper variant). The noise-alone control at the sigma whose accuracy cost matches CEM's
    (``reproduce.matched_sigma``) is the last job, once the cpu grid's committed records give that sigma."""
    from reproduce.matched_sigma import matched_sigma
    from reproduce.records import RECORDS_ROOT

    def run(defence, lam, seed, **train):
        return RunJob("cifar10", defence, 0.025, lam, seed, attacks=LADDER, train=tuple(sorted(train.items())))

    jobs = [
        run("noise", 0, 125),  # the accuracy check: the paper's regime needs ~85 % here
        run("noise", 16, 125),  # the paper's strength (lambda 16 at N = 50,000)
        # the authors' loss and weight schedule (lambda * 0.001 / lr), as their scripts ran it
        run("noise", 16, 125, cem_variant="official-trained", cem_schedule="official"),
        run("noise", 80, 125),  # the cpu preset's lambda 16 at N = 10,000, in the paper's units
        run("noise_arl", 0, 125),
        run("noise_arl", 16, 125),
        run("noise", 0, 126),
        run("noise", 16, 126),
    ]
    matched = matched_sigma(cpu_records or RECORDS_ROOT / "cpu")
    if matched is not None:
        jobs.append(RunJob("cifar10", "noise", matched["sigma"], 0, 125, attacks=LADDER))
    return tuple(jobs)


_SMOKE_TRAIN = (("epochs", 1), ("train_subset", 8), ("test_subset", 4), ("batch_size", 4), ("cem_backend", "torch"))
GRIDS = {
    "cpu": Grid(
        "cpu",
        "the --preset cpu runs behind reproduce/RESULTS.md (CIFAR-10; days on 2 cores)",
        "cpu",
        _cpu_jobs(),
        CPU_GRID_ATTACKS,
        shared_data_root,
        records=True,
    ),
    "regime": Grid(
        "regime",
        "the --preset cpu-full runs that decide whether CEM's gain is the paper's (about 2 h a run on 2 cores)",
        "cpu-full",
        _regime_jobs(),
        {"decoder": CPU_ATTACK},
        shared_data_root,
        records=True,
    ),
    "smoke": Grid(
        "smoke",
        "two tiny runs on the shipped sample and Table 1 from them (about a minute)",
        "smoke",
        (
            RunJob("cifar10-sample", "bottleneck", 0.025, 0, 0, train=_SMOKE_TRAIN),
            RunJob("cifar10-sample", "bottleneck", 0.025, 16, 0, train=_SMOKE_TRAIN),
            TableJob(1, "table1_smoke.md", attacks=("decoder",), seeds=(0,)),
        ),
        {"decoder": {"epochs": 1, "max_train_images": 16, "max_test_images": 20}},
    ),
}


def run_grid(
    name: str,
    *,
    runs_root: Optional[Union[str, Path]] = None,
    data_root: Optional[str] = None,
    device: Optional[str] = None,
    threads: Optional[int] = None,
    out_dir: Optional[Path] = None,
    dry_run: bool = False,
    records_root: Optional[Union[str, Path, bool]] = None,
    only: Sequence[str] = (),
    train_only: bool = False,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run grid ``name`` (``GRIDS``) job by job, skipping what is done; returns the lines of what was (or,
    with ``dry_run``, would be) done. ``out_dir``: where table jobs write (default: the current folder).
    ``records_root``: where each run's record is saved as it trains and is attacked (default: the committed
    records folder for a grid that keeps records, none for the others; False: none). ``only``: shell
    patterns; just the run jobs whose name matches one of them (no table jobs). ``train_only``: train the
    runs, attack nothing and write no table (a later run of the grid attacks them)."""
    if name not in GRIDS:
        raise ValueError(f"grid must be one of {tuple(GRIDS)}, got {name!r}")
    grid = GRIDS[name]
    selected = select_jobs(grid, only)
    if records_root is None and grid.records:
        from reproduce.records import RECORDS_ROOT

        records_root = RECORDS_ROOT
    records_root = None if records_root is None or records_root is False else Path(records_root)
    root = Path(runs_root or f"runs/{grid.preset}")
    if data_root is None and grid.default_data_root is not None:
        data_root = grid.default_data_root()
    if device is None:
        device = default_device()
    if not dry_run:
        pipeline.preload()
    done_lines = []
    out_base = Path(out_dir or ".")
    changed = False  # a table job rewrites its table only after a run job did something (or when it is missing)
    for i, job in enumerate(grid.jobs, 1):
        if job not in selected or (train_only and not isinstance(job, RunJob)):
            continue
        if isinstance(job, RunJob):
            left = _left(job, grid, root, records_root)
            if train_only:
                left = [step for step in left if step.startswith("train (")]
        else:
            left = [f"write {job.out}"] if changed else job.todo(root, out_base)
        what = job.name if isinstance(job, RunJob) else f"table {job.number}"
        if not left:
            continue
        done_lines.append(f"{i}/{len(grid.jobs)} {what}: {', '.join(left)}")
        log(("[grid] would run " if dry_run else "[grid] ") + done_lines[-1])
        if dry_run:
            continue
        if isinstance(job, RunJob):
            _restore_from_record(root / job.name, job, grid, records_root, data_root, log)
            rd = pipeline.ensure_trained(
                root / job.name,
                preset=grid.preset,
                overrides=job.settings(),
                data_root=data_root if job.dataset != "cifar10-sample" else None,
                device=device,
                threads=threads,
                log=log,
            )
            _save_record(rd, grid, records_root, log)
            changed = True
            if train_only:
                continue
            for attack, settings in job.attacks:
                pipeline.ensure_attacked(
                    rd,
                    attack,
                    settings,
                    preset=grid.preset,
                    device=device,
                    overrides={"seed": job.seed, **grid.attack_overrides.get(attack, {})},
                    log=log,
                )
                _save_record(rd, grid, records_root, log)
            pipeline.ensure_bound(
                rd, device=device, data_root=data_root if job.dataset != "cifar10-sample" else None, log=log
            )
            _save_record(rd, grid, records_root, log)
        else:
            _write_table(job, grid, root, data_root, device, threads, out_base, log)
    return done_lines


def select_jobs(grid: Grid, only: Sequence[str] = ()) -> tuple:
    """The jobs of ``grid`` that run: all of them, or with ``only`` (shell patterns such as
    ``'*noise_lam0_sigma0.1/seed125'``) the run jobs whose name matches one pattern."""
    if isinstance(only, str):
        raise TypeError("only must be a sequence of patterns, not one string")
    if not only:
        return grid.jobs
    picked = tuple(j for j in grid.jobs if isinstance(j, RunJob) and any(fnmatch.fnmatch(j.name, p) for p in only))
    if not picked:
        names = ", ".join(j.name for j in grid.jobs if isinstance(j, RunJob))
        raise ValueError(f"only: no run of grid {grid.name!r} matches {list(only)}; its runs: {names}")
    return picked


def _left(job: RunJob, grid: Grid, root: Path, records_root: Optional[Path]) -> list[str]:
    """What is left of ``job`` in ``root``; nothing when its committed record is already complete (a later
    session on a machine without ``runs/`` does not redo it)."""
    left = job.todo(root, grid.preset)
    if not left or records_root is None or not RunDir(records_root / grid.name / job.name).is_record:
        return left
    from_record = job.todo(records_root / grid.name, grid.preset)
    if not from_record:
        return []
    if RunDir(root / job.name).started:
        return left
    return ["restore from its record"] + from_record  # a new machine: the record's missing attacks only


def progress_text(grid: Grid, root: Path, records_root: Optional[Path]) -> str:
    """How far ``grid`` is: run jobs done, trained with attacks left, part-trained in ``root``."""
    runs = done = trained = training = 0
    for job in grid.jobs:
        if not isinstance(job, RunJob):
            continue
        runs += 1
        left = _left(job, grid, root, records_root)
        if not left:
            done += 1
        elif not any(step.startswith("train (") for step in left):
            trained += 1
        elif RunDir(root / job.name).started:
            training += 1
    where = f"{root}" + (" or its committed records" if records_root else "")
    return f"{done}/{runs} run jobs done, {trained} more trained with attacks left, {training} part-trained, in {where}"


def _restore_from_record(run_dir: Path, job: RunJob, grid: Grid, records_root, data_root, log) -> None:
    """A run missing here whose committed record exists (a new machine) is restored from it: the attacks
    left go on without retraining."""
    if records_root is None or RunDir(run_dir).started:
        return
    record = RunDir(records_root / grid.name / job.name)
    if not record.is_record:
        return
    from reproduce import records

    records.restore_record(record, run_dir, data_root=data_root)
    log(f"[grid] restored {run_dir} from its record (trained; the attacks left go on)")


def _save_record(rd: RunDir, grid: Grid, records_root, log) -> None:
    """Save (replace) the run's record under ``records_root/<grid>`` when the grid keeps records; a run the
    record rules refuse is logged, not fatal (the grid goes on)."""
    if records_root is None:
        return
    from reproduce import records

    try:
        out = records.save_record(rd, records_root, grid=grid.name, replace=True)
    except (OSError, ValueError) as err:
        log(f"[grid] no record of {rd.path}: {err}")
        return
    log(f"[grid] record saved: {out}")


def _write_table(job: TableJob, grid: Grid, root: Path, data_root, device, threads, out_dir, log) -> None:
    from reproduce import paper_numbers, table
    from reproduce.presets import preset

    data = table.resolve_dataset(paper_numbers.table(job.number)["dataset"], data_root)
    opts = table.Options(
        preset=grid.preset,
        runs_root=root,
        seeds=list(job.seeds or [preset(grid.preset)["seed"]]),
        data=data,
        device=device,
        attacks=job.attacks,
        threads=threads,
        log=log,
    )
    out = Path(out_dir) / job.out
    table.write_table(job.number, opts, out)
    log(f"[grid] wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m reproduce.grid",
        description=__doc__.split("\n\n")[0],
        epilog="grids: " + "; ".join(f"{g.name}: {g.description}" for g in GRIDS.values()),
    )
    p.add_argument("name", nargs="?", choices=tuple(GRIDS), help="the grid to run: " + ", ".join(GRIDS))
    p.add_argument("--list", action="store_true", help="list the grids and how much of each is left")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    p.add_argument("--runs-root", help="where the runs live (default runs/<the grid's preset>)")
    p.add_argument("--data-root", help="folder with the datasets (cpu: default <repo>/../shared/data)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only the runs whose name matches this shell pattern (repeatable), e.g. '*sigma0.1/seed125'",
    )
    p.add_argument(
        "--train-only", action="store_true", help="train the runs, attack none (a later run of the grid attacks them)"
    )
    p.add_argument(
        "--no-records",
        action="store_true",
        help="do not save the runs' records into reproduce/results/runs (the cpu and regime grids do by default)",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.list:
        from reproduce.records import RECORDS_ROOT

        for g in GRIDS.values():
            root = Path(args.runs_root or f"runs/{g.preset}")
            recs = RECORDS_ROOT if g.records and not args.no_records else None
            print(f"{g.name}: {g.description}; {progress_text(g, root, recs)}")
        return 0
    if args.name is None:
        p.error("name a grid (or --list)")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    try:
        select_jobs(GRIDS[args.name], args.only)
    except ValueError as err:
        p.error(str(err))
    if args.data_root is not None and not Path(args.data_root).is_dir():
        print(f"error: --data-root {args.data_root} is not a folder", file=sys.stderr)
        return 2
    try:
        lines = run_grid(
            args.name,
            runs_root=args.runs_root,
            data_root=args.data_root,
            device=args.device,
            threads=args.threads,
            dry_run=args.dry_run,
            records_root=False if args.no_records else None,
            only=args.only,
            train_only=args.train_only,
            log=lambda m: print(m, file=sys.stderr),
        )
    except KeyboardInterrupt:
        print(f"[grid] interrupted; continue with `python -m reproduce.grid {args.name}` (it resumes)", file=sys.stderr)
        return 130
    if not lines:
        print(f"[grid] {args.name}: everything is done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
