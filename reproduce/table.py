"""The paper's tables, reproduced: ``python -m reproduce.table --table N --preset P --runs-root DIR --out T.md``.

For table ``N`` (1-9) it lists the arms the paper reports (dataset, architecture, cut, defence, with and
without CEM) and collects their runs below ``DIR``: ``DIR/<arm name>/seed<S>/``, or any run there whose
``config.json`` is the arm's (e.g. ``runs/noise_nopeek_cem`` made by ``reproduce.train --out``). Missing
cells read "—" and the command prints how to make them. ``--run-missing`` trains what is missing
(``reproduce.pipeline.ensure_trained``) and attacks it (``ensure_attacked``: the decoder attack, train-
and inference-time, and the GAN attack); a finished run or attack is skipped, an interrupted one resumes.

Tables 1-8: one row per defence without CEM and one with CEM, columns accuracy, MSE, SSIM and PSNR of
the decoder and GAN attacks, each beside the paper's number (``reproduce.paper_numbers``); then the
gain of CEM per defence (MSE with CEM / MSE without) and on average. Table 9: parameters, MMAC per
image and latency (a batch of 128) of the encoder and the server, PATROL and the others, with and
without CEM (``reproduce.table_efficiency``). Writes ``T.md`` and ``T.csv``. Several ``--seeds``: mean ± std per cell.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shlex
import statistics
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from reproduce import paper_numbers, pipeline
from reproduce.machine import default_device
from reproduce.rundir import RunDir, find_runs
from reproduce.train_config import DEFAULT_PRESET

TABLES = tuple(range(1, 10))
PRESETS = ("smoke", "cpu", "paper")
ATTACKS = ("decoder", "gan")
ATTACK_SETTINGS = ("train_time", "infer_time")
MISSING = "—"
DATASET_MISSING = "n/a: dataset missing"
NOISE_DEFENCES = ("noise", "noise_nopeek", "noise_arl")

# Our metric key -> (attack, setting, key in the attack report's metrics). The PSNR is the authors'
# per-batch average, the number the paper prints; SSIM/PSNR are the train-time attack's (scored on
# held-out test images, the paper's "validation set").
ATTACK_METRICS = {
    "dec_train_mse": ("decoder", "train_time", "mse"),
    "dec_infer_mse": ("decoder", "infer_time", "mse"),
    "gan_train_mse": ("gan", "train_time", "mse"),
    "gan_infer_mse": ("gan", "infer_time", "mse"),
    "dec_ssim": ("decoder", "train_time", "ssim"),
    "dec_psnr": ("decoder", "train_time", "psnr_per_batch_authors"),
    "gan_ssim": ("gan", "train_time", "ssim"),
    "gan_psnr": ("gan", "train_time", "psnr_per_batch_authors"),
}
# The ladder's worst case at train time: the lowest MSE over these attacks, shown only when the run has at least
# LADDER_REQUIRED of them (a decoder alone is no worst case).
LADDER_ATTACKS = ("decoder", "whitebox", "adaptive", "gan")
LADDER_REQUIRED = ("decoder", "whitebox", "adaptive")
WORST_KEY = "worst_train_mse"
MSE_KEYS = (WORST_KEY, "dec_train_mse", "dec_infer_mse", "gan_train_mse", "gan_infer_mse")
HEADERS = {
    "acc": "Acc. (%)",
    WORST_KEY: "Worst MSE Train (ladder)",
    "dec_train_mse": "Dec. MSE Train",
    "dec_infer_mse": "Dec. MSE Infer",
    "gan_train_mse": "GAN MSE Train",
    "gan_infer_mse": "GAN MSE Infer",
    "dec_ssim": "Dec. SSIM",
    "dec_psnr": "Dec. PSNR",
    "gan_ssim": "GAN SSIM",
    "gan_psnr": "GAN PSNR",
    "enc_params_m": "Enc. params (M)",
    "enc_mmac": "Enc. MMAC",
    "enc_time_ms": "Enc. time (ms)",
    "srv_params_m": "Server params (M)",
    "srv_mmac": "Server MMAC",
    "srv_time_ms": "Server time (ms)",
}
# Table 9's rows: paper row -> the defence that stands for it.
EFFICIENCY_ROWS = {"PATROL": "patrol", "OTHERS": "bottleneck"}
DECIMALS = {"acc": 2, "ssim": 3, "psnr": 2, "mse": 4, "params_m": 3, "mmac": 2, "time_ms": 2}


def _decimals(key: str) -> int:
    return next(d for suffix, d in DECIMALS.items() if key.endswith(suffix))


# ----------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    """One trained configuration of a table: a paper row with or without CEM."""

    row: str  # the paper's row label without "+CEM", e.g. "Bottleneck" ("OTHERS" in Table 9)
    defence: str  # reproduce.defences registry name
    cem: bool
    dataset: str  # the dataset the paper uses (before resolving to the data found)
    arch: str
    sigma: float = 0.025
    cem_lambda: float = 16.0
    cem_variant: str = "paper"

    @property
    def label(self) -> str:
        return f"{self.row} — {'w/ CEM' if self.cem else 'w/o CEM'}"

    @property
    def paper_row(self) -> str:
        return self.row + ("+CEM" if self.cem else "")

    def name(self, dataset: str) -> str:
        """Directory name of this arm trained on ``dataset`` (the resolved one)."""
        lam = self.cem_lambda if self.cem else 0.0
        name = f"{dataset}_{self.arch}_{self.defence}_lam{lam:g}_sigma{self.sigma:g}"
        return name + (f"_{self.cem_variant}" if self.cem and self.cem_variant != "paper" else "")

    def train_args(self) -> list[str]:
        args = [
            "--arch",
            self.arch,
            "--defense",
            self.defence,
            "--sigma",
            repr(self.sigma),
            "--cem-lambda",
            repr(self.cem_lambda if self.cem else 0.0),
        ]
        if self.cem:
            args += ["--cem-variant", self.cem_variant]
        return args


def table_arms(number: int, sigma: float = 0.025, cem_lambda: float = 16.0, cem_variant: str = "paper") -> list[Arm]:
    """The arms of table ``number`` in the paper's row order."""
    spec = paper_numbers.table(number)
    if number == 9:
        return [
            Arm(row, EFFICIENCY_ROWS[row], cem, spec["dataset"], spec["arch"], sigma, cem_lambda, cem_variant)
            for row in spec["rows"]
            for cem in (False, True)
        ]
    arms = []
    for label in spec["rows"]:
        if label in paper_numbers.AVERAGE_ROWS:
            continue
        row = label.removesuffix("+CEM")
        arms.append(
            Arm(
                row,
                paper_numbers.DEFENCE_OF_ROW[row],
                label.endswith("+CEM"),
                spec["dataset"],
                spec["arch"],
                sigma,
                cem_lambda,
                cem_variant,
            )
        )
    return arms


