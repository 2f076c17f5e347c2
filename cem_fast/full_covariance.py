"""Full-covariance helpers of the paper variant: per-cluster second moments and the matrix gradient.

Two forms of each. The batched forms (``second_moments``, ``matrix_grad``) are one product over a one-hot
``[K, B, D]`` tensor: ``K B D^2`` work, no host synchronisation, traceable by ``torch.compile``. The grouped
forms (``cluster_second_moments``, ``segmented_full_grad``) sort the rows by cluster and do one GEMM or one
Cholesky solve per cluster: ``B D^2`` work, but they read the cluster sizes (one host sync), so they are for
the CPU (and the refit). Rows with ``assign == -1`` (a label out of range on the GPU backends, which cannot
raise without a host sync) belong to no cluster and get a zero gradient in every form.

The gradient coefficient of cluster ``k`` is ``factor[k] * (L_k L_k^T)^-1`` with ``L_k`` a Cholesky factor
(``variants.paper.paper_full``): ``coef_solve`` applies it to rows, ``coef_matrix`` builds it.
"""

from __future__ import annotations

import torch


def _member_diff(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor):
    """``(z - mu[a] [B, D], one-hot [B, K])`` in the centroids' dtype, rows of ``assign == -1`` zeroed."""
    valid = (assign >= 0)[:, None]
    a = assign.clamp_min(0)
    diff = (z.to(centroids.dtype) - centroids[a]) * valid
    onehot = torch.nn.functional.one_hot(a, centroids.shape[0]).to(diff.dtype) * valid  # one_hot(-1) asserts on CUDA
    return diff, onehot


def second_moments(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``[K, D, D]``: per cluster the sum of ``(z - mu)(z - mu)^T``, one batched product, no host sync."""
    diff, onehot = _member_diff(z, assign, centroids)
    masked = onehot.t()[:, :, None] * diff[None]  # [K, B, D]
    return masked.transpose(1, 2) @ diff  # [K, D, D]


def matrix_grad(
    z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, coef: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """``dz[i] = scale * coef[a_i] @ (z_i - mu[a_i])`` in ``z``'s dtype for symmetric ``coef [K, D, D]``."""
    diff, onehot = _member_diff(z, assign, centroids)
    per_cluster = (onehot.t()[:, :, None] * diff[None]) @ coef  # [K, B, D]
    dz = per_cluster.sum(0)
    return (dz if scale == 1.0 else dz * scale).to(z.dtype)


def cluster_member_diffs(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor):
    """Per non-empty cluster ``(k, rows, z[rows] - mu_k)`` in the centroids' dtype, from one sort of the rows
    by cluster (reads the cluster sizes: one host sync). Rows with ``assign == -1`` (no cluster) are left out."""
    keep = (assign >= 0).nonzero().squeeze(1)
    kept = assign[keep]
    order = keep[torch.argsort(kept, stable=True)]
    counts = torch.bincount(kept, minlength=centroids.shape[0]).tolist()
    diff = z[order].to(centroids.dtype) - centroids[assign[order]]
    start = 0
    for k, n in enumerate(counts):
        if n:
            yield k, order[start : start + n], diff[start : start + n]
        start += n


def cluster_second_moments(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``[K, D, D]`` sum over members of ``(z - mu)(z - mu)^T`` in the centroids' dtype, one GEMM per cluster
    on rows sorted by cluster (``B D^2`` flops; the refit, and full covariance on the CPU)."""
    K, D = centroids.shape
    out = centroids.new_zeros(K, D, D)
    for k, _, seg in cluster_member_diffs(z, assign, centroids):
        out[k] = seg.t() @ seg
    return out


def coef_matrix(chol: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``[K, D, D]``: ``factor[k] * (L_k L_k^T)^-1``, the explicit gradient coefficient.

    By a triangular solve (``L^-1``) and one product, ``(L L^T)^-1 = L^-T L^-1``: unlike
    ``torch.cholesky_inverse``, which checks its status on the host, nothing here synchronises.
    """
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
    l_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return (l_inv.transpose(-1, -2) @ l_inv).mul_(factor[:, None, None])


def coef_solve(chol_k: torch.Tensor, factor_k: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """``factor_k * (L_k L_k^T)^-1 diff_i`` for the rows ``diff [n, D]`` of one cluster."""
    return torch.cholesky_solve(diff.t(), chol_k).t() * factor_k


def segmented_full_grad(
    z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, chol: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """``dz[i] = factor[a_i] (L L^T)^-1_{a_i} (z_i - mu[a_i])``: one Cholesky solve per cluster on the rows
    sorted by cluster (reads the cluster sizes: for the CPU), no explicit inverse."""
    dz = centroids.new_zeros(z.shape)
    for k, rows, diff in cluster_member_diffs(z, assign, centroids):
        dz[rows] = coef_solve(chol[k], factor[k], diff)
    return dz.to(z.dtype)
