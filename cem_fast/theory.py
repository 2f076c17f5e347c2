"""The paper's information-theoretic quantities: the entropy bound (Eq. 3) and Theorem 1's MSE floor."""

from __future__ import annotations

import math

import torch


def entropy_bound(pi: torch.Tensor, covariance: torch.Tensor, sigma: float) -> torch.Tensor:
    """Differentiable lower bound of Eq. 3 on H(x | z_noisy), up to the constant H(x).

    ``-sum_k pi_k * (-log pi_k + 1/2 log(|Sigma_k + sigma^2 I| / |sigma^2 I|))``.

    Args:
        pi: mixture weights ``[K]`` (any shape; flattened), summing to 1.
        covariance: ``[K]`` isotropic variances (dimension then unknown: treated as 1),
            ``[K, D]`` diagonal variances or ``[K, D, D]`` full covariances (same leading shape as ``pi``).
        sigma: std of the Gaussian noise, ``> 0``.
    """
    if not isinstance(sigma, (int, float)) or sigma <= 0:
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    p = pi.reshape(-1)
    k = p.numel()
    cov = covariance.reshape(k, *covariance.shape[pi.dim() :])
    s2 = sigma * sigma
    if cov.dim() == 1:
        half_logdet = 0.5 * torch.log1p(cov / s2)
    elif cov.dim() == 2:
        half_logdet = 0.5 * torch.log1p(cov / s2).sum(-1)
    elif cov.dim() == 3:
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        half_logdet = 0.5 * torch.linalg.slogdet(cov / s2 + eye).logabsdet
    else:
        raise ValueError(f"covariance must have 1 to 3 dimensions beyond pi's, got shape {tuple(covariance.shape)}")
    neg_log_p = torch.where(p > 0, -torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p))
    return -(p * (neg_log_p + half_logdet)).sum()


def mse_lower_bound(h_cond, d: int):
    """Theorem 1: the attacker's best per-dimension MSE is at least ``exp(2 h / d) / (2 pi e)``.

    ``h_cond`` is the conditional entropy H(x | z) in nats (float or tensor), ``d`` the input dimension.
    """
    if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
        raise ValueError(f"d must be a positive int (the input dimension), got {d!r}")
    if isinstance(h_cond, torch.Tensor):
        return torch.exp(2.0 * h_cond / d) / (2.0 * math.pi * math.e)
    return math.exp(2.0 * float(h_cond) / d) / (2.0 * math.pi * math.e)
