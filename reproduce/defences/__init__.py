"""Defences against model inversion, behind one interface (``Defence``, see ``base.py``).

``build_defence(name, **options)`` builds one by its registry name:

=============== ====================================================== ======================
name            what                                                    default bottleneck
=============== ====================================================== ======================
none            plain split training                                    none
bottleneck      only the model's 8-channel bottleneck (nothing else)    noRELU_C8S1
noise           Gaussian noise of std ``sigma`` on the smashed data     noRELU_C8S1
nopeek          distance-correlation penalty (DistCorr / NoPeek)        noRELU_C8S1
dropout         element dropout on the smashed data, no rescaling       noRELU_C8S1
ressfl          simulated decoder attacker + SSIM-threshold penalty     noRELU_C8S1
patrol          extra client layer + ressfl + channel pruning           noRELU_C8S1
noise_nopeek    noise + nopeek                                          noRELU_C8S1
noise_arl       noise + ressfl (adversarial representation learning)   noRELU_C8S1
=============== ====================================================== ======================

Options are routed to the parts that accept them (``sigma`` to the noise, ``strength`` to
nopeek/ressfl, ...); an option no part accepts raises TypeError naming it.
"""

from __future__ import annotations

import inspect

from .adversarial import AdversarialReconstruction, default_ssim_threshold, ssim
from .base import Defence
from .combined import Combined
from .dropout import FeatureDropout
from .noise import GaussianNoise
from .nopeek import NoPeek, distance_correlation
from .patrol import Patrol, prune_channels


class NoDefence(Defence):
    """Plain split training: no perturbation, no extra loss; no bottleneck by default."""

    name = "none"


class BottleneckOnly(Defence):
    """The bottleneck defence lives in the model (8-channel conv + Sigmoid at the cut)."""

    name = "bottleneck"


# name -> list of part classes (a single class for the plain defences)
_PARTS = {
    "none": [NoDefence],
    "bottleneck": [BottleneckOnly],
    "noise": [GaussianNoise],
    "nopeek": [NoPeek],
    "dropout": [FeatureDropout],
    "ressfl": [AdversarialReconstruction],
    "patrol": [Patrol],
    "noise_nopeek": [GaussianNoise, NoPeek],
    "noise_arl": [GaussianNoise, AdversarialReconstruction],
}
ALIASES = {"distcorr": "nopeek", "no_defense": "none", "adversarial": "ressfl", "arl": "ressfl"}
DEFENCES = tuple(_PARTS)
DEFAULT_BOTTLENECK = "noRELU_C8S1"


def canonical_name(name: str) -> str:
    """Registry name for ``name`` (aliases resolved); ValueError if unknown."""
    if not isinstance(name, str):
        raise TypeError(f"defence name must be a str, got {type(name).__name__}")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in _PARTS:
        raise ValueError(f"unknown defence {name!r}; choose one of {DEFENCES} (aliases {tuple(ALIASES)})")
    return key


def default_bottleneck(name: str) -> str:
    """The bottleneck the paper uses with this defence ('none' for No_defense)."""
    return "none" if canonical_name(name) == "none" else DEFAULT_BOTTLENECK


def _accepted(cls) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


def defence_options(name: str) -> set[str]:
    """Option names ``build_defence(name, ...)`` accepts."""
    return set().union(*(_accepted(c) for c in _PARTS[canonical_name(name)]))


def build_defence(name: str, **options) -> Defence:
    """Build the defence ``name`` (see the module table); ``options`` go to the parts accepting them."""
    key = canonical_name(name)
    classes = _PARTS[key]
    unknown = set(options) - defence_options(key)
    if unknown:
        raise TypeError(
            f"defence {key!r} does not take option(s) {sorted(unknown)}; it takes {sorted(defence_options(key))}"
        )
    parts = [cls(**{k: v for k, v in options.items() if k in _accepted(cls)}) for cls in classes]
    if len(parts) == 1:
        return parts[0]
    return Combined(parts, name=key)


def with_noise(defence: Defence, sigma: float) -> Defence:
    """``defence`` with Gaussian noise of std ``sigma`` applied first (no-op if it adds noise).

    The result is named ``noise+<name>`` (e.g. ``noise+bottleneck``, the arm the authors call
    "Bottleneck + CEM": CEM needs the noise, so that arm is bottleneck + noise + CEM, and its
    no-CEM control is ``noise+bottleneck`` at lambda 0, i.e. ``--defense bottleneck --noise on``).
    """
    if defence.adds_noise:
        return defence
    parts = list(defence.parts) if isinstance(defence, Combined) else [defence]
    if len(parts) == 1 and isinstance(parts[0], (NoDefence, BottleneckOnly)):
        noise = GaussianNoise(sigma)
        noise.name = f"noise+{parts[0].name}"  # stated in the run's record, not a silent "noise"
        return noise
    return Combined([GaussianNoise(sigma)] + parts, name=f"noise+{defence.name}")


__all__ = [
    "Defence",
    "build_defence",
    "with_noise",
    "canonical_name",
    "default_bottleneck",
    "DEFENCES",
    "defence_options",
    "GaussianNoise",
    "NoPeek",
    "FeatureDropout",
    "AdversarialReconstruction",
    "Patrol",
    "Combined",
    "NoDefence",
    "BottleneckOnly",
    "distance_correlation",
    "ssim",
    "default_ssim_threshold",
    "prune_channels",
]
