"""The authors' per-class k-means refit (``PP`` ``kmeans_cuda``), restated in plain PyTorch for timing.

Written from a description of their ``kmeans_cuda`` (the ``PP`` training script), not from their code.
It keeps the shape of their work, which is what a timing must reproduce:

* one class at a time (a Python loop over classes);
* k-means++ start on the first epoch (``k`` sequential distance passes, D^2-weighted ``multinomial``
  draws), a warm start from the previous epoch's centroids afterwards;
* at most 50 Lloyd iterations, each a ``cdist`` + ``argmin``, a ``torch.unique`` of the assignment, a
  Python loop over the clusters with boolean-mask means (an empty cluster keeps its stale centroid),
  and a ``torch.equal`` convergence test on the assignment;
* per cluster: the scalar variance (mean over members and dimensions of the squared distance to the
  centroid), built with ``torch.tensor([...])`` from per-cluster scalars; the weight ``n_j / N_c`` and
  the full unbiased ``D x D`` covariance for clusters with at least two members; lists padded at the end
  when clusters are missing (variances with the last value, weights with 0.01).

Used by ``bench/bench_kernels.py`` as the baseline of ``CEMLoss.refit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

MAX_ITER = 50
PAD_WEIGHT = 0.01


@dataclass
class ClassFit:
    """One class's result, as the authors keep it (lists indexed by cluster)."""

    centroids: torch.Tensor  # [k, D]
    variances: torch.Tensor  # [k] after padding
    weights: torch.Tensor  # [k] after padding
    covariances: List[torch.Tensor] = field(default_factory=list)  # [D, D] per cluster with >= 2 members
    iterations: int = 0


def kmeanspp_start(x: torch.Tensor, k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """k-means++ seeding: one uniform draw, then each next centre drawn with probability ~ squared distance."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator).item()
    centres = [x[first]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(dim=1).values ** 2
        weights = d2.cpu() if generator is not None else d2
        if float(weights.sum()) <= 0:  # all points coincide with a centre already
            weights = torch.ones_like(weights)
        pick = torch.multinomial(weights, 1, generator=generator).item()
        centres.append(x[pick])
    return torch.stack(centres)


def lloyd(x: torch.Tensor, centroids: torch.Tensor, max_iter: int = MAX_ITER):
    """Lloyd steps until the assignment repeats; returns the centroids, the last assignment and the steps run."""
    k = centroids.shape[0]
    centroids = centroids.clone()
    previous = None
    steps = 0
    for steps in range(1, max_iter + 1):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        torch.unique(assign)  # their per-iteration bookkeeping (a sync)
        if previous is not None and torch.equal(assign, previous):
            break
        for j in range(k):
            members = assign == j
            if members.any():  # one host sync per cluster, as theirs
                centroids[j] = x[members].mean(dim=0)
        previous = assign
    return centroids, assign, steps


def class_statistics(
    x: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor, covariances: bool = True
) -> ClassFit:
    """Per-cluster variances, weights and (optionally) full covariances, padded as the authors pad them."""
    k, n = centroids.shape[0], x.shape[0]
    variances, weights, covs = [], [], []
    for j in range(k):
        members = x[assign == j]
        if members.shape[0] == 0:
            continue
        variances.append(((members - centroids[j]) ** 2).mean())
        if members.shape[0] >= 2:
            weights.append(members.shape[0] / n)
            if covariances:
                covs.append(torch.cov(members.t()))  # around the cluster's own mean, / (n - 1)
    variances = torch.tensor([float(v) for v in variances], device=x.device)
    weights = torch.tensor(weights, device=x.device)
    if variances.numel() < k:
        last = variances[-1:] if variances.numel() else torch.zeros(1, device=x.device)
        variances = torch.cat([variances, last.expand(k - variances.numel())])
    if weights.numel() < k:
        weights = torch.cat([weights, torch.full((k - weights.numel(),), PAD_WEIGHT, device=x.device)])
    return ClassFit(centroids, variances, weights, covs)


def refit(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    k: int,
    *,
    previous: Optional[List[ClassFit]] = None,
    covariances: bool = True,
    max_iter: int = MAX_ITER,
    generator: Optional[torch.Generator] = None,
) -> List[ClassFit]:
    """One epoch's refit: per class, k-means (k-means++ if ``previous`` is None, else warm) and statistics.

    ``x [N, D]`` float features, ``labels [N]`` int64. Classes with fewer than ``k`` samples are skipped
    (their entry is ``None``), as a class that cannot seed ``k`` clusters.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be [{x.shape[0]}], got shape {tuple(labels.shape)}")
    fits: List[Optional[ClassFit]] = []
    for c in range(num_classes):
        xc = x[labels == c]
        if xc.shape[0] < k:
            fits.append(None)
            continue
        if previous is not None and previous[c] is not None:
            start = previous[c].centroids
        else:
            start = kmeanspp_start(xc, k, generator)
        cent, assign, steps = lloyd(xc, start, max_iter)
        fit = class_statistics(xc, cent, assign, covariances)
        fit.iterations = steps
        fits.append(fit)
    return fits
