"""Figures 3 and 4 of the paper from finished, attacked runs (matplotlib, PNG).

* Figure 3: the attacker's reconstruction MSE against the conditional-entropy bound of Eq. 3 (relative
  H(x|z), nats), one point per run, with Theorem 1's floor ``mse_lower_bound(H(x) + bound, d)``. The
  paper replaces the intractable constant H(x) by "a proper value"; here it is ``--h-x`` or, by default,
  the largest value for which the floor stays under every point (the tightest floor the runs allow).
  The bound comes from the run's saved CEM state (``final.pt``, variants paper / official-trained) or,
  for runs without one (lambda = 0, variant official), from a CEMLoss (variant paper) fitted on the
  run's encoder features of its training split.
* Figure 4: accuracy against the attacker's MSE while sweeping sigma (and lambda): one point per run,
  one line per family (defence, lambda, cut), dashed without CEM.

    python -m reproduce.figure --figure 3 --runs RUN... --out fig3.png

``--runs`` takes run directories or folders holding them (searched recursively, ``reproduce.rundir.find_runs``).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from reproduce.rundir import RunDir, find_runs

FIGURES = (3, 4)
BOUND_SOURCES = ("auto", "state", "refit")

__all__ = [
    "FIGURES",
    "BOUND_SOURCES",
    "expand_runs",
    "run_point",
    "entropy_bound_of_run",
    "tightest_h_x",
    "figure3",
    "figure4",
    "figure4_data",
    "figure4_plot",
]


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


def _bound_from_state(run_dir: Path, config: dict) -> Optional[float]:
    import torch

    from cem_fast import CEMLoss
    from reproduce.checkpoint import load_checkpoint

    state = load_checkpoint(RunDir(run_dir).final_path, map_location="cpu").get("cem")
    if state is None or config.get("cem_variant") == "official":
        return None
    cem = CEMLoss(
        config["num_classes"],
        clusters_per_class=config.get("cem_clusters"),
        sigma=config["sigma"],
        variant=config["cem_variant"],
        covariance=config.get("cem_covariance", "diag"),
        dataset_size=config.get("train_size"),
        backend="torch",
    )
    cem.load_state_dict(state)
    if not cem.fitted:
        return None
    with torch.no_grad():
        return float(cem.entropy_bound())


def _bound_from_refit(run_dir: Path, config: dict, max_images: int, device: str) -> float:
    import torch
    from torch.utils.data import DataLoader, Subset

    from cem_fast import CEMLoss
    from reproduce.data import load_dataset, subset
    from reproduce.runs import load_run

    if config["sigma"] <= 0:
        raise ValueError(f"{run_dir}: sigma is 0, the entropy bound needs noise (sigma > 0)")
    loaded = load_run(run_dir, device=device)
    data = load_dataset(config["dataset"], "train", data_root=config.get("data_root"), augment=False)
    indices = list(range(len(data)))
    if config.get("train_subset") is not None and config["train_subset"] < len(data):
        indices = list(subset(data, config["train_subset"], seed=config["seed"]).indices)
    if len(indices) > max_images:
        chosen = subset(Subset(data, indices), max_images, seed=0).indices
        indices = [indices[i] for i in chosen]
    feats, labels = [], []
    with torch.no_grad():
        for x, y in DataLoader(Subset(data, indices), batch_size=256):
            feats.append(loaded.model.encoder(x.to(device)).flatten(1).double().cpu())
            labels.append(y)
    feats, labels = torch.cat(feats), torch.cat(labels)
    cem = CEMLoss(
        loaded.num_classes,
        clusters_per_class=config.get("cem_clusters"),
        sigma=config["sigma"],
        variant="paper",
        dataset_size=len(feats),
        backend="torch",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a collapsed encoder still has a (high) bound
        cem.refit(feats, labels)
    return float(cem.entropy_bound())


def entropy_bound_of_run(
    run_dir: str | Path, source: str = "auto", max_images: int = 5000, device: str = "cpu"
) -> tuple[float, str]:
    """Eq. 3's bound on H(x|z) (up to H(x)) of a finished run, and where it came from ("state"/"refit")."""
    if source not in BOUND_SOURCES:
        raise ValueError(f"source must be one of {BOUND_SOURCES}, got {source!r}")
    if not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images must be a positive int, got {max_images!r}")
    rd = RunDir(run_dir)
    if not rd.finished:
        raise ValueError(f"{run_dir} has not finished training (no {rd.FINAL})")
    run_dir, config = rd.path, rd.read_config()
    if source in ("auto", "state"):
        bound = _bound_from_state(run_dir, config)
        if bound is not None:
            return bound, "state"
        if source == "state":
            raise ValueError(
                f"{run_dir} saved no CEM state with a bound (lambda 0 or variant official); "
                "use source 'refit' or 'auto'"
            )
    return _bound_from_refit(run_dir, config, max_images, device), "refit"


