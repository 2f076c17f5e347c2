"""Weight schedules for the CEM term."""

from __future__ import annotations

# The authors' training scripts scale lambda by 0.001 / lr until the server LR falls below this value.
OFFICIAL_LR_THRESHOLD = 0.00041


def official_cem_weight(lam: float, lr: float) -> float:
    """The authors' effective CEM weight: ``lam`` once ``lr < 4.1e-4``, else ``lam * 0.001 / lr``.

    With their LR schedule this keeps ``lr * weight`` at ``0.001 * lam`` for most of training,
    which damps the push towards collapsed features that a constant weight causes.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return lam if lr < OFFICIAL_LR_THRESHOLD else lam * 0.001 / lr
