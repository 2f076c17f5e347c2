"""Each variant's math on the per-cluster sufficient statistics: loss, its gradient and the new state.

Inputs are the batch statistics of the ``K = num_classes * m`` clusters (cluster ``k = c * m + j``):
``counts [K]`` (members in the batch) and ``sqdev [K, D]`` (sum over members of ``(z - mu)^2``), or
for full covariance ``moments [K, D, D]`` (sum of ``(z - mu)(z - mu)^T``). Every function returns the
loss and ``coef``, the gradient of the loss with respect to the statistic (``dL/dsqdev`` as ``[K, D]``
or ``[K, 1]``; ``dL/dmoments`` as ``[K, D, D]``), from which the backward pass writes
``dL/dz_i = 2 * coef[a_i] * (z_i - mu[a_i])`` (matrix product for full covariance).
Everything here is tensor math with no host synchronisation; it runs under ``torch.no_grad``.
"""
from __future__ import annotations

import math

import torch

OFFICIAL_EPS = 1e-6          # added inside the log by the authors' model_training_GMM.py
TRAINED_GAMMA = 0.01         # added inside both logs by model_training_paral_pruning.py
TRAINED_LINEAR_EPS = 0.001   # log_entropy=0 offset
TRAINED_LAMBDA_SCALE = 10.0  # the authors' scaling_lambda
TRAINED_LAMBDA_CAP = 0.99    # value used when the blend weight reaches 1


def _group_counts(counts: torch.Tensor, m: int, class_conditional: bool) -> torch.Tensor:
    """Samples per group (class, or one group of all clusters), broadcast back to ``[K]``."""
    if class_conditional:
        return counts.view(-1, m).sum(1).repeat_interleave(m)
    return counts.sum().expand(counts.shape[0])


def _num_present(counts: torch.Tensor, m: int, class_conditional: bool) -> torch.Tensor:
    """|P|: classes present in the batch (1 when not class-conditional), at least 1 to keep an empty batch at 0."""
    if class_conditional:
        present = (counts.view(-1, m).sum(1) > 0).to(counts.dtype).sum()
    else:
        present = (counts.sum() > 0).to(counts.dtype)
    return present.clamp_min(1.0)


def official(counts, sqdev, *, m, class_conditional, sigma):
    """``model_training_GMM.compute_class_means``: ``(1/|P|) sum_c sum_j (n_cj/n_c) mean_d log(v + sigma^2 + 1e-6)``."""
    K, D = sqdev.shape
    n_group = _group_counts(counts, m, class_conditional)
    present = counts > 0
    n_safe = counts.clamp_min(1.0)
    weight = torch.where(present, counts / n_group.clamp_min(1.0), torch.zeros_like(counts))
    arg = sqdev / n_safe[:, None] + (sigma * sigma + OFFICIAL_EPS)
    num_p = _num_present(counts, m, class_conditional)
    loss = (weight * torch.log(arg).mean(1)).sum() / num_p
    coef = (weight / (num_p * D * n_safe))[:, None] / arg
    return loss, coef


_THRESHOLDS: dict = {}


def trained_threshold(sigma: float, var_threshold: float) -> float:
    """The hinge constant ``log(var_threshold * sigma^2 + 0.01)``, built in float32 as the authors do."""
    key = (sigma, var_threshold)
    if key not in _THRESHOLDS:  # cached: it is read on every loss evaluation
        _THRESHOLDS[key] = float(torch.log(var_threshold * torch.tensor(sigma ** 2) + TRAINED_GAMMA))
    return _THRESHOLDS[key]


def index_bug_rows(counts: torch.Tensor, m: int) -> torch.Tensor:
    """For each class, the class whose pi and variance the authors' code reads (facts 1B step 4).

    Their loop over the present classes (ascending) uses its counter ``l`` to index a per-sample stack of
    the label-sorted batch, so class number ``l`` reads the row of the class of sorted sample ``l``.
    """
    class_counts = counts.view(-1, m).sum(1)
    rank = torch.cumsum((class_counts > 0).to(torch.int64), 0) - 1
    ends = torch.cumsum(class_counts, 0)
    src = torch.searchsorted(ends, rank.clamp_min(0).to(ends.dtype), right=True)
    return src.clamp_max(class_counts.shape[0] - 1)


