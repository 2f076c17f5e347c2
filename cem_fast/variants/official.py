"""The ``official`` variant: the loss of the authors' ``model_training_GMM.py`` (``compute_class_means``).

Per batch, each cluster's diagonal variance is measured from its members alone and the loss is
``(1/|P|) sum_c sum_j (n_cj / n_c) mean_d log(v_cjd + sigma^2 + 1e-6)`` over the classes ``P`` present in
the batch. Nothing is carried between batches: ``pi`` holds the refit's within-class shares (unused by the
loss) and ``variance`` is empty. Each refit starts k-means from random members, as the authors' code does.
"""

from __future__ import annotations

import torch

from .base import Variant, group_counts, num_present, register

OFFICIAL_EPS = 1e-6  # added inside the log by the authors' model_training_GMM.py


@register
class Official(Variant):
    name = "official"
    code = 0
    default_clusters = 10
    kmeans_iters = 60
    warm_start = False
    fresh_init = "random"

    def variance_shape(self, num_classes, m, D, covariance):
        return (num_classes, m, 0)

    def state_from_kmeans(self, x, result, num_classes, m, covariance):
        counts = result.counts
        pi = counts / counts.view(num_classes, m).sum(1).repeat_interleave(m).clamp_min(1)
        return pi.reshape(num_classes, m), x.new_zeros(num_classes, m, 0)

    def dataset_size(self, configured, fitted_size, batch):
        return None

    def math(self, counts, stat, pi, variance, p):
        """``(1/|P|) sum_c sum_j (n_cj/n_c) mean_d log(v + sigma^2 + 1e-6)``; the state is returned unchanged."""
        sqdev, m = stat, p.m
        D = sqdev.shape[1]
        n_group = group_counts(counts, m, p.class_conditional)
        present = counts > 0
        n_safe = counts.clamp_min(1.0)
        weight = torch.where(present, counts / n_group.clamp_min(1.0), torch.zeros_like(counts))
        arg = sqdev / n_safe[:, None] + (p.sigma * p.sigma + OFFICIAL_EPS)
        num_p = num_present(counts, m, p.class_conditional)
        loss = (weight * torch.log(arg).mean(1)).sum() / num_p
        coef = (weight / (num_p * D * n_safe))[:, None] / arg
        return loss, coef, pi, variance
