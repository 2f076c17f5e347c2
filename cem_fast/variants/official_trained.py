"""The ``official-trained`` variant: the loss the authors' training scripts ran (``model_training_paral_pruning.py``).

Each cluster keeps one scalar variance (the mean over dimensions), measured at the refit. Per batch it is
blended with the batch's own: ``v = lam * s + (1 - lam) * variance`` with ``lam = 10 n / (pi N / C)``
(``0.99`` once it reaches 1), and the loss is the hinge ``pi * relu(log(v + 0.01) - log(var_threshold
sigma^2 + 0.01))`` (``log_entropy=1``) or ``pi * (v + 0.001)`` (``log_entropy=0``), summed over the present
clusters and divided by the number of classes present. ``pi`` holds within-class shares. The state is not
updated between refits. ``replicate_index_bug=True`` reproduces a row-index slip of the authors' loop (see
``index_bug_rows``).
"""

from __future__ import annotations

import torch

from .. import checks
from ..clustering import cluster_sums, default_sum_method
from ..theory import entropy_bound
from .base import Variant, num_present, register

TRAINED_GAMMA = 0.01  # added inside both logs by model_training_paral_pruning.py
TRAINED_LINEAR_EPS = 0.001  # log_entropy=0 offset
TRAINED_LAMBDA_SCALE = 10.0  # the authors' scaling_lambda
TRAINED_LAMBDA_CAP = 0.99  # value used when the blend weight reaches 1

_THRESHOLDS: dict = {}


def trained_threshold(sigma: float, var_threshold: float) -> float:
    """The hinge constant ``log(var_threshold * sigma^2 + 0.01)``, built in float32 as the authors do."""
    key = (sigma, var_threshold)
    if key not in _THRESHOLDS:  # cached: it is read on every loss evaluation
        _THRESHOLDS[key] = float(torch.log(var_threshold * torch.tensor(sigma**2) + TRAINED_GAMMA))
    return _THRESHOLDS[key]


def index_bug_rows(counts: torch.Tensor, m: int) -> torch.Tensor:
    """For each class, the class whose pi and variance the authors' code reads.

    Their loop over the present classes (ascending) uses its counter ``l`` to index a per-sample stack of
    the label-sorted batch, so class number ``l`` reads the row of the class of sorted sample ``l``.
    """
    class_counts = counts.view(-1, m).sum(1)
    rank = torch.cumsum((class_counts > 0).to(torch.int64), 0) - 1
    ends = torch.cumsum(class_counts, 0)
    src = torch.searchsorted(ends, rank.clamp_min(0).to(ends.dtype), right=True)
    return src.clamp_max(class_counts.shape[0] - 1)


def trained_diag(
    counts,
    sqdev,
    pi,
    variance,
    *,
    m,
    num_classes,
    dataset_size,
    threshold,
    log_entropy,
    replicate_index_bug,
    class_conditional,
):
    """The variant's math on ``counts [K]``, ``sqdev [K, D]`` and the state ``pi``, ``variance`` (``K`` values
    each): ``(loss, coef [K, 1])``. ``threshold`` is the hinge constant (``trained_threshold``), given as the
    kernels take it; backends without a kernel for a size call this too."""
    D = sqdev.shape[1]
    pi_k, var_k = pi.reshape(-1), variance.reshape(-1)
    if replicate_index_bug:
        rows = index_bug_rows(counts, m)
        pi_k = pi_k.view(-1, m)[rows].reshape(-1)
        var_k = var_k.view(-1, m)[rows].reshape(-1)
    present = counts > 0
    n_safe = counts.clamp_min(1.0)
    s = sqdev.sum(1) / (n_safe * D)
    per_class = dataset_size / num_classes
    lam = TRAINED_LAMBDA_SCALE * counts / (pi_k * per_class)
    lam = torch.where(lam >= 1, torch.full_like(lam, TRAINED_LAMBDA_CAP), lam)
    lam = torch.where(present, lam, torch.zeros_like(lam))
    v = lam * s + (1 - lam) * var_k
    if log_entropy:
        arg = torch.log(v + TRAINED_GAMMA) - threshold
        term = pi_k * torch.relu(arg)
        dterm_dv = torch.where(arg > 0, pi_k / (v + TRAINED_GAMMA), torch.zeros_like(v))
    else:
        term = pi_k * (v + TRAINED_LINEAR_EPS)
        dterm_dv = pi_k
    num_p = num_present(counts, m, class_conditional)
    zero = torch.zeros_like(term)
    loss = torch.where(present, term, zero).sum() / num_p
    coef = torch.where(present, dterm_dv * lam / (n_safe * D), zero) / num_p
    return loss, coef[:, None]


@register
class OfficialTrained(Variant):
    name = "official-trained"
    code = 1
    default_clusters = 5
    defaults = {"var_threshold": 0.125, "log_entropy": 1, "replicate_index_bug": False}

    def check_options(self, options):
        return {
            "var_threshold": checks.positive_float("var_threshold", options["var_threshold"]),
            "log_entropy": checks.choice("log_entropy", options["log_entropy"], (0, 1)),
            "replicate_index_bug": bool(options["replicate_index_bug"]),
        }

    def check_config(self, covariance, reduction, class_conditional):
        super().check_config(covariance, reduction, class_conditional)
        if self.options["replicate_index_bug"] and not class_conditional:
            raise ValueError("replicate_index_bug=True needs class_conditional=True")

    def variance_shape(self, num_classes, m, D, covariance):
        return (num_classes, m)

    def state_from_kmeans(self, x, result, num_classes, m, covariance):
        counts, D = result.counts, x.shape[1]
        pi = counts.view(num_classes, m) / counts.view(num_classes, m).sum(1, keepdim=True).clamp_min(1)
        sq = cluster_sums((result.sq_dist / D)[:, None], result.assign, num_classes * m, default_sum_method(x))[0][:, 0]
        return pi, (sq / counts.clamp_min(1)).reshape(num_classes, m)

    def kernel_options(self, sigma):
        o = self.options
        return trained_threshold(sigma, o["var_threshold"]), bool(o["log_entropy"]), o["replicate_index_bug"]

    def math(self, counts, stat, pi, variance, p):
        """The authors' ``compute_class_means`` of their training scripts; the state is returned unchanged."""
        o = self.options
        loss, coef = trained_diag(
            counts,
            stat,
            pi,
            variance,
            m=p.m,
            num_classes=p.num_classes,
            dataset_size=p.dataset_size,
            threshold=trained_threshold(p.sigma, o["var_threshold"]),
            log_entropy=bool(o["log_entropy"]),
            replicate_index_bug=o["replicate_index_bug"],
            class_conditional=p.class_conditional,
        )
        return loss, coef, pi, variance

    def entropy_bound(self, pi, variance, sigma, D):
        # within-class shares -> mixture weights (classes equally likely); one variance for every dimension
        k_pi = pi.reshape(-1) / pi.shape[0]
        return entropy_bound(k_pi, variance.reshape(-1, 1).expand(-1, D), sigma)
