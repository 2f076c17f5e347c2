"""The CEM loss as one autograd.Function over two registered custom ops.

``cem_fast::assign_stats`` (nearest cluster + per-cluster counts and squared deviations) and
``cem_fast::scatter_grad`` (``dz_i = coef[a_i] * (z_i - mu[a_i])``) dispatch to the chosen backend
and are registered with ``torch.library`` (schema, fake implementation, autograd), so a training step
with ``CEMLoss`` runs under ``torch.compile``. ``CEMFunction`` runs the forward statistics, the variant
math of ``cem_fast.variants`` (tiny ``[K, D]`` tensors) and, in backward, one ``scatter_grad`` pass.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends, variants
from .clustering import cluster_member_diffs, cluster_second_moments
from .distributed import all_reduce_sum, world_size

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("cem_fast::assign_stats", mutates_args=())
def assign_stats(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int,
                 class_conditional: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sqdev [K, D], counts [K], assign [B])``: the clusters' squared deviations and counts, and the
    nearest cluster of each row of ``z [B, D]`` (floating outputs first, as opcheck's autograd test needs)."""
    assign, counts, sqdev = backends.get(backend).assign_stats(z, labels, centroids, m, class_conditional)
    return sqdev, counts, assign


@assign_stats.register_fake
def _(z, labels, centroids, m, class_conditional, backend):
    K, D = centroids.shape
    return (centroids.new_empty(K, D), centroids.new_empty(K), z.new_empty(z.shape[0], dtype=torch.int64))


@torch.library.custom_op("cem_fast::scatter_grad", mutates_args=())
def scatter_grad(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, coef: torch.Tensor,
                 backend: str) -> torch.Tensor:
    """``dz[i] = coef[assign[i]] * (z[i] - centroids[assign[i]])`` in ``z``'s dtype."""
    return backends.get(backend).scatter_grad(z, assign, centroids, coef.expand(centroids.shape).contiguous())


@scatter_grad.register_fake
def _(z, assign, centroids, coef, backend):
    return z.new_empty(z.shape)  # contiguous, as every backend returns


def _assign_stats_setup(ctx, inputs, output):
    z, _, centroids, _, _, backend = inputs
    ctx.save_for_backward(z, output[2], centroids)
    ctx.backend = backend


def _assign_stats_backward(ctx, grad_sqdev, grad_counts, grad_assign):
    z, assign, centroids = ctx.saved_tensors
    return scatter_grad(z, assign, centroids, 2 * grad_sqdev, ctx.backend), None, None, None, None, None


assign_stats.register_autograd(_assign_stats_backward, setup_context=_assign_stats_setup)


def _stats(z, labels, centroids, m, class_conditional, backend):
    """``assign_stats`` through the registered op when tracing (torch.compile), else straight to the backend:
    the custom-op dispatcher costs about 0.1 ms a call, as much as the whole op at B=128 on a CPU."""
    if torch.compiler.is_compiling():
        return assign_stats(z, labels, centroids, m, class_conditional, backend)
    assign, counts, sqdev = backends.get(backend).assign_stats(z, labels, centroids, m, class_conditional)
    return sqdev, counts, assign


def _gather_grad(z, assign, centroids, coef, backend):
    if torch.compiler.is_compiling():
        return scatter_grad(z, assign, centroids, coef, backend)
    if backend in ("torch", "cpp"):  # both broadcast a [K, 1] coefficient themselves
        return backends.get(backend).scatter_grad(z, assign, centroids, coef)
    return backends.get(backend).scatter_grad(z, assign, centroids, coef.expand(centroids.shape).contiguous())


# --------------------------------------------------------------------------- full covariance (torch)


def _member_diff(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor):
    """``(z - mu[a] [B, D], one-hot [B, K])`` with rows of ``assign == -1`` (a label out of range on the
    GPU backends, which cannot raise without a host sync) zeroed: they belong to no cluster."""
    valid = (assign >= 0)[:, None]
    a = assign.clamp_min(0)
    diff = (z.to(centroids.dtype) - centroids[a]) * valid
    onehot = torch.nn.functional.one_hot(a, centroids.shape[0]).to(diff.dtype) * valid   # one_hot(-1) asserts on CUDA
    return diff, onehot


