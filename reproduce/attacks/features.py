"""What the inversion adversary of a trained run sees: the run's features, and the defence's perturbation.

The attacks themselves live in :mod:`cem_fast.audit`; this module only knows the project's defences.
"""

from __future__ import annotations

from typing import Optional

from cem_fast.audit.data import Perturbation, gaussian_perturbation

__all__ = ["defence_noise_sigma", "make_perturbation"]


def defence_noise_sigma(defence) -> float:
    """Std of the Gaussian noise ``defence`` adds to the features it sends (0.0 if none).

    Looks at the defence and, for combined defences, its ``parts``; a noise part
    switched off in eval mode (``active_in_eval=False``) does not count.
    """
    if defence is None:
        return 0.0
    parts = list(getattr(defence, "parts", [defence]))
    for part in parts:
        if getattr(part, "adds_noise", False) and getattr(part, "active_in_eval", True):
            return float(part.sigma)
    return 0.0


def make_perturbation(defence, noise_aware: bool = False, sigma: Optional[float] = None) -> Perturbation:
    """What the adversary's attack model sees on top of the clean features.

    As in the authors' attack, the default adds only the defence's Gaussian
    noise (std ``sigma``, default :func:`defence_noise_sigma`); with
    ``noise_aware`` the defence's full perturbation (``defence.perturb``:
    noise plus dropout, top-k pruning, ...) is used.
    """
    if noise_aware:
        if defence is None or not callable(getattr(defence, "perturb", None)):
            raise ValueError("noise_aware=True needs a defence with a perturb(z) method")
        return defence.perturb
    return gaussian_perturbation(defence_noise_sigma(defence) if sigma is None else sigma)
