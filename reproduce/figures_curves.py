"""Figure 4 of the paper from finished, attacked runs (matplotlib, PNG), and the helpers the figures share.

* Figure 4: accuracy against the attacker's MSE while sweeping sigma (and lambda): one point per run,
  one line per family (defence, lambda, cut), dashed without CEM.
* Figure 3 (attacker MSE against the entropy bound) is ``reproduce.figure3``.

    python -m reproduce.figure --figure 4 --runs RUN... --out fig4.png

``--runs`` takes run directories or folders holding them (searched recursively, ``reproduce.rundir.find_runs``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from reproduce.rundir import RunDir, find_runs

__all__ = ["expand_runs", "run_point", "figure4_series", "figure4", "figure4_data", "figure4_plot"]


def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories among ``paths``: each path that has a config.json, else the runs found under it."""
    if not paths:
        raise ValueError("runs must name at least one run directory")
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            below = [rd.path for rd in find_runs(p)]
            if not below:
                raise FileNotFoundError(f"{p} is not a run directory and holds none (no {RunDir.CONFIG} below it)")
            found += below
        else:
            raise FileNotFoundError(f"run directory {p} does not exist")
    return list(dict.fromkeys(found))


def run_point(run_dir: str | Path, attack: str = "decoder", setting: str = "train_time") -> dict:
    """``{"config", "acc" (%), "mse"}`` of a run; acc/mse None when training or the attack is missing."""
    rd = RunDir(run_dir)
    acc = rd.final_accuracy()
    return {
        "config": rd.read_config(),
        "acc": None if acc is None else 100.0 * acc,
        "mse": rd.attack_metric(attack, setting, "mse"),
        "run": rd.path,
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def _usable(points: list[dict], what: str, log=None) -> list[dict]:
    log = log or (lambda msg: print(msg, file=sys.stderr))
    good = [p for p in points if p["acc"] is not None and p["mse"] is not None]
    for p in points:
        if p not in good:
            log(f"[figure] skipping {p['run']}: {'training unfinished' if p['acc'] is None else 'no ' + what}")
    if not good:
        raise ValueError(f"none of the runs has finished training and has {what}")
    return good


def _family(config: dict) -> tuple:
    lam = config.get("cem_lambda", 0.0) if config.get("cem_enabled", config.get("cem_lambda", 0) > 0) else 0.0
    return (config.get("defence"), lam, config.get("cut"), config.get("cem_variant") if lam else None)


def figure4_series(points: list[dict]) -> dict[tuple, list[dict]]:
    """Figure 4's points grouped by (defence, lambda, cut, variant) family, then by sigma: the seeds of one
    sigma become one point, ``mse``/``acc`` their means and ``mse_sd``/``acc_sd`` their sample sds (0 for
    one seed), ``n`` their number; each family sorted by sigma."""
    import statistics

    groups: dict[tuple, dict[float, list[dict]]] = {}
    for p in points:
        groups.setdefault(_family(p["config"]), {}).setdefault(p["config"]["sigma"], []).append(p)
    series = {}
    for key, by_sigma in groups.items():
        series[key] = []
        for sigma in sorted(by_sigma):
            ps = by_sigma[sigma]
            mse, acc = [p["mse"] for p in ps], [p["acc"] for p in ps]
            sd = statistics.stdev if len(ps) > 1 else (lambda v: 0.0)
            series[key].append(
                dict(
                    sigma=sigma,
                    n=len(ps),
                    mse=statistics.mean(mse),
                    acc=statistics.mean(acc),
                    mse_sd=sd(mse),
                    acc_sd=sd(acc),
                )
            )
    return series


def _paper_units(configs: Sequence[dict]) -> list[float]:
    """The distinct CEM strengths of ``configs`` in the paper's units (``reproduce.strength``); [] without CEM."""
    from reproduce.strength import run_paper_units

    return sorted({round(u, 4) for u in map(run_paper_units, configs) if u is not None})


def _family_label(key: tuple, several_cuts: bool) -> str:
    defence, lam, cut, variant = key
    label = f"{defence}, " + (f"CEM λ={lam:g}" if lam else "w/o CEM")
    if variant not in (None, "paper"):
        label += f" ({variant})"
    if several_cuts:
        label += f", cut {cut}"
    return label


def figure4_data(
    runs: Sequence[str | Path],
    *,
    attack: str = "decoder",
    setting: str = "train_time",
    root: Optional[str | Path] = None,
    log=None,
) -> dict:
    """Figure 4's plotted numbers (JSON-ready): one family per (defence, lambda, cut, variant), each a list of
    points (sigma, n seeds, mean and sd of MSE and accuracy), and the runs used (relative to ``root`` if given).
    ValueError when no run has finished training and has the attack's result."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    points = _usable(
        [run_point(r, attack, setting) for r in expand_runs(runs)], f"{attack} {setting} attack results", log
    )
    families = figure4_series(points)
    several_cuts = len({k[2] for k in families}) > 1
    out = []
    for key in sorted(families, key=lambda k: (str(k[0]), k[1], k[2] or 0)):
        defence, lam, cut, variant = key
        units = _paper_units([p["config"] for p in points if _family(p["config"]) == key])
        label = _family_label(key, several_cuts)
        if lam and len(units) == 1:
            label += f" ({units[0]:g} in paper units)"
        out.append(
            {
                "defence": defence,
                "cem_lambda": lam,
                "cem_lambda_paper_units": units,
                "cut": cut,
                "variant": variant,
                "label": label,
                "points": families[key],
            }
        )

    def name(path: Path) -> str:
        return Path(path).relative_to(root).as_posix() if root is not None else str(path)

    return {
        "figure": 4,
        "attack": attack,
        "setting": setting,
        "runs": sorted(name(p["run"]) for p in points),
        "families": out,
    }


def figure4_plot(data: dict, out: str | Path) -> Path:
    """Draw Figure 4 from :func:`figure4_data`'s numbers alone; returns the PNG path."""
    attack, setting = data["attack"], data["setting"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4))
    for fam in data["families"]:
        lam, pts = fam["cem_lambda"], fam["points"]
        ax.errorbar(
            [p["mse"] for p in pts],
            [p["acc"] for p in pts],
            xerr=[p["mse_sd"] for p in pts],
            yerr=[p["acc_sd"] for p in pts],
            fmt=("-" if lam else "--") + ("o" if lam else "s"),
            capsize=2,
            label=fam["label"],
        )
        for p in pts:
            ax.annotate(
                f"{p['sigma']:g}" + (f" (n={p['n']})" if p["n"] > 1 else ""),
                (p["mse"], p["acc"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel(f"{attack} attack MSE ({setting.replace('_', ' ')}; higher = more robust)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Utility-robustness trade-off (labels: noise σ; seeds: mean ± sd)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out)


def figure4(
    runs: Sequence[str | Path], out: str | Path, *, attack: str = "decoder", setting: str = "train_time"
) -> Path:
    """Accuracy vs. attacker MSE, one line per (defence, lambda, cut) family, points sorted by sigma; the
    seeds of one arm are drawn as their mean with sample-sd error bars."""
    return figure4_plot(figure4_data(runs, attack=attack, setting=setting), out)