def table_columns(number: int) -> tuple[str, ...]:
    """The table's own columns, then its companion's (MSE <-> SSIM/PSNR of the same dataset)."""
    spec = paper_numbers.table(number)
    cols = list(spec["columns"])
    if "dec_train_mse" in cols:  # the headline: the ladder's worst case, before the paper's attack columns
        cols.insert(cols.index("dec_train_mse"), WORST_KEY)
    if spec["companion"] is not None:
        cols += [c for c in paper_numbers.table(spec["companion"])["columns"] if c not in cols]
    return tuple(cols)


def paper_value(number: int, row: str, column: str) -> Optional[float]:
    """The paper's value for a cell of our table ``number`` (from the table or its companion)."""
    for n in (number, paper_numbers.table(number)["companion"]):
        if n is not None and column in paper_numbers.table(n)["columns"]:
            return paper_numbers.value(n, row, column)
    return None


# ----------------------------------------------------------------------------- data


class DatasetMissing(Exception):
    """The table's dataset is not available here."""


@dataclass(frozen=True)
class ResolvedData:
    name: str  # the dataset name runs are trained on
    data_root: Optional[str]  # passed as --data-root (None: train's default)
    note: str


def resolve_dataset(name: str, data_root: Optional[str], download: bool = False) -> ResolvedData:
    """Find ``name`` under ``data_root`` (or the default root); CIFAR-10 falls back to the shipped sample.

    Raises DatasetMissing (with the loader's reason) when nothing usable is found.
    """
    from reproduce.data import load_dataset

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the FaceScrub stand-in warning: we report it in the note
            ds = load_dataset(name, "test", data_root=data_root, download=download)
    except FileNotFoundError as err:
        if name == "cifar10":
            return ResolvedData(
                "cifar10-sample",
                None,
                "cifar10 not found: the shipped offline sample "
                "(5,000 + 1,000 real CIFAR-10 images; pass --data-root for the full set)",
            )
        raise DatasetMissing(str(err)) from None
    used = ds.info.name
    note = f"{used} from {getattr(ds, 'source', '?')}"
    if used != name:
        note += f" (stand-in for {name}: {ds.info.num_classes} classes)"
    return ResolvedData(used, data_root, note)


