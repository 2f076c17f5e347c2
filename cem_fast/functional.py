"""``cem_loss``: the stateless form of the CEM loss (the module ``CEMLoss`` holds the state)."""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from .backends.torch_backend import accumulation_dtype
from .checks import flatten
from .ops import CEMFunction


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def cem_loss(z: torch.Tensor, labels: Optional[torch.Tensor], centroids: torch.Tensor, *, variant: str = "paper",
             sigma: float = 0.025, pi: Optional[torch.Tensor] = None, variance: Optional[torch.Tensor] = None,
             dataset_size: Optional[float] = None, covariance: str = "diag", reduction: str = "mean_dim",
             class_conditional: bool = True, var_threshold: float = 0.125, log_entropy: int = 1,
             replicate_index_bug: bool = False, backend: str = "auto", process_group=None):
    """CEM loss of features ``z [B, D]`` given the cluster state; returns ``(loss, new_pi, new_variance)``.

    No argument checking beyond what the kernels do: ``CEMLoss`` validates. ``centroids [C, m, D]``;
    ``pi [C, m]`` and ``variance`` as in ``cem_fast.reference.reference_loss``. For the official variant
    ``pi``/``variance`` are unused; ``new_pi``/``new_variance`` equal the inputs except for the paper variant.
    """
    C, m, D = centroids.shape
    acc = accumulation_dtype(z.dtype)
    z2d = flatten(z).contiguous()
    cent = _as(centroids.reshape(C * m, D), acc).contiguous()
    # Unconditional assignment ignores the labels; every backend still gets one (unused) label per row.
    lab = _as(labels, torch.int64).contiguous() if (class_conditional and labels is not None) else \
        torch.zeros(z2d.shape[0], dtype=torch.int64, device=z.device)
    if pi is None or variance is None:
        empty = cent.new_zeros(C, m)
    pi = empty if pi is None else _as(pi, acc)
    variance = empty if variance is None else _as(variance, acc)
    name = backends.resolve(backend, z.device)
    loss, new_pi, new_var = CEMFunction.apply(
        z2d, lab, cent, pi, variance, variant, covariance, m, class_conditional, float(sigma), reduction, C,
        float(dataset_size) if dataset_size is not None else 0.0, float(var_threshold), int(log_entropy),
        bool(replicate_index_bug), name, process_group)
    return loss, new_pi, new_var
