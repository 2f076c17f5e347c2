"""Noise corruption: the server sees ``z + sigma * N(0, I)``.

As in the authors' code the noise is on at training, validation and attack time (the
defended system always sends noisy features); ``active_in_eval=False`` turns it off in eval.
"""

from __future__ import annotations

import torch

from .base import Defence, check_positive


class GaussianNoise(Defence):
    name = "noise"
    adds_noise = True

    def __init__(self, sigma: float = 0.025, active_in_eval: bool = True):
        super().__init__()
        self.sigma = check_positive(sigma, "sigma")
        self.active_in_eval = bool(active_in_eval)

    def perturb(self, z: torch.Tensor) -> torch.Tensor:
        if not self._perturbing():
            return z
        return z + self.sigma * torch.randn_like(z)

    def describe(self) -> dict:
        return {"name": self.name, "sigma": self.sigma, "active_in_eval": self.active_in_eval}