# ----------------------------------------------------------------------------- reading runs


def final_accuracy(run_dir: str | Path) -> Optional[float]:
    """Test accuracy (%) of the last finished epoch, if training finished."""
    acc = RunDir(run_dir).final_accuracy()
    return None if acc is None else 100.0 * acc


def collect_run(run_dir: str | Path) -> dict:
    """Everything tables 1-8 show of one run: ``{"acc": %, "dec_train_mse": ..., ...}`` (None if missing)."""
    rd = RunDir(run_dir)
    out: dict[str, Optional[float]] = {"acc": final_accuracy(rd.path)}
    for key, (attack, setting, metric) in ATTACK_METRICS.items():
        out[key] = rd.attack_metric(attack, setting, metric)
    out[WORST_KEY] = worst_case_mse(rd)
    return out


def worst_case_mse(run_dir, setting: str = "train_time") -> Optional[float]:
    """The lowest MSE over the ladder's attacks (``LADDER_ATTACKS``) of ``setting``; None unless every attack of
    ``LADDER_REQUIRED`` has a result there."""
    rd = RunDir(run_dir)
    mses = {a: rd.attack_metric(a, setting, "mse") for a in LADDER_ATTACKS}
    if any(mses[a] is None for a in LADDER_REQUIRED):
        return None
    return min(v for v in mses.values() if v is not None)


# ----------------------------------------------------------------------------- running


@dataclass
class Options:
    preset: str
    runs_root: Path
    seeds: list[int]
    data: Optional[ResolvedData]
    device: Optional[str]
    attacks: tuple[str, ...]
    train_overrides: dict = field(default_factory=dict)  # reproduce.train settings for every arm
    attack_overrides: dict = field(default_factory=dict)  # reproduce.attack.run_attack overrides
    threads: Optional[int] = None
    arm_options: dict = None  # sigma, cem_lambda, cem_variant of table_arms
    log: Callable[[str], None] = print
    runs_label: Optional[str] = None  # how the tables name runs_root (default: the path itself)
    _found: Optional[list] = field(default=None, repr=False)  # (RunDir, config) of the runs under runs_root


def _matches(cfg: dict, arm: Arm, dataset: str, seed: int, preset: str) -> bool:
    lam = arm.cem_lambda if arm.cem else 0.0
    return (
        cfg.get("preset") == preset
        and cfg.get("dataset") == dataset
        and cfg.get("arch") == arm.arch
        and cfg.get("defence") == arm.defence
        and cfg.get("seed") == seed
        and float(cfg.get("cem_lambda", -1.0)) == lam
        and float(cfg.get("sigma", -1.0)) == arm.sigma
        and (not arm.cem or cfg.get("cem_variant") == arm.cem_variant)
    )


def run_dir_of(arm: Arm, seed: int, opts: Options) -> RunDir:
    """Where ``arm``'s run of ``seed`` lives: ``ROOT/<arm name>/seed<S>`` (the layout this module trains),
    else any run below ROOT whose config.json is that arm (e.g. ``runs/noise_nopeek_cem`` from
    ``reproduce.train --out``), a finished one first; else the layout's path, where it would be trained."""
    canonical = RunDir(opts.runs_root / arm.name(opts.data.name) / f"seed{seed}")
    if canonical.started:
        return canonical
    if opts._found is None:
        opts._found = [(rd, rd.read_config()) for rd in find_runs(opts.runs_root)]
    hits = [rd for rd, cfg in opts._found if _matches(cfg, arm, opts.data.name, seed, opts.preset)]
    hits.sort(key=lambda rd: not rd.finished)
    return hits[0] if hits else canonical


def _train_settings(arm: Arm, seed: int, opts: Options) -> dict:
    settings = {
        "dataset": opts.data.name,
        "seed": seed,
        "arch": arm.arch,
        "defence": arm.defence,
        "sigma": arm.sigma,
        "cem_lambda": arm.cem_lambda if arm.cem else 0.0,
    }
    if arm.cem:
        settings["cem_variant"] = arm.cem_variant
    return {**settings, **opts.train_overrides}


def ensure_trained(arm: Arm, seed: int, opts: Options) -> Path:
    """Train ``arm`` with ``seed`` unless finished; resume an interrupted run. Returns the run directory."""
    rd = run_dir_of(arm, seed, opts)
    pipeline.ensure_trained(
        rd,
        preset=opts.preset,
        overrides=_train_settings(arm, seed, opts),
        data_root=opts.data.data_root,
        device=opts.device,
        threads=opts.threads,
        log=opts.log,
    )
    return rd.path


