"""NoPeek / DistCorr: penalise the distance correlation between the input and the smashed data.

Encoder loss ``strength * dCor(x, z)`` with ``x`` the normalised input and ``z`` the clean
smashed data (as in the authors' code). The paper gives no strength; the authors' code adds
``alpha1 * dCor`` with ``alpha1 = AT_regularization_strength``, which their shipped
``run_exp.sh`` sets to 0.3 for every defence it lists (NoPeek among them). Default
``strength = 0.3`` (the authors'); ``--defence-strength`` overrides it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import Defence, check_positive

_EPS = 1e-7
AUTHORS_STRENGTH = 0.3  # run_exp.sh: AT_regularization_strength=0.3


def _centred_distances(a: torch.Tensor) -> torch.Tensor:
    """Double-centred pairwise Euclidean distance matrix of the rows of ``a`` ([B, D])."""
    sq = (a.unsqueeze(0) - a.unsqueeze(1)).pow(2).sum(-1)
    d = sq.clamp_min(_EPS).sqrt()  # clamp before sqrt: the diagonal would give an inf gradient
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Szekely et al.) between batches ``x`` and ``z``; in [0, 1].

    Both are flattened to ``[B, -1]``; computed in float32 at least; differentiable in both.
    """
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"x and z must have the same batch size, got {x.shape[0]} and {z.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError("distance_correlation needs a batch of at least 2 samples")
    dtype = torch.promote_types(z.dtype, torch.float32)
    a = _centred_distances(x.reshape(x.shape[0], -1).to(dtype))
    b = _centred_distances(z.reshape(z.shape[0], -1).to(dtype))
    dcov2_xz = (a * b).mean()
    dvar2_x = (a * a).mean()
    dvar2_z = (b * b).mean()
    dcor2 = dcov2_xz / (dvar2_x * dvar2_z).sqrt().clamp_min(_EPS)
    return dcor2.clamp_min(_EPS).sqrt()


class NoPeek(Defence):
    name = "nopeek"

    def __init__(self, strength: float = AUTHORS_STRENGTH):
        super().__init__()
        self.strength = check_positive(strength, "strength")

    def regularizer(
        self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor, *, x_unit: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.strength * distance_correlation(x, z)

    def describe(self) -> dict:
        return {"name": self.name, "strength": self.strength}
