"""Vectorised PyTorch backend, any device: the reference of the backend contract (``cem_fast/backends/__init__.py``).

Shapes: ``z [B, D]`` (any float dtype), ``labels [B]`` int64, ``centroids [K, D]`` in the
accumulation dtype (float64 for float64 input, else float32), ``K = num_classes * m``, cluster
``k = c * m + j``. ``assign [B]`` int64, ``counts [K]`` and ``sqdev [K, D]`` (sum over the
cluster's members of ``(z - mu)^2``) in the accumulation dtype. ``dz[i] = coef[a_i] * (z_i - mu[a_i])``
in ``z``'s dtype. No host synchronisation, except the grouped full-covariance forms on the CPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import full_covariance
from ..clustering import repeated_centroids

# Elements of the [rows, K] distance block computed at once.
_CHUNK_ELEMS = 1 << 24


def is_available(device_type: str) -> bool:
    """Always: PyTorch runs on every device."""
    return True


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def assign(
    z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int, class_conditional: bool
) -> torch.Tensor:
    """Nearest centroid by the elementwise sum of squared differences, ties to the lowest index.

    A GEMM (``|mu|^2 - 2 z.mu``) shortlists each row's two best candidates; their distances are then
    summed exactly as ``(z - mu)^2``, like the kernels and the reference do. The GEMM's rounding thus
    only matters if it drops the true best from the shortlist, not on near-ties between the two best.
    """
    B, D = z.shape
    K = centroids.shape[0]
    if B == 0:
        return torch.zeros(0, dtype=torch.int64, device=z.device)
    zc = z if z.dtype == centroids.dtype else z.to(centroids.dtype)
    # A repeated centroid (a class with fewer rows than clusters) never enters the shortlist: with three
    # copies the GEMM's per-column rounding could otherwise drop the lowest index from it.
    c_sq = (
        (centroids * centroids)
        .sum(1)
        .masked_fill(repeated_centroids(centroids, m if class_conditional else K), float("inf"))
    )
    rows = max(1, _CHUNK_ELEMS // max(1, K))
    out = []
    for s in range(0, B, rows):
        zs = zc[s : s + rows]
        d2 = torch.addmm(c_sq[None, :], zs, centroids.t(), alpha=-2.0)  # [b, K]
        if class_conditional:
            cand = labels[s : s + rows, None] * m + torch.arange(m, device=z.device)[None]
            d2 = d2.gather(1, cand)
        else:
            cand = torch.arange(K, device=z.device).expand(zs.shape[0], K)
        full = cand
        if cand.shape[1] > 2:
            cand = cand.gather(1, d2.topk(2, dim=1, largest=False).indices).sort(dim=1).values
        mu = centroids.index_select(0, cand.reshape(-1)).view(cand.shape[0], cand.shape[1], D)
        exact = (zs[:, None, :] - mu).pow(2).sum(-1)  # [b, <=2]
        best = cand.gather(1, exact.argmin(1, keepdim=True)).squeeze(1)
        # A NaN distance: torch's argmin picks the first NaN candidate, which topk may leave out.
        first_nan = full.gather(1, d2.argmin(1, keepdim=True)).squeeze(1)
        out.append(torch.where(d2.isnan().any(1), first_nan, best))
    return out[0] if len(out) == 1 else torch.cat(out)


def assign_stats(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int, class_conditional: bool):
    K, D = centroids.shape
    a = assign(z, labels, centroids, m, class_conditional)
    diff = z.to(centroids.dtype) - centroids.index_select(0, a)
    counts = torch.bincount(a, minlength=K).to(centroids.dtype)
    sqdev = torch.zeros(K, D, dtype=centroids.dtype, device=z.device).index_add_(0, a, diff * diff)
    return a, counts, sqdev


def scaled_coef(coef: torch.Tensor, grad_out: Optional[torch.Tensor], factor: float) -> torch.Tensor:
    """``coef * (grad_out * factor)``: the gradient coefficient times the incoming gradient and a constant."""
    if grad_out is not None:
        return coef * (grad_out * factor)
    return coef if factor == 1.0 else coef * factor


def scatter_grad(
    z: torch.Tensor,
    assign: torch.Tensor,
    centroids: torch.Tensor,
    coef: torch.Tensor,
    grad_out: Optional[torch.Tensor] = None,
    factor: float = 1.0,
) -> torch.Tensor:
    coef = scaled_coef(coef, grad_out, factor)
    diff = z.to(centroids.dtype) - centroids.index_select(0, assign)
    return (coef.index_select(0, assign) * diff).to(z.dtype)


def cluster_second_moments(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Grouped by cluster on the CPU (``B D^2`` work; reading the cluster sizes costs nothing there), else
    the batched product (no host sync)."""
    if z.device.type == "cpu":
        return full_covariance.cluster_second_moments(z, assign, centroids)
    return full_covariance.second_moments(z, assign, centroids)


matrix_grad = full_covariance.matrix_grad


def factored_matrix_grad(
    z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, chol: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """One Cholesky solve per cluster on the CPU, else the explicit coefficient and the batched product."""
    if z.device.type == "cpu":
        return full_covariance.segmented_full_grad(z, assign, centroids, chol, factor)
    return full_covariance.matrix_grad(z, assign, centroids, full_covariance.coef_matrix(chol, factor))