def ensure_attacked(run_dir: Path, attack: str, seed: int, opts: Options) -> None:
    """Run ``attack`` on ``run_dir`` for each setting its record lacks (the attack resumes its own state)."""
    pipeline.ensure_attacked(
        run_dir,
        attack,
        ATTACK_SETTINGS,
        preset=opts.preset,
        device=opts.device or default_device(),
        overrides={"seed": seed, **opts.attack_overrides},
        log=opts.log,
    )


def missing_runs_text(arms: Sequence[Arm], opts: Options) -> list[str]:
    """One line per run of ``arms`` x seeds that is not finished or not attacked, with the command that makes it."""
    lines = []
    root = f" --data-root {opts.data.data_root}" if opts.data.data_root else ""
    for arm in arms:
        for seed in opts.seeds:
            rd = run_dir_of(arm, seed, opts)
            s = _train_settings(arm, seed, opts)
            if not rd.finished:
                variant = f" --cem-variant {s['cem_variant']}" if "cem_variant" in s else ""
                lines.append(
                    f"- {arm.label}, seed {seed} ({rd.status()}): python -m reproduce.train --preset "
                    f"{opts.preset} --dataset {s['dataset']}{root} --arch {s['arch']} --defence "
                    f"{s['defence']} --sigma {s['sigma']:g} --cem-lambda {s['cem_lambda']:g}{variant} "
                    f"--seed {seed} --out {rd.path}" + (" --resume" if rd.started else "")
                )
            for attack in opts.attacks:
                todo = rd.missing_settings(attack, ATTACK_SETTINGS)
                if todo:
                    lines.append(
                        f"- {arm.label}, seed {seed}: python -m reproduce.attack --run {rd.path} "
                        f"--attack {attack} --preset {opts.preset} --seed {seed} --setting "
                        f"{todo[0] if len(todo) == 1 else 'both'}"
                    )
    return lines


# ----------------------------------------------------------------------------- cells


