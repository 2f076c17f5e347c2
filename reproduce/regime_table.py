"""The regime experiment's table (``python -m reproduce.grid regime``): one row per arm, read from its records.

    python -m reproduce.regime_table [RECORDS]     # print it (default reproduce/results/runs/regime)

Each row gives the arm's CEM strength in the paper's units, its test accuracy, the ladder's worst-case and the
decoder's MSE (mean and sample standard deviation over the seeds that have them), the worst case relative to the
same defence without CEM at sigma 0.025, the median time per training epoch and the CPU. The paper's Table 1
rows for Noise_ARL with and without CEM follow for comparison. ``reproduce.results_check`` writes it as
``reproduce/results/regime.md`` and checks it against the records.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

from reproduce.rundir import RunDir, find_runs

__all__ = ["arm_key", "regime_rows", "regime_markdown"]

BASE_SIGMA = 0.025
COLUMNS = (
    ("arm", "arm"),
    ("strength", "CEM (paper units)"),
    ("seeds", "seeds"),
    ("images", "train / test images"),
    ("acc", "test acc (%)"),
    ("worst", "worst MSE train (ladder)"),
    ("gain", "worst / same defence without CEM"),
    ("dec_train", "decoder MSE train"),
    ("dec_infer", "decoder MSE infer"),
    ("epoch_s", "median s / epoch"),
    ("train_min", "training (min, mean)"),
    ("threads", "threads"),
    ("cpu", "CPU"),
)


def arm_key(config: dict) -> tuple:
    """(defence, sigma, lambda, variant, schedule): what tells one arm from another (not the seed)."""
    lam = float(config.get("cem_lambda") or 0)
    return (
        config.get("defence"),
        float(config.get("sigma") or 0),
        lam,
        config.get("cem_variant") if lam else None,
        config.get("cem_schedule", "constant") if lam else None,
    )


def _label(key: tuple) -> str:
    defence, sigma, lam, variant, schedule = key
    if not lam:
        return f"{defence}, sigma {sigma:g}, no CEM"
    weight = ", LR-tied weight" if schedule == "official" else ""
    return f"{defence}, sigma {sigma:g}, CEM lambda {lam:g} ({variant}{weight})"


def _spread(values: Sequence[float], fmt: str) -> Optional[str]:
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt)}"


def _order(key: tuple) -> tuple:
    """Noise arms first, each defence's arm without CEM before its CEM arms, then by sigma and lambda."""
    defence, sigma, lam, variant, schedule = key
    return (defence != "noise", defence, lam > 0, sigma, lam, str(variant), str(schedule))


def _mses(runs: Sequence[RunDir], attack: str, setting: str) -> list[float]:
    return [v for v in (rd.attack_metric(attack, setting, "mse") for rd in runs) if v is not None]


def _sizes(config: dict) -> str:
    return " / ".join(
        f"{n:,}" if isinstance(n, int) else "?" for n in (config.get("train_size"), config.get("test_size"))
    )


def regime_rows(records_dir) -> list[dict]:
    """One row per arm of the finished runs (or records) below ``records_dir``, in a stable order."""
    from reproduce.strength import run_paper_units
    from reproduce.table import worst_case_mse

    arms: dict[tuple, list[tuple[dict, RunDir]]] = {}
    for rd in find_runs(records_dir):
        if rd.finished:
            cfg = rd.read_config()
            arms.setdefault(arm_key(cfg), []).append((cfg, rd))
    worst_of = {key: [w for w in (worst_case_mse(rd) for _, rd in runs) if w is not None] for key, runs in arms.items()}
    rows = []
    for key in sorted(arms, key=_order):
        configs, runs = zip(*sorted(arms[key], key=lambda pair: pair[0]["seed"]))
        accs = [100 * a for a in (rd.final_accuracy() for rd in runs) if a is not None]
        epoch_times = [[r["time_s"] for r in rd.metrics() if r.get("time_s") is not None] for rd in runs]
        times = [t for run_times in epoch_times for t in run_times]
        base = worst_of.get((key[0], BASE_SIGMA, 0.0, None, None), [])
        gain = None
        if key[2] and worst_of[key] and base:
            gain = f"x{statistics.fmean(worst_of[key]) / statistics.fmean(base):.2f}"
        units = run_paper_units(configs[0])
        rows.append(
            {
                "arm": _label(key),
                "strength": "-" if units is None else f"{units:g}",
                "seeds": ", ".join(str(c["seed"]) for c in configs),
                "images": " ; ".join(sorted({_sizes(c) for c in configs})),
                "acc": _spread(accs, ".2f"),
                "worst": _spread(worst_of[key], ".4f"),
                "gain": gain,
                "dec_train": _spread(_mses(runs, "decoder", "train_time"), ".4f"),
                "dec_infer": _spread(_mses(runs, "decoder", "infer_time"), ".4f"),
                "epoch_s": round(statistics.median(times)) if times else None,
                "train_min": round(statistics.fmean(map(sum, epoch_times)) / 60),
                "threads": ", ".join(sorted({str(c.get("threads")) for c in configs})),
                "cpu": ", ".join(sorted({rd.machine(c).get("cpu") or "not recorded" for c, rd in zip(configs, runs)})),
            }
        )
    return rows


def regime_markdown(rows: Sequence[dict], title: str = "The regime experiment (cpu-full)") -> str:
    """``rows`` as a markdown table under ``title``, with the paper's Noise_ARL rows below."""
    from reproduce import paper_numbers

    head = "| " + " | ".join(label for _, label in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join("-" if r[k] is None else str(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    paper = paper_numbers.table(1)["rows"]
    ref = [
        f"- {name}: {paper[name][0]:.2f} % accuracy, decoder MSE {paper[name][1]:.4f} (train time), "
        f"{paper[name][2]:.4f} (inference time)"
        for name in ("Noise_ARL", "Noise_ARL+CEM")
    ]
    without, with_cem = paper["Noise_ARL"], paper["Noise_ARL+CEM"]
    ref.append(
        f"- so CEM's gain in the paper: x{with_cem[1] / without[1]:.2f} decoder MSE (train time), "
        f"x{with_cem[2] / without[2]:.2f} (inference time), for {without[0] - with_cem[0]:.2f} points of accuracy"
    )
    notes = [
        "Mean ± sample standard deviation over the seeds listed; one seed shows its value alone. Accuracy is after "
        "the last epoch, on the run's test images. Times are wall-clock seconds per training epoch (evaluation "
        "included) as the run logged them, on a machine that may have run other work beside it. The worst case is the lowest train-time MSE over the ladder "
        "(decoder, whitebox, adaptive; GAN where it ran), shown once decoder, whitebox and adaptive have all run. "
        f"The ratio divides the arm's mean worst case by that of the same defence without CEM at sigma {BASE_SIGMA:g}.",
        "",
        "The paper's Table 1 (VGG11-BN, CIFAR-10, 240 epochs on a GPU), for comparison:",
        "",
        *ref,
    ]
    return "\n".join([f"# {title}", "", head, rule, *body, "", *notes, ""])


if __name__ == "__main__":
    from reproduce.records import RECORDS_ROOT

    where = Path(sys.argv[1]) if len(sys.argv) > 1 else RECORDS_ROOT / "regime"
    print(regime_markdown(regime_rows(where)))