def second_moments(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``[K, D, D]``: per cluster the sum of ``(z - mu)(z - mu)^T``, one batched product, no host sync."""
    diff, onehot = _member_diff(z, assign, centroids)
    masked = onehot.t()[:, :, None] * diff[None]                              # [K, B, D]
    return masked.transpose(1, 2) @ diff                                      # [K, D, D]


def matrix_grad(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``dz[i] = coef[a_i] @ (z_i - mu[a_i])`` for symmetric ``coef [K, D, D]``."""
    diff, onehot = _member_diff(z, assign, centroids)
    per_cluster = (onehot.t()[:, :, None] * diff[None]) @ coef                # [K, B, D]
    return per_cluster.sum(0).to(z.dtype)


def segmented_full_grad(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, chol: torch.Tensor,
                        factor: torch.Tensor) -> torch.Tensor:
    """``dz[i] = factor[a_i] (L L^T)^-1_{a_i} (z_i - mu[a_i])``: one Cholesky solve per cluster on the rows
    sorted by cluster (reads the cluster sizes: for the CPU), no explicit inverse."""
    dz = centroids.new_zeros(z.shape)
    for k, rows, diff in cluster_member_diffs(z, assign, centroids):
        dz[rows] = variants.full_coef_solve(chol[k], factor[k], diff)
    return dz.to(z.dtype)


# Grouped forms over the rows sorted by cluster do B D^2 work, where the batched form above does K B D^2 and
# builds a [K, B, D] tensor: Triton kernels on the GPU (IEEE fp32), a GEMM per cluster on the CPU (where
# reading the cluster sizes costs nothing). Under torch.compile the batched form is traced instead.
def _grouped(z, backend: str) -> Optional[str]:
    if torch.compiler.is_compiling():
        return None
    if backend == "triton":
        return "triton"
    return "cpu" if z.device.type == "cpu" else None


def _full_moments(z, assign, centroids, backend):
    kind = _grouped(z, backend)
    if kind == "triton":
        return backends.get(backend).cluster_second_moments(z, assign, centroids)
    if kind == "cpu":
        return cluster_second_moments(z, assign, centroids)
    return second_moments(z, assign, centroids)


def _full_grad(z, assign, centroids, chol, factor, backend):
    kind = _grouped(z, backend)
    if kind == "cpu":
        return segmented_full_grad(z, assign, centroids, chol, factor)
    coef = variants.full_coef_matrix(chol, factor)
    if kind == "triton":
        return backends.get(backend).matrix_grad(z, assign, centroids, coef)
    return matrix_grad(z, assign, centroids, coef)


# --------------------------------------------------------------------------- the loss

_VARIANT_CODES = {"official": 0, "official-trained": 1, "paper": 2}  # csrc/cem_cpu_variants.h


def _variant_math(variant, full, counts, stat, pi, variance, *, m, class_conditional, sigma, num_classes,
                  dataset_size, var_threshold, log_entropy, replicate_index_bug, reduction):
    """``cem_fast.variants`` on the statistics: ``(loss, coef, new_pi, new_variance)``."""
    if variant == "official":
        loss, coef = variants.official(counts, stat, m=m, class_conditional=class_conditional, sigma=sigma)
        return loss, coef, pi, variance
    if variant == "official-trained":
        loss, coef = variants.official_trained(
            counts, stat, pi.reshape(-1), variance.reshape(-1), m=m, class_conditional=class_conditional,
            sigma=sigma, num_classes=num_classes, dataset_size=dataset_size, var_threshold=var_threshold,
            log_entropy=log_entropy, replicate_index_bug=replicate_index_bug)
        return loss, coef, pi, variance
    math_fn = variants.paper_full if full else variants.paper_diag
    K = counts.shape[0]
    loss, coef, new_pi, new_var = math_fn(
        counts, stat, pi.reshape(K), variance.reshape(K, *variance.shape[2:]), sigma=sigma,
        dataset_size=dataset_size, reduction=reduction)
    return loss, coef, new_pi.view_as(pi), new_var.view_as(variance)



class CEMFunction(torch.autograd.Function):
    """Forward: statistics -> variant math -> loss (and the new state). Backward: one gather pass."""

    @staticmethod
    def forward(ctx, z, labels, centroids, pi, variance, variant: str, covariance: str, m: int,
                class_conditional: bool, sigma: float, reduction: str, num_classes: int,
                dataset_size: float, var_threshold: float, log_entropy: int, replicate_index_bug: bool,
                backend: str, process_group: Optional[object]):
        full = variant == "paper" and covariance == "full"
        fused = backend == "cpp" and not full and not torch.compiler.is_compiling()
        if fused:
            variant_code = _VARIANT_CODES[variant]
            threshold = variants.trained_threshold(sigma, var_threshold) if variant == "official-trained" else 0.0
        if fused and process_group is None:
            # One C++ call: statistics and the variant math (thirty ATen calls on tiny tensors cost more).
            loss, coef, new_pi, new_var, assign = backends.get(backend).forward_diag(
                z, labels, centroids, pi, variance, variant_code, m, class_conditional, sigma, num_classes,
                dataset_size, threshold, bool(log_entropy), replicate_index_bug, reduction == "mean_dim")
        else:
            sqdev, counts, assign = _stats(z, labels, centroids, m, class_conditional, backend)
            stat = _full_moments(z, assign, centroids, backend) if full else sqdev
            if process_group is not None:
                counts, stat = all_reduce_sum(counts, stat, process_group)
            if fused:
                loss, coef, new_pi, new_var = backends.get(backend).variant_math(
                    counts, stat, pi, variance, variant_code, m, class_conditional, sigma, num_classes,
                    dataset_size, threshold, bool(log_entropy), replicate_index_bug, reduction == "mean_dim")
            else:
                loss, coef, new_pi, new_var = _variant_math(
                    variant, full, counts, stat, pi, variance, m=m, class_conditional=class_conditional,
                    sigma=sigma, num_classes=num_classes, dataset_size=dataset_size, var_threshold=var_threshold,
                    log_entropy=log_entropy, replicate_index_bug=replicate_index_bug, reduction=reduction)
        if full:
            chol, factor = coef
            ctx.save_for_backward(z, assign, centroids, factor, chol)
        else:
            ctx.save_for_backward(z, assign, centroids, coef)
        ctx.full = full
        ctx.backend = backend
        ctx.grad_scale = 2.0 * world_size(process_group)
        ctx.mark_non_differentiable(new_pi, new_var)
        return loss, new_pi, new_var

    @staticmethod
    def backward(ctx, grad_loss, _grad_pi, _grad_var):
        z, assign, centroids, coef, *chol = ctx.saved_tensors   # chol: full covariance only
        # Under data parallelism every rank holds the global loss; DDP averages gradients over ranks,
        # so each rank's exact gradient is scaled by the world size (folded into grad_scale).
        scaled = coef * (grad_loss * ctx.grad_scale)       # for full covariance, the per-cluster factor
        if ctx.full:
            dz = _full_grad(z, assign, centroids, chol[0], scaled, ctx.backend)
        else:
            dz = _gather_grad(z, assign, centroids, scaled, ctx.backend)
        return (dz,) + (None,) * 17
