"""The ``paper`` variant: Eq. 5-7 of Xia et al. (CVPR 2025), with diagonal or full covariances.

The mixture weights and covariances are streamed over the batches of an epoch (Eq. 5-6):
``pi' = (pi (N - B) + n) / N`` and ``Sigma' = (1 - alpha) Sigma + alpha S_batch`` with ``alpha = n / (pi' N)``,
and the loss is Eq. 7, ``sum_k pi_k (-log pi_k + 1/2 logdet(Sigma_k + sigma^2 I) - D/2 log sigma^2)``,
divided by ``D`` under ``reduction="mean_dim"``. ``pi`` holds mixture weights over all clusters (summing to 1).
The first refit starts k-means with k-means++, later ones warm-start from the last centroids.
"""

from __future__ import annotations

import torch

from ..clustering import cluster_sums, default_sum_method
from ..full_covariance import cluster_second_moments
from ..theory import entropy_bound
from .base import Variant, register


def _paper_weights(counts, pi, dataset_size):
    """Eq. 5 (streamed pi) and Eq. 6's blend weight alpha."""
    batch = counts.sum()
    pi_new = (pi * (dataset_size - batch) + counts) / dataset_size
    alpha = torch.where(counts > 0, (counts / (pi_new * dataset_size)).clamp(0, 1), torch.zeros_like(counts))
    return pi_new, alpha


def _neg_pi_log_pi(pi):
    return torch.where(pi > 0, -pi * torch.log(pi.clamp_min(torch.finfo(pi.dtype).tiny)), torch.zeros_like(pi))


def paper_diag(counts, sqdev, pi, variance, *, sigma, dataset_size, reduction):
    """Eq. 5-7 with diagonal covariances on ``counts [K]``, ``sqdev [K, D]``, ``pi [K]``, ``variance [K, D]``.
    Returns ``loss, coef, pi_new, variance_new``."""
    K, D = sqdev.shape
    s2 = sigma * sigma
    pi_new, alpha = _paper_weights(counts, pi, dataset_size)
    n_safe = counts.clamp_min(1.0)
    blend = alpha[:, None]
    var_new = torch.where((counts > 0)[:, None], (1 - blend) * variance + blend * (sqdev / n_safe[:, None]), variance)
    half_logdet = 0.5 * torch.log1p(var_new / s2).sum(1)  # 1/2 logdet(S + s2 I) - D/2 log s2
    scale = 1.0 / D if reduction == "mean_dim" else 1.0
    loss = scale * (_neg_pi_log_pi(pi_new) + pi_new * half_logdet).sum()
    coef = (scale * 0.5 * pi_new * alpha / n_safe)[:, None] / (var_new + s2)
    return loss, coef, pi_new, var_new


def paper_full(counts, moments, pi, covariance, *, sigma, dataset_size, reduction):
    """Eq. 5-7 with full covariances (``moments, covariance [K, D, D]``): batched Cholesky for the log-det.

    Returns ``loss, (chol, factor), pi_new, covariance_new``: the gradient coefficient of cluster ``k`` is
    ``factor[k] * (I + S_k/s2)^-1`` with ``chol[k]`` the Cholesky factor of ``I + S_k/s2``. It stays
    factored: the backward needs it only against the batch's rows (``full_covariance.coef_solve``), ``B D^2``
    work where the explicit inverse is ``K D^3`` (``full_covariance.coef_matrix`` when a kernel wants it).
    No host synchronisation.
    """
    K, D, _ = moments.shape
    s2 = sigma * sigma
    pi_new, alpha = _paper_weights(counts, pi, dataset_size)
    n_safe = counts.clamp_min(1.0)
    # alpha = 0 for an empty cluster, and lerp with weight 0 returns the start exactly: no where() needed.
    # Each op here is a pass over K D^2 elements, as costly as the factorisation on the CPU: keep them few.
    cov_new = torch.lerp(covariance, moments / n_safe[:, None, None], alpha[:, None, None])
    a = cov_new / s2
    a.diagonal(dim1=-2, dim2=-1).add_(1.0)  # I + S/s2: always positive definite
    chol, _ = torch.linalg.cholesky_ex(a)
    # the log-det of I + S/s2, not of S + s2 I: the latter less D log s2 cancels catastrophically in fp32
    half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    scale = 1.0 / D if reduction == "mean_dim" else 1.0
    loss = scale * (_neg_pi_log_pi(pi_new) + pi_new * half_logdet).sum()
    # (S + s2 I)^-1 = (I + S/s2)^-1 / s2, with the 1/s2 folded into the per-cluster factor
    factor = scale * 0.5 * pi_new * alpha / (n_safe * s2)
    return loss, (chol, factor), pi_new, cov_new


@register
class Paper(Variant):
    name = "paper"
    code = 2  # diagonal covariance only in the C++ kernels
    default_clusters = 3
    streams_state = True
    covariances = ("diag", "full")
    reductions = ("mean_dim", "sum")

    def variance_shape(self, num_classes, m, D, covariance):
        return (num_classes, m, D) if covariance == "diag" else (num_classes, m, D, D)

    def default_weight(self, num_classes, m):
        return 1.0 / (num_classes * m)

    def state_from_kmeans(self, x, result, num_classes, m, covariance):
        N, D = x.shape
        flat = result.centroids.reshape(num_classes * m, D)
        n_safe = result.counts.clamp_min(1)
        pi = (result.counts / N).reshape(num_classes, m)
        if covariance == "diag":
            sq, _ = cluster_sums((x - flat[result.assign]) ** 2, result.assign, flat.shape[0], default_sum_method(x))
            var = sq / n_safe[:, None]
        else:
            var = cluster_second_moments(x, result.assign, flat) / n_safe[:, None, None]
        return pi, var.reshape(self.variance_shape(num_classes, m, D, covariance))

    def dataset_size(self, configured, fitted_size, batch):
        N = super().dataset_size(configured, fitted_size, batch)
        if batch > N:
            raise ValueError(
                f"the batch ({batch} samples) is larger than the samples per epoch ({N:g}) that the "
                f"streamed update assumes (CEMLoss's dataset_size, else the last refit's "
                f"epoch_size or number of features): pass refit(..., epoch_size=...) or "
                f"CEMLoss(dataset_size=...)"
            )
        return N

    def math(self, counts, stat, pi, variance, p):
        """Eq. 5-7; returns the streamed state, which CEMLoss keeps in training mode."""
        K = counts.shape[0]
        fn = paper_full if p.covariance == "full" else paper_diag
        loss, coef, new_pi, new_var = fn(
            counts,
            stat,
            pi.reshape(K),
            variance.reshape(K, *variance.shape[2:]),
            sigma=p.sigma,
            dataset_size=p.dataset_size,
            reduction=p.reduction,
        )
        return loss, coef, new_pi.view_as(pi), new_var.view_as(variance)

    def entropy_bound(self, pi, variance, sigma, D):
        K = pi.numel()
        return entropy_bound(pi.reshape(K), variance.reshape(K, *variance.shape[2:]), sigma)
