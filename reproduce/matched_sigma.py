"""Noise alone at equal accuracy: the sigma whose accuracy cost at the ``cpu`` preset equals CEM's.

Figure 4's control asks whether CEM beats simply adding more noise at the same accuracy. The ``regime`` grid
cannot afford a sigma sweep at ``cpu-full``, so the sigma comes from the ``cpu`` grid's records: the
accuracy drop of CEM (lambda 16, sigma 0.025) against noise alone at sigma 0.025, matched on the curve of
noise-alone accuracy drops over sigma (0.025 to 0.4, one seed), interpolated linearly in log sigma.

    python -m reproduce.matched_sigma [RECORDS]     # default reproduce/results/runs/cpu
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

from reproduce.rundir import find_runs

__all__ = ["noise_sweep", "matched_sigma", "describe"]

BASE_SIGMA = 0.025


def noise_sweep(records_dir, seed: int = 125, lam: float = 0) -> dict:
    """``{sigma: final test accuracy}`` of the finished ``noise`` runs at ``lam`` and ``seed`` below ``records_dir``."""
    out = {}
    for rd in find_runs(records_dir):
        cfg = rd.read_config()
        if (
            cfg.get("defence") == "noise"
            and cfg.get("seed") == seed
            and float(cfg.get("cem_lambda") or 0) == lam
            and cfg.get("cem_variant", "paper") == "paper"
        ):
            acc = rd.final_accuracy()  # None unless training finished
            if acc is not None:
                out[float(cfg["sigma"])] = acc
    return dict(sorted(out.items()))


def matched_sigma(records_dir, lam: float = 16, seed: int = 125) -> Optional[dict]:
    """The noise-alone sigma with CEM's accuracy drop (``lam`` at sigma 0.025, ``seed``), or None while the
    records lack the CEM run, the sigma-0.025 run or a sweep point beyond CEM's drop.

    Returns ``{"sigma": ..., "target_drop": ..., "sweep": {sigma: acc}, "cem_acc": ...}`` (accuracies as fractions).
    """
    sweep = noise_sweep(records_dir, seed)
    cem = noise_sweep(records_dir, seed, lam).get(BASE_SIGMA)
    if cem is None or BASE_SIGMA not in sweep:
        return None
    base = sweep[BASE_SIGMA]
    target = base - cem
    if target <= 0:  # CEM cost no accuracy: the control is noise alone at CEM's own sigma
        return {"sigma": BASE_SIGMA, "target_drop": target, "sweep": sweep, "cem_acc": cem}
    points = [(s, base - a) for s, a in sweep.items() if s >= BASE_SIGMA]
    for (s0, d0), (s1, d1) in zip(points, points[1:]):
        if d0 <= target <= d1 and d1 > d0:
            t = (target - d0) / (d1 - d0)
            sigma = math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0)))
            return {"sigma": float(f"{sigma:.3g}"), "target_drop": target, "sweep": sweep, "cem_acc": cem}
    return None


def describe(records_dir) -> str:
    """One line: the matched sigma and the sweep behind it, or what the records still lack."""
    found = matched_sigma(records_dir)
    if found is not None:
        return (
            f"sigma {found['sigma']:g}: noise alone loses {100 * found['target_drop']:.2f} points there, as CEM does "
            f"(sweep {found['sweep']}, CEM lambda 16 at {found['cem_acc']})"
        )
    cem = noise_sweep(records_dir, lam=16).get(BASE_SIGMA)
    return (
        f"not yet: the noise sweep {noise_sweep(records_dir)}, CEM lambda 16 at sigma {BASE_SIGMA} "
        f"{'has no finished run' if cem is None else f'at {cem}'}, and no bracket of CEM's accuracy drop"
    )


if __name__ == "__main__":
    from reproduce.records import RECORDS_ROOT

    print(describe(Path(sys.argv[1]) if len(sys.argv) > 1 else RECORDS_ROOT / "cpu"))