def tightest_h_x(bounds: Sequence[float], mses: Sequence[float], d: int) -> float:
    """Largest H(x) with ``mse_lower_bound(H(x) + b_i, d) <= mse_i`` for every point (Theorem 1 inverted)."""
    if not bounds or len(bounds) != len(mses):
        raise ValueError("bounds and mses must be non-empty and of equal length")
    if any(m <= 0 for m in mses):
        raise ValueError("every MSE must be > 0")
    return min(0.5 * d * math.log(2 * math.pi * math.e * m) - b for b, m in zip(bounds, mses))


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


def figure3(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    attack: str = "decoder",
    setting: str = "train_time",
    h_x: Optional[float] = None,
    bound_source: str = "auto",
    max_images: int = 5000,
    device: str = "cpu",
) -> Path:
    """Attacker MSE vs. the entropy bound, with Theorem 1's floor; returns the PNG path."""
    import numpy as np

    from cem_fast import mse_lower_bound

    points = _usable([run_point(r, attack, setting) for r in expand_runs(runs)], f"{attack} {setting} attack results")
    dims = {p["config"]["in_channels"] * p["config"]["image_size"] ** 2 for p in points}
    if len(dims) != 1:
        raise ValueError(f"the runs have different input dimensions {sorted(dims)}; plot one dataset at a time")
    d = dims.pop()
    for p in points:
        p["bound"], p["source"] = entropy_bound_of_run(p["run"], bound_source, max_images, device)
    b = np.array([p["bound"] for p in points])
    m = np.array([p["mse"] for p in points])
    fitted = h_x is None
    if fitted:
        h_x = tightest_h_x(b.tolist(), m.tolist(), d)

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4))
    for cem, marker, label in ((True, "o", "with CEM"), (False, "s", "without CEM")):
        sel = [p for p in points if (p["config"].get("cem_lambda", 0) > 0) == cem]
        if sel:
            ax.scatter([p["bound"] for p in sel], [p["mse"] for p in sel], marker=marker, label=label, zorder=3)
            several = len({q["config"].get("defence") for q in points}) > 1
            for p in sel:
                lam = p["config"].get("cem_lambda", 0)
                text = f"σ={p['config']['sigma']:g}" + (f", λ={lam:g}" if lam else "")
                if several:  # name the defence when the figure mixes them
                    text = f"{p['config'].get('defence')} {text}"
                ax.annotate(text, (p["bound"], p["mse"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    span = max(b.max() - b.min(), 1e-6)
    xs = np.linspace(b.min() - 0.1 * span, b.max() + 0.1 * span, 200)
    floor = [mse_lower_bound(float(h_x + x), d) for x in xs]
    ax.plot(xs, floor, "k--", label=f"Theorem 1 floor, H(x)={h_x:.4g}{' (tightest)' if fitted else ''}")
    if len(points) >= 2 and np.ptp(b) > 0:
        slope, icpt = np.polyfit(b, np.log(m), 1)
        r = np.corrcoef(b, np.log(m))[0, 1]
        ax.plot(xs, np.exp(icpt + slope * xs), ":", color="gray", label=f"exp fit (r={r:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("relative H(x|z) bound (Eq. 3, nats)")
    ax.set_ylabel(f"{attack} attack MSE ({setting.replace('_', ' ')})")
    sources = sorted({p["source"] for p in points})
    ax.set_title(f"Reconstruction MSE vs. H(x|z) (bound from {'/'.join(sources)})", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out)


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
        out.append(
            {
                "defence": defence,
                "cem_lambda": lam,
                "cut": cut,
                "variant": variant,
                "label": _family_label(key, several_cuts),
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