def summarize(values: Sequence[Optional[float]]) -> dict:
    """``{"mean", "std", "n", "of"}`` of the values present (std 0 for one value, None for none)."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return {"mean": None, "std": None, "n": 0, "of": len(values)}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "n": len(present), "of": len(values)}


def format_cell(cell: dict, key: str) -> str:
    if cell.get("status"):
        return cell["status"]
    if cell["mean"] is None:
        return MISSING
    d = _decimals(key)
    text = f"{cell['mean']:.{d}f}"
    if cell["of"] > 1:
        text += f" ± {cell['std']:.{d}f}"
        if cell["n"] < cell["of"]:
            text += f" ({cell['n']}/{cell['of']} seeds)"
    return text


def format_paper(value: Optional[float], key: str) -> str:
    return MISSING if value is None else f"{value:.{_decimals(key)}f}"


def cem_gains(means: dict[tuple[str, bool], dict], rows: Sequence[str], keys: Sequence[str] = MSE_KEYS) -> dict:
    """Relative gain of CEM: MSE with CEM / MSE without, per defence row and on average.

    ``means[(row, cem)][key]`` is a number or None. Returns ``{"per_row": {row: {key: ratio}},
    "mean_ratio": {key: ...}, "ratio_of_means": {key: ...}, "count": {key: defences with both}}``;
    the averages use only defences that have both arms.
    """
    per_row = {row: {} for row in rows}
    mean_ratio, ratio_of_means, count = {}, {}, {}
    for key in keys:
        ratios, without, with_ = [], [], []
        for row in rows:
            a = means.get((row, False), {}).get(key)
            b = means.get((row, True), {}).get(key)
            if a is None or b is None or a <= 0:
                per_row[row][key] = None
                continue
            per_row[row][key] = b / a
            ratios.append(b / a)
            without.append(a)
            with_.append(b)
        count[key] = len(ratios)
        mean_ratio[key] = statistics.fmean(ratios) if ratios else None
        ratio_of_means[key] = statistics.fmean(with_) / statistics.fmean(without) if ratios else None
    return {"per_row": per_row, "mean_ratio": mean_ratio, "ratio_of_means": ratio_of_means, "count": count}


def _paper_gains(number: int) -> dict:
    """The same gains from the paper's printed MSE rows (this table's MSE companion)."""
    mse_table = (
        number
        if "dec_train_mse" in paper_numbers.table(number)["columns"]
        else paper_numbers.table(number)["companion"]
    )
    spec = paper_numbers.table(mse_table)
    rows = [r for r in spec["rows"] if "+" not in r and r not in paper_numbers.AVERAGE_ROWS and r != "No_defense"]
    means = {
        (r.removesuffix("+CEM"), r.endswith("+CEM")): dict(zip(spec["columns"], v))
        for r, v in spec["rows"].items()
        if r not in paper_numbers.AVERAGE_ROWS
    }
    return cem_gains(means, rows)


def _fmt_ratio(r: Optional[float]) -> str:
    return MISSING if r is None else f"{r:.2f}× ({100 * (r - 1):+.1f}%)"


# ----------------------------------------------------------------------------- tables 1-8


def collect_cells(
    arms: Sequence[Arm],
    columns: Sequence[str],
    opts: Options,
    errors: list[str],
    produce: Optional[Callable[[Arm, int], Path]],
    measure: Callable[[Path], dict],
) -> dict:
    """Every arm's cells: per seed, ``produce(arm, seed)`` (train / attack what is missing; None: nothing) then
    ``measure(run_dir)``; one failing arm is an error line and missing cells, not a lost table."""
    cells: dict[Arm, dict[str, dict]] = {}
    for arm in arms:
        if opts.data is None:
            cells[arm] = {k: {"status": DATASET_MISSING} for k in columns}
            continue
        per_seed = []
        for seed in opts.seeds:
            run_dir = run_dir_of(arm, seed, opts).path
            try:
                if produce is not None:
                    run_dir = produce(arm, seed)
                per_seed.append(measure(run_dir))
            except KeyboardInterrupt:
                raise
            except Exception as err:  # one failing arm must not lose the others
                errors.append(f"{arm.label} (seed {seed}): {type(err).__name__}: {err}")
                opts.log(traceback.format_exc())
                per_seed.append(_measure_what_exists(measure, run_dir, columns))
        cells[arm] = {k: summarize([r[k] for r in per_seed]) for k in columns}
    return cells


def _measure_what_exists(measure: Callable[[Path], dict], run_dir: Path, columns: Sequence[str]) -> dict:
    """After a failure: the cells that the run's files still give (e.g. the decoder's when the GAN failed)."""
    try:
        return measure(run_dir)
    except Exception:  # noqa: BLE001 - the failure is already reported; nothing more to show
        return dict.fromkeys(columns)


def wanted(arm: Arm, run_defences: Optional[set[str]]) -> bool:
    """Whether ``--defences`` asks to train and attack ``arm`` (None: every arm)."""
    return run_defences is None or arm.defence in run_defences


def build_result_table(
    number: int, opts: Options, run: bool, run_defences: Optional[set[str]], errors: list[str]
) -> dict:
    """Collect (and with ``run``, first produce) every cell of table ``number`` (1-8)."""
    arms = table_arms(number, **(opts.arm_options or {}))
    columns = table_columns(number)

    def produce(arm: Arm, seed: int) -> Path:
        if not (run and wanted(arm, run_defences)):
            return run_dir_of(arm, seed, opts).path
        run_dir = ensure_trained(arm, seed, opts)
        for attack in opts.attacks:
            ensure_attacked(run_dir, attack, seed, opts)
        return run_dir

    cells = collect_cells(arms, columns, opts, errors, produce, collect_run)
    return {"number": number, "arms": arms, "columns": columns, "cells": cells}


def _average_rows(result: dict) -> dict[bool, dict[str, dict]]:
    """Our 'Average w/o CEM' / 'w/ CEM' rows: per column, over defences (not No_defense) with both arms."""
    arms = [a for a in result["arms"] if a.row != "No_defense"]
    rows = sorted({a.row for a in arms}, key=[a.row for a in arms].index)
    out = {False: {}, True: {}}
    for key in result["columns"]:
        vals = {(a.row, a.cem): result["cells"][a][key].get("mean") for a in arms}
        both = [r for r in rows if vals.get((r, False)) is not None and vals.get((r, True)) is not None]
        for cem in (False, True):
            if not both:
                status = DATASET_MISSING if result["cells"][arms[0]][key].get("status") else None
                out[cem][key] = {"mean": None, "std": None, "n": 0, "of": 1, "status": status}
            else:
                out[cem][key] = {
                    "mean": statistics.fmean(vals[(r, cem)] for r in both),
                    "std": 0.0,
                    "n": 1,
                    "of": 1,
                    "count": len(both),
                    "of_rows": len(rows),
                }
    return out


def _strength_lines(opts: Options) -> list[str]:
    """The CEM strengths of the runs found, in the paper's units (``reproduce.strength``), and the worst case's rule."""
    from reproduce.strength import run_paper_units

    seen = set()
    for _, cfg in opts._found or []:
        units = run_paper_units(cfg)
        if units is not None:
            seen.add(
                (
                    float(cfg["cem_lambda"]),
                    cfg.get("cem_variant"),
                    cfg.get("cem_schedule", "constant"),
                    cfg["train_size"],
                    round(units, 4),
                )
            )
    lines = [
        f"- {HEADERS[WORST_KEY]}: the lowest train-time MSE over the attacks {', '.join(LADDER_ATTACKS)} that ran "
        f"(shown only when {', '.join(LADDER_REQUIRED)} all did)"
    ]
    for lam, variant, schedule, n, units in sorted(seen):
        lines.append(
            f"- CEM lambda {lam:g} ({variant}, {schedule} weight) on N = {n:,} training images: "
            f"{units:g} in the paper's units (its strength at the paper's N = 50,000)"
        )
    return lines


def result_markdown(result: dict, opts: Options, errors: Sequence[str]) -> str:
    number, columns = result["number"], result["columns"]
    spec = paper_numbers.table(number)
    lines = [
        f"# Table {number} (reproduction): {spec['dataset']}, {spec['arch']}",
        "",
        f"Paper: {spec['caption']}",
        "",
        f"- preset: `{opts.preset}`; seeds: {', '.join(map(str, opts.seeds))}; runs: `{opts.runs_label or opts.runs_root}`",
        f"- data: {opts.data.note if opts.data else DATASET_MISSING}",
        "- each metric is followed by the paper's number (\"paper\"); PSNR is the authors' per-batch "
        "average; SSIM/PSNR are of the train-time attack, scored on held-out test images",
        "- averages: over the defences (not No_defense) that have both arms in this column",
        *_strength_lines(opts),
        "",
    ]
    header = ["Method"] + [h for k in columns for h in (HEADERS[k], "paper")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in result["arms"]:
        cells = result["cells"][arm]
        row = [arm.label] + [
            x
            for k in columns
            for x in (format_cell(cells[k], k), format_paper(paper_value(number, arm.paper_row, k), k))
        ]
        lines.append("| " + " | ".join(row) + " |")
    averages = _average_rows(result)
    for cem, label in ((False, "Average w/o CEM"), (True, "Average w/ CEM")):
        row = [label]
        for k in columns:
            cell = averages[cem][k]
            text = format_cell(cell, k)
            if cell.get("count") is not None and cell["count"] < cell["of_rows"]:
                text += f" ({cell['count']} of {cell['of_rows']})"
            row += [text, format_paper(paper_value(number, label, k), k)]
        lines.append("| " + " | ".join(row) + " |")

    means = {(a.row, a.cem): {k: result["cells"][a][k].get("mean") for k in MSE_KEYS} for a in result["arms"]}
    rows = [r for r in dict.fromkeys(a.row for a in result["arms"]) if r != "No_defense"]
    ours, paper = cem_gains(means, rows), _paper_gains(number)
    lines += ["", "## Gain of CEM: reconstruction MSE with CEM / without CEM (higher = more robust)", ""]
    header = ["Defence"] + [h for k in MSE_KEYS for h in (HEADERS[k], "paper")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [r]
                + [x for k in MSE_KEYS for x in (_fmt_ratio(ours["per_row"][r][k]), _fmt_ratio(paper["per_row"][r][k]))]
            )
            + " |"
        )
    for name, title in (("mean_ratio", "Mean of the ratios"), ("ratio_of_means", "Ratio of the averages")):
        lines.append(
            "| "
            + " | ".join(
                [title] + [x for k in MSE_KEYS for x in (_fmt_ratio(ours[name][k]), _fmt_ratio(paper[name][k]))]
            )
            + " |"
        )
    mse_table = number if number in paper_numbers.STATED_AVERAGE_GAIN else spec["companion"]
    stated = paper_numbers.STATED_AVERAGE_GAIN.get(mse_table)
    if stated:
        lines += [
            "",
            f"The paper's text states an average MSE increase of {100 * stated['train']:.1f}% "
            f"(training data) and {100 * stated['infer']:.1f}% (inference data) for this dataset.",
        ]
    notes = [
        f"- paper, {r} / {HEADERS[c]}: {text}"
        for (n, r, c), text in paper_numbers.NOTES.items()
        if n in (number, spec["companion"]) and c in columns
    ]
    if notes:
        lines += ["", "Notes on the paper's numbers:", *notes]
    if errors:
        lines += ["", "Errors (these cells are missing):", *[f"- {e}" for e in errors]]
    return "\n".join(lines) + "\n"


def result_csv_rows(result: dict) -> list[dict]:
    number = result["number"]
    rows = []
    averages = _average_rows(result)
    entries = [(a.label, a.defence, a.cem, a.paper_row, result["cells"][a]) for a in result["arms"]]
    entries += [
        ("Average w/o CEM", "", False, "Average w/o CEM", averages[False]),
        ("Average w/ CEM", "", True, "Average w/ CEM", averages[True]),
    ]
    for label, defence, cem, paper_row, cells in entries:
        row = {"table": number, "method": label, "defence": defence, "cem": int(cem)}
        status = ""
        for k in result["columns"]:
            c = cells[k]
            status = status or (c.get("status") or "")
            row[k] = "" if c.get("mean") is None else c["mean"]
            row[f"{k}_std"] = "" if c.get("mean") is None else c["std"]
            row[f"{k}_n"] = c.get("n", 0)
            p = paper_value(number, paper_row, k)
            row[f"{k}_paper"] = "" if p is None else p
        row["status"] = status
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- CLI


def csv_text(rows: list[dict]) -> str:
    """The table's CSV (``csv`` module defaults: CRLF line ends), as ``write_table`` writes it."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(csv_text(rows))
    tmp.replace(path)


