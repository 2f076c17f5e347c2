"""Vectorised PyTorch backend: assignment + per-cluster statistics, and the backward gather.

Every backend module exposes the same three functions (see ``cem_fast/backends/__init__.py``):

* ``assign_stats(z, labels, centroids, m, class_conditional) -> (assign, counts, sqdev)``
* ``scatter_grad(z, assign, centroids, coef) -> dz``
* ``is_available() -> bool``

Shapes: ``z [B, D]`` (any float dtype), ``labels [B]`` int64, ``centroids [K, D]`` in the
accumulation dtype (float64 for float64 input, else float32), ``K = num_classes * m``, cluster
``k = c * m + j``. ``assign [B]`` int64, ``counts [K]`` and ``sqdev [K, D]`` (sum over the
cluster's members of ``(z - mu)^2``) in the accumulation dtype. ``dz[i] = coef[a_i] * (z_i - mu[a_i])``
in ``z``'s dtype. No host synchronisation.
"""
from __future__ import annotations

import torch

# Rows of z processed at once when computing distances (bounds the [rows, m, D] temporary).
_CHUNK_ELEMS = 1 << 24


def is_available(device_type: str = "cpu") -> bool:
    return True


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def assign(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int,
           class_conditional: bool) -> torch.Tensor:
    """Nearest centroid (squared Euclidean, summed elementwise in the accumulation dtype), ties to the lowest index."""
    B, D = z.shape
    K = centroids.shape[0]
    zc = z.to(centroids.dtype)
    if B == 0:
        return torch.zeros(0, dtype=torch.int64, device=z.device)
    cand = m if class_conditional else K
    rows = max(1, _CHUNK_ELEMS // max(1, cand * D))
    out = []
    for s in range(0, B, rows):
        zs = zc[s:s + rows]
        if class_conditional:
            base = labels[s:s + rows].to(torch.int64) * m
            mu = centroids.view(-1, m, D)[labels[s:s + rows]]            # [b, m, D]
            d2 = (zs[:, None, :] - mu).pow(2).sum(-1)                   # [b, m]
            out.append(base + d2.argmin(dim=1))
        else:
            d2 = (zs[:, None, :] - centroids[None]).pow(2).sum(-1)      # [b, K]
            out.append(d2.argmin(dim=1))
    return torch.cat(out)


def assign_stats(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int,
                 class_conditional: bool):
    K, D = centroids.shape
    a = assign(z, labels, centroids, m, class_conditional)
    diff = z.to(centroids.dtype) - centroids[a]
    counts = torch.zeros(K, dtype=centroids.dtype, device=z.device).index_add_(
        0, a, torch.ones_like(a, dtype=centroids.dtype))
    sqdev = torch.zeros(K, D, dtype=centroids.dtype, device=z.device).index_add_(0, a, diff * diff)
    return a, counts, sqdev


def scatter_grad(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor,
                 coef: torch.Tensor) -> torch.Tensor:
    diff = z.to(centroids.dtype) - centroids[assign]
    return (coef[assign] * diff).to(z.dtype)