def official_trained(counts, sqdev, pi, variance, *, m, class_conditional, sigma, num_classes,
                     dataset_size, var_threshold, log_entropy, replicate_index_bug):
    """``model_training_paral_pruning.compute_class_means`` (facts 1B) with a scalar variance per cluster."""
    K, D = sqdev.shape
    if replicate_index_bug:
        rows = index_bug_rows(counts, m)
        pi = pi.view(-1, m)[rows].reshape(-1)
        variance = variance.view(-1, m)[rows].reshape(-1)
    present = counts > 0
    n_safe = counts.clamp_min(1.0)
    s = sqdev.sum(1) / (n_safe * D)
    per_class = dataset_size / num_classes
    lam = TRAINED_LAMBDA_SCALE * counts / (pi * per_class)
    lam = torch.where(lam >= 1, torch.full_like(lam, TRAINED_LAMBDA_CAP), lam)
    lam = torch.where(present, lam, torch.zeros_like(lam))
    v = lam * s + (1 - lam) * variance
    if log_entropy:
        arg = torch.log(v + TRAINED_GAMMA) - trained_threshold(sigma, var_threshold)
        term = pi * torch.relu(arg)
        dterm_dv = torch.where(arg > 0, pi / (v + TRAINED_GAMMA), torch.zeros_like(v))
    else:
        term = pi * (v + TRAINED_LINEAR_EPS)
        dterm_dv = pi
    num_p = _num_present(counts, m, class_conditional)
    zero = torch.zeros_like(term)
    loss = torch.where(present, term, zero).sum() / num_p
    coef = torch.where(present, dterm_dv * lam / (n_safe * D), zero) / num_p
    return loss, coef[:, None]


def _paper_weights(counts, pi, dataset_size):
    """Eq. 5 (streamed pi) and Eq. 6's blend weight alpha."""
    batch = counts.sum()
    pi_new = (pi * (dataset_size - batch) + counts) / dataset_size
    alpha = torch.where(counts > 0, (counts / (pi_new * dataset_size)).clamp(0, 1), torch.zeros_like(counts))
    return pi_new, alpha


def _neg_pi_log_pi(pi):
    return torch.where(pi > 0, -pi * torch.log(pi.clamp_min(torch.finfo(pi.dtype).tiny)), torch.zeros_like(pi))


def paper_diag(counts, sqdev, pi, variance, *, sigma, dataset_size, reduction):
    """Eq. 5-7 with diagonal covariances. Returns ``loss, coef, pi_new, variance_new``."""
    K, D = sqdev.shape
    s2 = sigma * sigma
    pi_new, alpha = _paper_weights(counts, pi, dataset_size)
    n_safe = counts.clamp_min(1.0)
    blend = alpha[:, None]
    var_new = torch.where((counts > 0)[:, None], (1 - blend) * variance + blend * (sqdev / n_safe[:, None]), variance)
    half_logdet = 0.5 * torch.log1p(var_new / s2).sum(1)        # 1/2 logdet(S + s2 I) - D/2 log s2
    scale = 1.0 / D if reduction == "mean_dim" else 1.0
    loss = scale * (_neg_pi_log_pi(pi_new) + pi_new * half_logdet).sum()
    coef = (scale * 0.5 * pi_new * alpha / n_safe)[:, None] / (var_new + s2)
    return loss, coef, pi_new, var_new


def paper_full(counts, moments, pi, covariance, *, sigma, dataset_size, reduction):
    """Eq. 5-7 with full covariances: batched Cholesky for the log-det (no host sync).

    Returns ``loss, (chol, factor), pi_new, covariance_new``: the gradient coefficient of cluster ``k`` is
    ``factor[k] * (I + S_k/s2)^-1`` with ``chol[k]`` the Cholesky factor of ``I + S_k/s2``. It stays
    factored: the backward needs it only against the batch's rows (``full_coef_solve``), ``B D^2`` work
    where the explicit inverse is ``K D^3`` (``full_coef_matrix`` when a kernel wants the matrix).
    """
    K, D, _ = moments.shape
    s2 = sigma * sigma
    pi_new, alpha = _paper_weights(counts, pi, dataset_size)
    n_safe = counts.clamp_min(1.0)
    # alpha = 0 for an empty cluster, and lerp with weight 0 returns the start exactly: no where() needed.
    # Each op here is a pass over K D^2 elements, as costly as the factorisation on the CPU: keep them few.
    cov_new = torch.lerp(covariance, moments / n_safe[:, None, None], alpha[:, None, None])
    a = cov_new / s2
    a.diagonal(dim1=-2, dim2=-1).add_(1.0)                        # I + S/s2: always positive definite
    chol, _ = torch.linalg.cholesky_ex(a)
    # the log-det of I + S/s2, not of S + s2 I: the latter less D log s2 cancels catastrophically in fp32
    half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    scale = 1.0 / D if reduction == "mean_dim" else 1.0
    loss = scale * (_neg_pi_log_pi(pi_new) + pi_new * half_logdet).sum()
    # (S + s2 I)^-1 = (I + S/s2)^-1 / s2, with the 1/s2 folded into the per-cluster factor
    factor = scale * 0.5 * pi_new * alpha / (n_safe * s2)
    return loss, (chol, factor), pi_new, cov_new


def full_coef_matrix(chol: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``[K, D, D]``: ``factor[k] * (L_k L_k^T)^-1``, the explicit gradient coefficient of ``paper_full``."""
    return torch.cholesky_inverse(chol).mul_(factor[:, None, None])


def full_coef_solve(chol_k: torch.Tensor, factor_k: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """``factor_k * (L_k L_k^T)^-1 diff_i`` for the rows ``diff [n, D]`` of one cluster."""
    return torch.cholesky_solve(diff.t(), chol_k).t() * factor_k