def _write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def render_table(
    number: int, opts: Options, *, run_missing: bool = False, run_defences: Optional[set[str]] = None
) -> tuple[dict, str, list[dict], list[str]]:
    """Table ``number`` from the runs below ``opts.runs_root`` (training and attacking what is missing when
    ``run_missing``): (result, markdown, csv rows, errors). Writes no file."""
    errors: list[str] = []
    if number == 9:
        from reproduce.table_efficiency import build_efficiency_table, efficiency_csv_rows, efficiency_markdown

        result = build_efficiency_table(opts, run_missing, run_defences, errors)
        text, rows = efficiency_markdown(result, opts, errors), efficiency_csv_rows(result)
    else:
        result = build_result_table(number, opts, run_missing, run_defences, errors)
        text, rows = result_markdown(result, opts, errors), result_csv_rows(result)
    return result, text, rows, errors


def write_table(
    number: int, opts: Options, out: Path, *, run_missing: bool = False, run_defences: Optional[set[str]] = None
) -> tuple[dict, str, list[str]]:
    """Build table ``number`` from the runs below ``opts.runs_root`` (training and attacking what is missing
    when ``run_missing``), write ``out`` (markdown) and its ``.csv``; returns (result, markdown, errors)."""
    result, text, rows, errors = render_table(number, opts, run_missing=run_missing, run_defences=run_defences)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_text(text, out)
    _write_csv(rows, out.with_suffix(".csv"))
    return result, text, errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m reproduce.table",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--table", type=int, required=True, choices=TABLES)
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=PRESETS,
        help=f"training and attack budget (default {DEFAULT_PRESET}, as reproduce.train's)",
    )
    p.add_argument(
        "--runs-root",
        default=None,
        help="where the arms' runs live: ROOT/<arm>/seed<S>, or any run below ROOT whose config is "
        "the arm's (default runs/<preset>)",
    )
    p.add_argument("--out", default=None, help="output markdown file (default table<N>_<preset>.md); a .csv beside it")
    p.add_argument(
        "--run-missing",
        action="store_true",
        help="train and attack the arms that are missing (without it the table lists them and the "
        "commands that make them)",
    )
    p.add_argument("--no-run", action="store_true", help="only collect the runs that exist (the default)")
    p.add_argument("--data-root", default=None, help="folder with the datasets (default: train's default)")
    p.add_argument("--download", action="store_true", help="let torchvision download a missing CIFAR set")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the preset's)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for training and attacks")
    p.add_argument(
        "--defences",
        nargs="+",
        default=None,
        help="run only these defences (registry names or paper labels); the table still lists all",
    )
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS), help="attacks to run")
    p.add_argument("--sigma", type=float, default=0.025, help="noise std / CEM sigma (paper: 0.025)")
    p.add_argument("--cem-lambda", type=float, default=16.0, help="CEM weight of the w/ CEM arms (paper: 16)")
    p.add_argument("--cem-variant", default="paper", choices=("paper", "official", "official-trained"))
    p.add_argument("--train-args", default="", help="extra reproduce.train flags for every arm, one string")
    p.add_argument(
        "--attack-args",
        default="",
        help="extra attack settings, one string: --epochs N, --batch-size "
        "B, --max-train-images N, --max-test-images N, --noise-aware",
    )
    return p


