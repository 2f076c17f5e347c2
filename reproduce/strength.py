"""CEM's strength in the paper's units, comparable across training-set sizes and weight schedules.

Why the raw ``lambda`` is not comparable: in the ``paper`` variant (Eq. 5-7) the gradient the CEM
term puts on one sample is proportional to ``1 / (N D (v + sigma^2))`` with ``N`` the samples per
epoch (Eq. 6's blend weight ``n / (p N)``), while the task loss's is ``1 / B``; so ``lambda`` at
``N`` pushes like ``lambda * 50,000 / N`` at the paper's 50,000 CIFAR-10 images. The
``official-trained`` loss blends with ``10 n / (p N / C)``, also ``~ 1 / N``, as long as that
weight stays under the authors' cap (``10 B < N``). The ``official`` loss (per-batch
variances) does not depend on ``N``.

The authors' scripts also tie the weight to the server LR (``cem_schedule="official"``:
``lambda * 0.001 / lr`` until the LR falls under 4.1e-4, e.g. 0.32 for lambda 16 at LR 0.05);
``paper_units`` then reports that effective weight at the given ``lr``, times the same ``N``
factor. ``from_paper_units`` inverts it (the ``lambda`` to pass for a wanted strength), and
``config_paper_units`` reads a run's ``config.json`` settings (the LR-tied weight at the peak LR).
"""

from __future__ import annotations

from typing import Optional

from cem_fast import official_cem_weight

PAPER_N = 50_000  # CIFAR-10 training images, the paper's N
VARIANTS = ("paper", "official", "official-trained")
SCHEDULES = ("constant", "official")
_N_SCALED = ("paper", "official-trained")
_TRAINED_BLEND_SCALE = 10.0  # the authors' scaling_lambda in official-trained's blend weight


def _check(lam, variant, n_train, schedule, batch_size) -> None:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ValueError(f"lam must be a number >= 0, got {lam!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train must be an int >= 1, got {n_train!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n_train:
        raise ValueError(f"batch_size must be an int in [1, n_train], got {batch_size!r}")
    if variant == "official-trained" and _TRAINED_BLEND_SCALE * batch_size >= n_train:
        raise ValueError(
            f"official-trained at n_train={n_train}, batch_size={batch_size}: the blend weight is "
            "capped (10 B >= N), so its strength no longer scales as 1 / N"
        )


def n_factor(variant: str, n_train: int, paper_n: int = PAPER_N) -> float:
    """How much stronger one unit of ``lambda`` pushes at ``n_train`` samples than at ``paper_n``."""
    return paper_n / n_train if variant in _N_SCALED else 1.0


def paper_units(
    lam: float,
    variant: str,
    n_train: int,
    lr: Optional[float] = None,
    *,
    schedule: str = "constant",
    batch_size: int = 128,
    paper_n: int = PAPER_N,
) -> float:
    """``lam`` as the weight with the same push at the paper's ``paper_n`` samples and a constant schedule.

    ``schedule="official"`` needs ``lr`` (the server LR the weight is read at).
    """
    _check(lam, variant, n_train, schedule, batch_size)
    if schedule == "official":
        if lr is None:
            raise ValueError("lr is required with schedule='official' (the weight is lam * 0.001 / lr)")
        weight = float(official_cem_weight(float(lam), float(lr)))
    else:
        weight = float(lam)
    return weight * n_factor(variant, n_train, paper_n)


def from_paper_units(
    units: float, variant: str, n_train: int, *, batch_size: int = 128, paper_n: int = PAPER_N
) -> float:
    """The constant-schedule ``lambda`` to train with at ``n_train`` samples for ``units`` in the paper's units."""
    _check(units, variant, n_train, "constant", batch_size)
    return float(units) / n_factor(variant, n_train, paper_n)


def run_paper_units(config: dict) -> Optional[float]:
    """A run's CEM strength in the paper's units from its ``config.json`` (its ``train_size`` is N); None when it
    trains without CEM or its config names no ``train_size``."""
    if float(config.get("cem_lambda") or 0) <= 0 or not config.get("train_size"):
        return None
    return config_paper_units(config, int(config["train_size"]))


def config_paper_units(config: dict, n_train: int) -> float:
    """``paper_units`` of a run's settings (``cem_lambda``, ``cem_variant``, ``cem_schedule``, ``lr``,
    ``batch_size``) trained on ``n_train`` images; the official schedule's weight is read at the peak LR."""
    return paper_units(
        float(config["cem_lambda"]),
        config["cem_variant"],
        n_train,
        lr=config.get("lr"),
        schedule=config.get("cem_schedule", "constant"),
        batch_size=int(config.get("batch_size", 128)),
    )
