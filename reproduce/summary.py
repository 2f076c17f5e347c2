"""One markdown row per run: ``python -m reproduce.summary RUN... [--by-arm] [--out FILE.md]``.

Reads each run's config.json, metrics.jsonl and attack_*.json (nothing is recomputed): defence, sigma,
CEM weight and variant, epochs done, the last epoch's test accuracy, the training wall time (the sum of
the epochs' times, so a paused or resumed run counts only its working time), the last clean-feature
variance, and the decoder and GAN attacks' test MSE / SSIM where they exist. Unfinished runs are marked.
``--by-arm`` instead gives one row per arm (the seeds of ``ARM/seed<N>``, reproduce.table's layout): the
mean, the sample standard deviation and the range over its finished runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from reproduce.rundir import RunDir
from reproduce.table import collect_run

HEADER = (
    "| run | defence | sigma | CEM lambda (variant) | epochs | test acc (%) | train wall (min) | feature var "
    "| decoder MSE train / infer | decoder SSIM train / infer | GAN MSE train |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _metric(rd: RunDir, attack: str, setting: str, key: str, fmt: str) -> str:
    value = rd.attack_metric(attack, setting, key)
    return format(value, fmt) if value is not None else "—"


def _run_dir(run: Path) -> RunDir:
    rd = RunDir(run)
    if not rd.started:
        raise ValueError(f"{run} is not a run directory (no {rd.CONFIG})")
    return rd


def row(run: Path) -> str:
    """The markdown row of one run directory (ValueError if it is not one)."""
    rd = _run_dir(run)
    cfg = rd.read_config()
    epochs = rd.metrics()
    done = len(epochs)
    status = "" if rd.finished else " (unfinished)"
    last = epochs[-1] if epochs else {}
    acc = f"{100 * last['test_acc']:.2f}" if "test_acc" in last else "—"
    wall = f"{sum(e.get('time_s', 0.0) for e in epochs) / 60:.1f}" if epochs else "—"
    fvar = f"{last['feature_var']:.4g}" if "feature_var" in last else "—"
    lam = cfg.get("cem_lambda", 0.0)
    cem = f"{lam:g} ({cfg.get('cem_variant')}, {cfg.get('cem_schedule')})" if lam else "0"
    return (
        f"| {rd.label}{status} | {cfg.get('defence')} | {cfg.get('sigma')} | {cem} | {done}/{cfg.get('epochs')} "
        f"| {acc} | {wall} | {fvar} "
        f"| {_metric(rd, 'decoder', 'train_time', 'mse', '.4f')} / "
        f"{_metric(rd, 'decoder', 'infer_time', 'mse', '.4f')} "
        f"| {_metric(rd, 'decoder', 'train_time', 'ssim', '.3f')} / "
        f"{_metric(rd, 'decoder', 'infer_time', 'ssim', '.3f')} "
        f"| {_metric(rd, 'gan', 'train_time', 'mse', '.4f')} |"
    )


ARM_HEADER = (
    "| arm | seeds | test acc (%) | decoder MSE train | decoder MSE infer | decoder SSIM train "
    "| GAN MSE train |\n|---|---|---|---|---|---|---|"
)
# reproduce.table.collect_run's keys, in ARM_HEADER's order, with their formats
_ARM_VALUES = (
    ("acc", ".2f"),
    ("dec_train_mse", ".4f"),
    ("dec_infer_mse", ".4f"),
    ("dec_ssim", ".3f"),
    ("gan_train_mse", ".4f"),
)


def _spread(values: list, fmt: str) -> str:
    """``mean ± sd [min, max] (n)`` of the values present; the sd is the sample one (n - 1)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:{fmt}} (1)"
    return (
        f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}} "
        f"[{min(values):{fmt}}, {max(values):{fmt}}] ({len(values)})"
    )


def arm_rows(runs: Sequence[Path]) -> list[str]:
    """One markdown row per arm over its finished runs (seeds); unfinished runs are left out and named."""
    arms: dict[str, list[Path]] = defaultdict(list)
    for run in runs:
        _run_dir(run)
        arms[run.parent.name if run.name.startswith("seed") else run.name].append(run)
    out = []
    for arm, members in arms.items():
        done = [r for r in members if RunDir(r).finished]
        collected = [collect_run(r) for r in done]
        seeds = ", ".join(r.name.removeprefix("seed") for r in sorted(done))
        left = [r.name for r in members if r not in done]
        note = f" (unfinished: {', '.join(left)})" if left else ""
        out.append(
            f"| {arm}{note} | {seeds or '—'} | "
            + " | ".join(_spread([c[key] for c in collected], fmt) for key, fmt in _ARM_VALUES)
            + " |"
        )
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reproduce.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument(
        "--by-arm", action="store_true", help="one row per arm: mean ± sample sd [min, max] (n) over its finished seeds"
    )
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    try:
        if args.by_arm:
            text = "\n".join([ARM_HEADER] + arm_rows([Path(r) for r in args.runs]))
        else:
            text = "\n".join([HEADER] + [row(Path(r)) for r in args.runs])
    except ValueError as err:
        p.error(str(err))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
