"""Learning-rate factors per epoch and the CEM weight per step.

``LRFactor`` is a picklable callable for ``torch.optim.lr_scheduler.LambdaLR`` (stepped once per
epoch), so the scheduler's state travels in the checkpoint. ``epoch`` is 0-based.

Kinds: ``paper`` / ``authors`` (MultiStep milestones of 240 epochs, scaled), ``cosine`` (cosine
from the base LR, no warm-up) and ``warmup-cosine`` (the short-run schedule of the ``cpu``
presets: a linear warm-up over ``warmup`` epochs, then a cosine that ends near 0 in the last
epoch instead of spending a quarter of the run at 1/125 of the LR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from cem_fast import official_cem_weight

PAPER_MILESTONES = (60, 120, 180)  # of 240 epochs
AUTHORS_MILESTONES = (60, 120, 180, 210, 260)  # of 240 epochs (their 120-epoch runs: halved)
GAMMA = 0.2
LR_SCHEDULES = ("paper", "authors", "cosine", "warmup-cosine")
CEM_SCHEDULES = ("constant", "official")


def default_warmup(epochs: int) -> int:
    """Warm-up epochs of ``warmup-cosine`` when none are given: a tenth of the run, at least 1 (0 for 1 epoch)."""
    return min(max(1, epochs // 10), epochs - 1)


def scaled_milestones(milestones, epochs: int) -> tuple[int, ...]:
    """Milestones given for 240 epochs, scaled to ``epochs`` (rounded, at least 1)."""
    return tuple(max(1, round(m * epochs / 240)) for m in milestones)


@dataclass
class LRFactor:
    """Multiplier of the base LR at (0-based) ``epoch``."""

    kind: str
    epochs: int
    warmup_bug: bool = False
    warmup: Optional[int] = None  # warm-up epochs of ``warmup-cosine``; None: ``default_warmup(epochs)``

    def __post_init__(self):
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.kind!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.warmup is None:
            self.warmup = default_warmup(self.epochs) if self.kind == "warmup-cosine" else 0
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup < self.epochs:
            raise ValueError(f"warmup must be an int in [0, epochs), got {self.warmup!r}")
        if self.warmup and self.kind != "warmup-cosine":
            raise ValueError(f"warmup is for lr_schedule 'warmup-cosine', got {self.kind!r}")

    def __call__(self, epoch: int) -> float:
        if self.warmup_bug and epoch == 0:
            return 0.0  # the authors' WarmUpLR sets the LR to 0 for the whole first epoch
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        if self.kind == "warmup-cosine":
            if epoch < self.warmup:
                return (epoch + 1) / (self.warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (epoch - self.warmup) / (self.epochs - self.warmup)))
        if self.kind == "paper":
            passed = sum(m <= epoch for m in scaled_milestones(PAPER_MILESTONES, self.epochs))
        else:
            # The authors step MultiStepLR with the 1-based epoch at its start.
            passed = sum(m <= epoch + 1 for m in scaled_milestones(AUTHORS_MILESTONES, self.epochs))
        return GAMMA**passed


def cem_weight(schedule: str, lam: float, lr_server: float) -> float:
    """Effective CEM weight: ``lam`` (constant, the paper) or the authors' LR-tied weight."""
    if schedule == "constant":
        return float(lam)
    if schedule == "official":
        return float(lam) if lr_server <= 0 else float(official_cem_weight(lam, lr_server))
    raise ValueError(f"cem_schedule must be one of {CEM_SCHEDULES}, got {schedule!r}")