def _parse_defences(names: Optional[list[str]]) -> Optional[set[str]]:
    if names is None:
        return None
    from reproduce.defences import canonical_name

    labels = {k.lower(): v for k, v in paper_numbers.DEFENCE_OF_ROW.items()}
    labels["others"] = "bottleneck"
    return {labels.get(n.lower()) or canonical_name(n) for n in names}


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; returns 0, or 1 if an arm failed (its cells are then missing)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_defences = _parse_defences(args.defences)
    except ValueError as err:
        parser.error(f"--defences: {err}")
    if run_defences is not None:
        arms = table_arms(args.table)
        in_table = {a.defence for a in arms}
        absent = sorted(run_defences - in_table)
        if absent:
            parser.error(
                f"--defences: {', '.join(absent)} is not a defence of table {args.table} "
                f"(its defences: {', '.join(sorted(in_table))}); train other arms with reproduce.train"
            )
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must not repeat a seed")
    if args.sigma <= 0 or args.cem_lambda <= 0:
        parser.error("--sigma and --cem-lambda must be > 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    from reproduce.presets import preset

    seeds = args.seeds if args.seeds is not None else [preset(args.preset)["seed"]]
    runs_root = Path(args.runs_root or f"runs/{args.preset}")
    out = Path(args.out or f"table{args.table}_{args.preset}.md")
    dataset = paper_numbers.table(args.table)["dataset"]
    try:
        data = resolve_dataset(dataset, args.data_root, download=args.download)
    except DatasetMissing as err:
        print(f"[table] {dataset}: {err}; its cells read '{DATASET_MISSING}'", file=sys.stderr)
        data = None
    if args.run_missing and args.no_run:
        parser.error("--run-missing and --no-run contradict each other")
    try:
        train_settings = pipeline.train_overrides(args.train_args)
        attack_settings = attack_overrides(args.attack_args)
    except (ValueError, SystemExit) as err:
        parser.error(f"--train-args / --attack-args: {err}")
    opts = Options(
        preset=args.preset,
        runs_root=runs_root,
        seeds=seeds,
        data=data,
        device=args.device,
        attacks=tuple(args.attacks),
        train_overrides=train_settings,
        attack_overrides=attack_settings,
        threads=args.threads,
        arm_options={"sigma": args.sigma, "cem_lambda": args.cem_lambda, "cem_variant": args.cem_variant},
        log=lambda msg: print(msg, file=sys.stderr),
    )
    try:
        result, text, errors = write_table(
            args.table, opts, out, run_missing=args.run_missing, run_defences=run_defences
        )
    except KeyboardInterrupt:
        print(
            "[table] interrupted; rerun the same command to continue (finished runs and attacks are kept, "
            "the interrupted one resumes)",
            file=sys.stderr,
        )
        return 130
    print(text)
    print(f"wrote {out} and {out.with_suffix('.csv')}", file=sys.stderr)
    if data is not None and not args.run_missing:
        arms = [a for a in result["arms"] if run_defences is None or a.defence in run_defences]
        missing = missing_runs_text(arms, opts)
        if missing:
            print(
                f"[table] {len(missing)} run(s) or attack(s) missing (their cells read '{MISSING}'); make them "
                "with the commands below, or rerun this command with --run-missing:",
                file=sys.stderr,
            )
            print("\n".join(missing), file=sys.stderr)
    return 1 if errors else 0


def attack_overrides(flags: str) -> dict:
    """The attack settings a string of ``--attack-args`` flags sets."""
    p = argparse.ArgumentParser(prog="--attack-args", add_help=False, exit_on_error=False)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-train-images", type=int)
    p.add_argument("--max-test-images", type=int)
    p.add_argument("--noise-aware", action="store_true", default=None)
    try:
        parsed = p.parse_args(shlex.split(flags))
    except argparse.ArgumentError as err:
        raise ValueError(str(err)) from None
    out = {k: v for k, v in vars(parsed).items() if v is not None}
    bad = [k for k, v in out.items() if isinstance(v, int) and not isinstance(v, bool) and v < 1]
    if bad:
        raise ValueError(f"--attack-args: {', '.join(bad)} must be >= 1")
    return out


if __name__ == "__main__":
    sys.exit(main())
