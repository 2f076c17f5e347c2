"""Figure 3: the attacker's reconstruction MSE against Eq. 3's entropy bound, with Theorem 1's floor.

``figure3_data(runs)`` reads records only (``config.json``, ``attack_<A>.json``, ``bound.json`` of each run: no
dataset, no weights) and returns the figure's numbers; ``figure3_plot(data, out_png)`` draws them.
``python -m reproduce.figure --figure 3 --runs RUN... --out fig3.png`` does both and writes the data beside
the PNG (``fig3.json``). ``docs/figure3.md`` says what the figure can and cannot show.

* x: the bound of ``reproduce.bound`` (one estimator for every run: an eval-mode refit on the run's clean
  training features), nats summed over the feature dimensions.
* y: the MSE of one attack (``attack``), or ``"worst"``: the lowest MSE over the ladder's attacks a run has.
* The floor ``exp(2 (H(x) + bound) / d) / (2 pi e)`` (Theorem 1 with Eq. 3) for each stated H(x) (nats summed
  over the d input dimensions): the values given, plus by default the runs' ``h_x_gaussian`` (an upper bound on
  H(x): see ``reproduce.bound``). Nothing is fitted to the points.
* Pearson r between the bound and log MSE (Theorem 1 makes log MSE linear in the bound, slope 2 / d, if the
  MSE follows the floor up to a constant factor), Spearman rho (rank order, the same for MSE and log MSE), each
  with a 95 % percentile bootstrap interval over runs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from reproduce.rundir import RunDir, setting_key

LADDER = ("decoder", "gan", "whitebox", "adaptive")  # reproduce.attack.ATTACKS (a test keeps them equal)
ATTACK_CHOICES = LADDER + ("worst",)
RESAMPLES = 2000
MIN_POINTS = 3  # fewer runs give no correlation (two points always lie on a line)

__all__ = [
    "LADDER",
    "ATTACK_CHOICES",
    "floor_mse",
    "bootstrap_correlation",
    "figure3_data",
    "figure3_plot",
]


def floor_mse(h_x: float, bound, d: int):
    """Theorem 1 with Eq. 3: the best attacker's per-dimension MSE is at least ``exp(2 (h_x + bound) / d) / (2 pi e)``.

    ``h_x``: H(x) in nats summed over the ``d`` input dimensions; ``bound``: Eq. 3's bound on H(x|z) - H(x) in
    nats (a float or a numpy array). Returns the floor in the MSE's units (per dimension).
    """
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be a positive int (the input dimension), got {d!r}")
    if not isinstance(h_x, (int, float)) or isinstance(h_x, bool) or not math.isfinite(h_x):
        raise ValueError(f"h_x must be a finite number (nats), got {h_x!r}")
    return np.exp(2.0 * (h_x + np.asarray(bound, dtype=np.float64)) / d) / (2.0 * math.pi * math.e)


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties given their average rank."""
    order = np.argsort(a, axis=-1, kind="stable")
    sorted_a = np.take_along_axis(a, order, axis=-1)
    ranks = np.empty(a.shape, dtype=np.float64)
    for row in np.ndindex(a.shape[:-1]):
        s, r = sorted_a[row], np.empty(a.shape[-1])
        start = 0
        for i in range(1, len(s) + 1):
            if i == len(s) or s[i] != s[start]:
                r[start:i] = 0.5 * (start + i - 1)
                start = i
        ranks[row][order[row]] = r
    return ranks


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair; NaN where a row is constant."""
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean(-1, keepdims=True)
    den = np.sqrt((xc**2).sum(-1) * (yc**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip((xc * yc).sum(-1) / den, -1.0, 1.0)  # rounding can put a perfect correlation an ulp past 1
    return np.where(den > 0, r, np.nan)


def bootstrap_correlation(x, y, *, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """Pearson and Spearman correlation of ``x`` and ``y`` with percentile bootstrap intervals over the pairs.

    Resamples the ``n`` pairs with replacement ``resamples`` times (numpy, ``default_rng(seed)``); a resample
    whose x or y is constant has no correlation and is dropped (``dropped`` counts them). Returns ``{"n",
    "pearson", "pearson_ci", "spearman", "spearman_ci", "level", "resamples", "seed", "dropped"}``.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-d arrays of one length, got shapes {x.shape} and {y.shape}")
    if len(x) < MIN_POINTS:
        raise ValueError(f"a correlation needs at least {MIN_POINTS} points, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    bx, by = x[idx], y[idx]
    boot = {"pearson": _pearson_rows(bx, by), "spearman": _pearson_rows(_ranks(bx), _ranks(by))}
    point = {"pearson": float(_pearson_rows(x, y)), "spearman": float(_pearson_rows(_ranks(x), _ranks(y)))}
    tail = 100 * (1 - level) / 2
    out = {"n": int(len(x)), "level": level, "resamples": resamples, "seed": seed}
    dropped = np.isnan(boot["pearson"]) | np.isnan(boot["spearman"])
    out["dropped"] = int(dropped.sum())
    for name, values in boot.items():
        kept = values[~dropped]
        out[name] = None if math.isnan(point[name]) else point[name]
        out[f"{name}_ci"] = [float(v) for v in np.percentile(kept, [tail, 100 - tail])] if len(kept) else None
    return out


def _run_dirs(runs) -> list[RunDir]:
    from reproduce.figures_curves import expand_runs

    if isinstance(runs, (str, Path, RunDir)):
        runs = [runs]
    return [RunDir(p) for p in expand_runs([RunDir(p).path for p in runs])]


def _lambda_paper_units(config: dict, train_size: Optional[int]) -> Optional[float]:
    from reproduce.strength import config_paper_units

    lam = float(config.get("cem_lambda", 0.0) or 0.0)
    if lam == 0:
        return 0.0
    if not train_size:
        return None
    try:
        return config_paper_units(config, int(train_size))
    except (KeyError, ValueError):  # e.g. official-trained with its blend weight capped: no paper units
        return None


def _point(rd: RunDir, attack: str, setting: str) -> tuple[Optional[dict], Optional[str]]:
    """The run's point, or None and why it has none."""
    config = rd.read_config()
    rec = rd.read_bound()
    if rec is None:
        return None, f"no {rd.BOUND} (run `python -m reproduce.bound {rd.label}` on the trained run)"
    mses = {a: rd.attack_metric(a, setting, "mse") for a in LADDER}
    mses = {a: m for a, m in mses.items() if m is not None}
    if not mses:
        return None, f"no {setting} attack results"
    worst = min(mses, key=mses.get)
    chosen = worst if attack == "worst" else attack
    if chosen not in mses:
        return None, f"no {attack} {setting} attack result"
    lam = float(config.get("cem_lambda", 0.0) or 0.0)
    return {
        "run": rd.label,
        "defence": config.get("defence"),
        "sigma": rec["sigma"],
        "lambda": lam,
        "lambda_paper_units": _lambda_paper_units(config, rec.get("train_size") or config.get("train_size")),
        "cem_variant": config.get("cem_variant") if lam > 0 else None,
        "seed": config.get("seed"),
        "bound": float(rec["bound"]),
        "snr": rec.get("snr"),
        "attack": chosen,
        "mse": mses[chosen],
        "mse_decoder": mses.get("decoder"),
        "mse_worst": mses[worst],
        "worst_attack": worst,
        "mse_by_attack": mses,
        "_record": rec,
    }, None


def _one(values: list, what: str, tol: float = 1e-9):
    """The value every run agrees on (ValueError naming the spread otherwise); None when no run has one."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if max(present) - min(present) > tol * max(1.0, max(abs(v) for v in present)):
        raise ValueError(
            f"the runs disagree on {what} ({min(present):.6g} .. {max(present):.6g}): plot one dataset at a time, "
            "with bounds from one estimator version (`python -m reproduce.bound --force RUN...`)"
        )
    return present[0]


def figure3_data(
    runs: Union[str, Path, Sequence[Union[str, Path]]],
    *,
    attack: str = "decoder",
    setting: str = "train_time",
    h_x: Sequence[float] = (),
    derived_h_x: bool = True,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """Figure 3's numbers from run or record directories (or folders holding them); reads records only.

    ``attack``: one of ``LADDER``, or ``"worst"`` (per run, the lowest MSE of the attacks it has).
    ``h_x``: stated values of H(x) (nats summed over the input dimensions), each drawn as a floor; with
    ``derived_h_x`` the runs' ``h_x_gaussian`` is drawn too. Returns ``{"attack", "setting", "input_dim",
    "points", "skipped", "floors", "mse_of_mean_image", "dequantisation_variance", "correlation",
    "correlation_within" (the runs without and with CEM apart; None below 3 runs), "fit", "theorem_slope",
    "notes"}``; each point has ``run``, ``defence``, ``sigma``, ``lambda``,
    ``lambda_paper_units``, ``bound``, ``mse`` (of ``attack``), ``mse_decoder``, ``mse_worst`` and
    ``worst_attack`` (the lowest MSE over the ladder's attacks the run has), ``mse_by_attack``.
    """
    if attack not in ATTACK_CHOICES:
        raise ValueError(f"attack must be one of {ATTACK_CHOICES}, got {attack!r}")
    setting = setting_key(setting)
    if setting not in ("train_time", "infer_time"):
        raise ValueError(f"setting must be 'train_time' or 'infer_time', got {setting!r}")
    if isinstance(h_x, (int, float)):
        h_x = [h_x]
    h_x = [float(v) for v in h_x]
    for v in h_x:
        floor_mse(v, 0.0, 1)  # ValueError for a non-finite value
    points, skipped = [], []
    for rd in _run_dirs(runs):
        point, why = _point(rd, attack, setting)
        if point is None:
            skipped.append({"run": rd.label, "reason": why})
            print(f"[figure3] skipping {rd.label}: {why}", file=sys.stderr)
        else:
            points.append(point)
    if not points:
        raise ValueError(f"none of the runs has a {RunDir.BOUND} and {attack} {setting} attack results")
    records = [p.pop("_record") for p in points]
    dims = {r.get("input_dim") for r in records}
    if len(dims) != 1 or None in dims:
        raise ValueError(
            f"the runs have different input dimensions {sorted(map(str, dims))}; plot one dataset at a time"
        )
    d = int(dims.pop())
    _one([r.get("estimator", {}).get("version") for r in records], "the bound estimator's version", tol=0)
    floors_h = [(v, "stated") for v in h_x]
    h_gauss = _one([r.get("h_x_gaussian") for r in records], "h_x_gaussian")
    h_bias = _one([r.get("h_x_gaussian_bias") for r in records], "h_x_gaussian_bias")
    if derived_h_x and h_gauss is not None:
        floors_h.append((float(h_gauss), "h_x_gaussian"))
    q = _one([r.get("dequantisation_variance") for r in records], "the dequantisation variance") or 0.0
    mean_image = _one([r.get("pixel_variance_mean") for r in records], "the pixel variance")

    b = np.array([p["bound"] for p in points])
    m = np.array([p["mse"] for p in points])
    if (m <= 0).any():
        raise ValueError("every MSE must be > 0")
    span = max(float(np.ptp(b)), 1.0)
    grid = np.linspace(b.min() - 0.1 * span, b.max() + 0.1 * span, 101)
    floors = []
    for value, source in floors_h:
        at_points = floor_mse(value, b, d)
        for p, f in zip(points, at_points):
            p.setdefault("floors", {})[source if source != "stated" else f"{value:g}"] = float(f)
        floors.append(
            {
                "h_x": value,
                "h_x_per_dim": value / d,
                "source": source,
                "curve": {"bound": grid.tolist(), "mse": floor_mse(value, grid, d).tolist()},
                # MSE against the dequantised image (MSE + q) under the floor: contradicts the theorem, the
                # bound estimate, or the stated H(x) (which would then exceed the true H(x)).
                "below": [p["run"] for p, f in zip(points, at_points) if p["mse"] + q < f],
            }
        )
        if source == "h_x_gaussian":
            floors[-1]["gaussian_bias"] = h_bias
    correlation, fit, notes = _correlation(b, m, resamples, seed), None, []
    if correlation is not None:
        slope, intercept = np.polyfit(b, np.log(m), 1)
        fit = {"slope": float(slope), "intercept": float(intercept), "of": "log MSE = intercept + slope * bound"}
    else:
        notes.append(f"no correlation: it needs {MIN_POINTS} or more runs with different bounds and MSEs")
    # The same within the runs without and with CEM: r over both can come from the gap between the groups.
    within = {}
    for name, cem in (("without CEM", False), ("with CEM", True)):
        sel = np.array([(p["lambda"] > 0) == cem for p in points])
        within[name] = _correlation(b[sel], m[sel], resamples, seed)
    return {
        "attack": attack,
        "setting": setting,
        "input_dim": d,
        "points": points,
        "skipped": skipped,
        "floors": floors,
        "mse_of_mean_image": mean_image,
        "dequantisation_variance": q,
        "correlation": correlation,
        "correlation_within": within,
        "fit": fit,
        "theorem_slope": 2.0 / d,
        "notes": notes,
    }


def _correlation(b: np.ndarray, m: np.ndarray, resamples: int, seed: int) -> Optional[dict]:
    """bootstrap_correlation of the bound and log MSE, or None with too few or constant points."""
    if len(b) < MIN_POINTS or np.ptp(b) == 0 or np.ptp(m) == 0:
        return None
    out = bootstrap_correlation(b, np.log(m), resamples=resamples, seed=seed)
    out.update(x="bound (nats)", y="log MSE")
    return out


def _ci(c: dict, name: str) -> str:
    lo_hi = c.get(f"{name}_ci")
    return f"{c[name]:.2f}" + (f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else "")


def caption(data: dict) -> str:
    """One line: n runs, Pearson r and Spearman rho with their intervals (or why there are none)."""
    c = data["correlation"]
    n = len(data["points"])
    if c is None:
        return f"{n} run{'s' if n != 1 else ''}; " + "; ".join(data["notes"])
    pct = round(100 * c["level"])
    return (
        f"{n} runs: Pearson r(bound, log MSE) = {_ci(c, 'pearson')}, Spearman ρ = {_ci(c, 'spearman')} "
        f"({pct} % bootstrap over runs, {c['resamples']} resamples)"
    )


def figure3_plot(data: dict, out_png: Union[str, Path]) -> Path:
    """Draw ``figure3_data``'s result to ``out_png``: points by defence (filled with CEM, hollow without), the
    floor of each stated H(x), the MSE of the mean image, and r with its interval in the caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = data["points"]
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    defences = sorted({str(p["defence"]) for p in points})
    colours = {dname: f"C{i % 10}" for i, dname in enumerate(defences)}
    for dname in defences:
        for cem in (False, True):
            sel = [p for p in points if str(p["defence"]) == dname and (p["lambda"] > 0) == cem]
            if not sel:
                continue
            ax.scatter(
                [p["bound"] for p in sel],
                [p["mse"] for p in sel],
                marker="o" if cem else "s",
                facecolors=colours[dname] if cem else "none",
                edgecolors=colours[dname],
                label=f"{dname}, {'with' if cem else 'without'} CEM",
                zorder=3,
            )
    for p in points:
        text = f"σ={p['sigma']:g}" + (f" λ={p['lambda']:g}" if p["lambda"] else "")
        ax.annotate(text, (p["bound"], p["mse"]), fontsize=5, xytext=(3, 3), textcoords="offset points")
        if data["attack"] != "worst" and p["mse_worst"] < p["mse"]:
            ax.plot([p["bound"]] * 2, [p["mse_worst"], p["mse"]], color="0.6", lw=0.6, zorder=2)
            ax.scatter([p["bound"]], [p["mse_worst"]], marker="v", s=12, color="0.4", zorder=3)
    if any(data["attack"] != "worst" and p["mse_worst"] < p["mse"] for p in points):
        ax.scatter([], [], marker="v", s=12, color="0.4", label="lowest MSE over the attack ladder")
    styles = ["--", "-.", ":", (0, (5, 1, 1, 1))]
    for i, f in enumerate(data["floors"]):
        what = "h_x_gaussian, an upper bound" if f["source"] == "h_x_gaussian" else "stated"
        ax.plot(
            f["curve"]["bound"],
            f["curve"]["mse"],
            color="k",
            ls=styles[i % len(styles)],
            lw=1,
            label=f"Theorem 1 floor, H(x) = {f['h_x']:.5g} nats ({f['h_x_per_dim']:.3g}/dim; {what})",
        )
    if data.get("mse_of_mean_image"):
        ax.axhline(data["mse_of_mean_image"], color="0.5", lw=0.8, ls=":", label="MSE of the mean training image")
    ax.set_yscale("log")
    ax.set_xlabel("Eq. 3 bound on H(x|z) − H(x) (nats; eval-mode refit of each run)")
    y = "lowest MSE over the attack ladder" if data["attack"] == "worst" else f"{data['attack']} attack MSE"
    ax.set_ylabel(f"{y} ({data['setting'].replace('_', ' ')})")
    ax.set_title("Reconstruction MSE vs. the conditional-entropy bound", fontsize=9)
    ax.legend(fontsize=5.5, loc="best")
    fig.text(0.01, 0.005, caption(data), fontsize=6, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out
