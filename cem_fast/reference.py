"""Float64 reference implementation of every variant, written for clarity (Python loops, autograd).

This is the ground truth of the test suite: the fast paths must match its loss, its gradient (here
obtained by autograd, and checked with ``torch.autograd.gradcheck``) and its state update.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .variants import (
    OFFICIAL_EPS,
    TRAINED_GAMMA,
    TRAINED_LAMBDA_CAP,
    TRAINED_LAMBDA_SCALE,
    TRAINED_LINEAR_EPS,
    trained_threshold,
)


def reference_assign(
    z: torch.Tensor, labels: Optional[torch.Tensor], centroids: torch.Tensor, class_conditional: bool = True
) -> list[tuple[int, int]]:
    """``(class, cluster)`` of the nearest centroid for every row, ties to the lowest index."""
    C, m, _ = centroids.shape
    out = []
    for i in range(z.shape[0]):
        zi = z[i].detach().double()
        cands = (
            [(int(labels[i]), j) for j in range(m)]
            if class_conditional
            else [(c, j) for c in range(C) for j in range(m)]
        )
        dists = [float(((zi - centroids[c, j].double()) ** 2).sum()) for c, j in cands]
        out.append(cands[dists.index(min(dists))])
    return out


def _members(assign, key):
    return [i for i, a in enumerate(assign) if a == key]


def reference_loss(
    z: torch.Tensor,
    labels: Optional[torch.Tensor],
    centroids: torch.Tensor,
    *,
    variant: str = "paper",
    sigma: float = 0.025,
    pi: Optional[torch.Tensor] = None,
    variance: Optional[torch.Tensor] = None,
    dataset_size: Optional[float] = None,
    covariance: str = "diag",
    reduction: str = "mean_dim",
    class_conditional: bool = True,
    var_threshold: float = 0.125,
    log_entropy: int = 1,
    replicate_index_bug: bool = False,
):
    """Loss for a batch ``z [B, D]`` (float64), and for the paper variant the updated ``(pi, variance)``.

    Returns ``(loss, new_pi, new_variance)``; the last two are ``None`` for the official variants.
    ``centroids [C, m, D]``; ``pi [C, m]``; ``variance``: ``[C, m]`` (official-trained),
    ``[C, m, D]`` (paper, diag) or ``[C, m, D, D]`` (paper, full).
    """
    z = z.reshape(z.shape[0], -1)
    C, m, D = centroids.shape
    mu = centroids.double()
    assign = reference_assign(z, labels, mu, class_conditional)
    groups = list(range(C)) if class_conditional else [None]

    def group_of(c):
        return c if class_conditional else None

    present = [g for g in groups if any(group_of(a[0]) == g for a in assign)]
    s2 = sigma * sigma
    zero = z.sum() * 0.0

    if variant == "official":
        loss = zero
        for g in present:
            n_group = sum(1 for a in assign if group_of(a[0]) == g)
            for c in range(C) if g is None else [g]:
                for j in range(m):
                    idx = _members(assign, (c, j))
                    if not idx:
                        continue
                    v = torch.stack([(z[i] - mu[c, j]) ** 2 for i in idx]).mean(0)
                    loss = loss + (len(idx) / n_group) * torch.log(v + s2 + OFFICIAL_EPS).mean()
        return loss / max(len(present), 1), None, None

    if variant == "official-trained":
        per_class = dataset_size / C
        threshold = trained_threshold(sigma, var_threshold)
        sorted_labels = sorted(int(a[0]) for a in assign)
        loss = zero
        for rank, g in enumerate(present):
            for c in range(C) if g is None else [g]:
                row = sorted_labels[rank] if replicate_index_bug else c
                for j in range(m):
                    idx = _members(assign, (c, j))
                    if not idx:
                        continue
                    p, v_epoch = float(pi[row, j]), float(variance[row, j])
                    s = torch.stack([((z[i] - mu[c, j]) ** 2).mean() for i in idx]).mean()
                    lam = TRAINED_LAMBDA_SCALE * len(idx) / (p * per_class) if p > 0 else math.inf
                    lam = TRAINED_LAMBDA_CAP if lam >= 1 else lam
                    v = lam * s + (1 - lam) * v_epoch
                    if log_entropy:
                        loss = loss + p * torch.relu(torch.log(v + TRAINED_GAMMA) - threshold)
                    else:
                        loss = loss + p * (v + TRAINED_LINEAR_EPS)
        return loss / max(len(present), 1), None, None

    if variant != "paper":
        raise ValueError(f"unknown variant {variant!r}")
    batch = z.shape[0]
    N = float(dataset_size)
    new_pi = pi.double().clone()
    new_var = []
    loss = zero
    for c in range(C):
        for j in range(m):
            idx = _members(assign, (c, j))
            n = len(idx)
            p = (float(pi[c, j]) * (N - batch) + n) / N  # Eq. 5
            new_pi[c, j] = p
            old = variance[c, j].double()
            if n:
                diffs = [z[i] - mu[c, j] for i in idx]
                if covariance == "full":
                    d_sigma = sum(torch.outer(d, d) for d in diffs) / n
                else:
                    d_sigma = sum(d * d for d in diffs) / n
                alpha = min(max(n / (p * N), 0.0), 1.0)  # Eq. 6
                sig = (1 - alpha) * old + alpha * d_sigma
            else:
                sig = old
            new_var.append(sig)
            if covariance == "full":
                logdet = torch.linalg.slogdet(sig + s2 * torch.eye(D, dtype=torch.float64)).logabsdet
            else:
                logdet = torch.log(sig + s2).sum()
            neg_log_p = -math.log(p) if p > 0 else 0.0
            loss = loss + p * (neg_log_p + 0.5 * logdet - 0.5 * D * math.log(s2))  # Eq. 7
    if reduction == "mean_dim":
        loss = loss / D
    new_var = torch.stack(new_var).reshape(variance.shape)
    return loss, new_pi, new_var.detach()
