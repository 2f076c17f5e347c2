"""Dropout defence: each element of the smashed data is zeroed with probability ``rate``.

Authors' behaviour, kept on purpose: **no 1/(1-rate) rescaling**, and the dropout is applied
at test time too (validation and attack), so the server always sees a thinned feature map.
Set ``active_in_eval=False`` to turn it off in eval mode.
"""

from __future__ import annotations

import torch

from .base import Defence, check_positive


class FeatureDropout(Defence):
    name = "dropout"

    def __init__(self, rate: float = 0.2, active_in_eval: bool = True):
        super().__init__()
        rate = check_positive(rate, "rate", allow_zero=True)
        if rate >= 1:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.active_in_eval = bool(active_in_eval)

    def perturb(self, z: torch.Tensor) -> torch.Tensor:
        if not self._perturbing() or self.rate == 0:
            return z
        keep = torch.rand_like(z) >= self.rate
        return z * keep

    def describe(self) -> dict:
        return {"name": self.name, "rate": self.rate, "active_in_eval": self.active_in_eval, "rescale": False}
