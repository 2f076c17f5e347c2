"""Defences applied together (e.g. Noise + NoPeek, Noise + ARL): one ``Defence`` made of parts.

``perturb`` chains the parts in order; ``regularizer`` and ``adversary_step`` sum / merge the
parts' results. An adversarial part placed after a perturbing part gets the preceding
perturbation as its ``feature_transform``; its simulated attacker sees it only with
``adversary_sees="perturbed"`` (the default, as the authors, is the clean features).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import Defence


class Combined(Defence):
    def __init__(self, parts: Sequence[Defence], name: str):
        super().__init__()
        if not parts:
            raise ValueError("parts must not be empty")
        self.parts = nn.ModuleList(parts)
        self.name = name
        self.extra_client_layer = any(p.extra_client_layer for p in parts)
        self.needs_unit_images = any(p.needs_unit_images for p in parts)
        self.adds_noise = any(p.adds_noise for p in parts)
        for i, part in enumerate(parts):
            if hasattr(part, "feature_transform"):
                part.feature_transform = self._prefix_perturb(i)

    def _prefix_perturb(self, stop: int):
        def apply(z: torch.Tensor) -> torch.Tensor:
            for part in list(self.parts)[:stop]:
                z = part.perturb(z)
            return z

        return apply

    def setup(self, model, **kwargs):
        for part in self.parts:
            part.setup(model, **kwargs)

    def perturb(self, z):
        for part in self.parts:
            z = part.perturb(z)
        return z

    def regularizer(self, x, z, y, *, x_unit=None):
        terms = [t for t in (p.regularizer(x, z, y, x_unit=x_unit) for p in self.parts) if t is not None]
        return sum(terms) if terms else None

    def adversary_step(self, x_unit, z):
        logs = {}
        for part in self.parts:
            logs.update(part.adversary_step(x_unit, z))
        return logs

    def pretrain(self, encoder, loader, **kwargs):
        logs = {}
        for part in self.parts:
            logs.update(part.pretrain(encoder, loader, **kwargs))
        return logs

    def on_epoch_start(self, epoch, model, optimizers):
        changed = False
        for part in self.parts:
            changed = part.on_epoch_start(epoch, model, optimizers) or changed
        return changed

    @property
    def pretrain_split(self) -> str:
        splits = {getattr(p, "pretrain_split", None) for p in self.parts} - {None}
        return splits.pop() if splits else "train"

    def describe(self):
        return {"name": self.name, "parts": [p.describe() for p in self.parts]}
