"""Learning-rate factors per epoch and the CEM weight per step.

``LRFactor`` is a picklable callable for ``torch.optim.lr_scheduler.LambdaLR`` (stepped once per
epoch), so the scheduler's state travels in the checkpoint. ``epoch`` is 0-based.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cem_fast import official_cem_weight

PAPER_MILESTONES = (60, 120, 180)                 # of 240 epochs
AUTHORS_MILESTONES = (60, 120, 180, 210, 260)     # of 240 epochs (their 120-epoch runs: halved)
GAMMA = 0.2
LR_SCHEDULES = ("paper", "authors", "cosine")
CEM_SCHEDULES = ("constant", "official")


def scaled_milestones(milestones, epochs: int) -> tuple[int, ...]:
    """Milestones given for 240 epochs, scaled to ``epochs`` (rounded, at least 1)."""
    return tuple(max(1, round(m * epochs / 240)) for m in milestones)


@dataclass
class LRFactor:
    """Multiplier of the base LR at (0-based) ``epoch``."""

    kind: str
    epochs: int
    warmup_bug: bool = False

    def __post_init__(self):
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.kind!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    def __call__(self, epoch: int) -> float:
        if self.warmup_bug and epoch == 0:
            return 0.0  # the authors' WarmUpLR sets the LR to 0 for the whole first epoch
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        if self.kind == "paper":
            passed = sum(m <= epoch for m in scaled_milestones(PAPER_MILESTONES, self.epochs))
        else:
            # The authors step MultiStepLR with the 1-based epoch at its start.
            passed = sum(m <= epoch + 1 for m in scaled_milestones(AUTHORS_MILESTONES, self.epochs))
        return GAMMA ** passed


def cem_weight(schedule: str, lam: float, lr_server: float) -> float:
    """Effective CEM weight: ``lam`` (constant, the paper) or the authors' LR-tied weight."""
    if schedule == "constant":
        return float(lam)
    if schedule == "official":
        return float(lam) if lr_server <= 0 else float(official_cem_weight(lam, lr_server))
    raise ValueError(f"cem_schedule must be one of {CEM_SCHEDULES}, got {schedule!r}")
