"""The CEM loss as one autograd.Function: z -> assign -> statistics -> variant math -> loss, and its backward.

Forward (``CEMFunction``): the backend's ``assign_stats`` gives each row of ``z [B, D]`` its nearest cluster
and the clusters' counts and squared deviations (for full covariance, ``cluster_second_moments``); under data
parallelism these are all-reduced; the variant's ``math`` (``cem_fast/variants/<name>.py``) turns them into the
loss, its gradient coefficient and the new state. Backward: one gather pass of the backend,
``dz_i = 2 * grad * coef[a_i] * (z_i - mu[a_i])`` (``scatter_grad``; a matrix product for full covariance).

The backend (``cem_fast/backends/<name>_backend.py``) is named by ``LossParams.backend``, already resolved by
``backends.resolve``. ``kernels`` is the one place that decides how it is called: directly in eager mode, or
through two ops registered with ``torch.library`` (schema, fake implementation, autograd) under
``torch.compile``, so that a training step with ``CEMLoss`` compiles. A backend may also offer a fused forward
(``forward_diag``) or the full-covariance gradient from the Cholesky factors; ``ops`` uses them when present.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends, full_covariance
from .distributed import all_reduce_sum, world_size

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("cem_fast::assign_stats", mutates_args=())
def assign_stats(
    z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int, class_conditional: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sqdev [K, D], counts [K], assign [B])``: the clusters' squared deviations and counts, and the
    nearest cluster of each row of ``z [B, D]`` (floating outputs first, as opcheck's autograd test needs)."""
    assign, counts, sqdev = backends.get(backend).assign_stats(z, labels, centroids, m, class_conditional)
    return sqdev, counts, assign


@assign_stats.register_fake
def _(z, labels, centroids, m, class_conditional, backend):
    K, D = centroids.shape
    return (centroids.new_empty(K, D), centroids.new_empty(K), z.new_empty(z.shape[0], dtype=torch.int64))


@torch.library.custom_op("cem_fast::scatter_grad", mutates_args=())
def scatter_grad(
    z: torch.Tensor,
    assign: torch.Tensor,
    centroids: torch.Tensor,
    coef: torch.Tensor,
    backend: str,
    grad_out: Optional[torch.Tensor] = None,
    factor: float = 1.0,
) -> torch.Tensor:
    """``dz[i] = factor * grad_out * coef[assign[i]] * (z[i] - centroids[assign[i]])`` in ``z``'s dtype."""
    return backends.get(backend).scatter_grad(z, assign, centroids, coef, grad_out, factor)


@scatter_grad.register_fake
def _(z, assign, centroids, coef, backend, grad_out=None, factor=1.0):
    return z.new_empty(z.shape)  # contiguous, as every backend returns


def _assign_stats_setup(ctx, inputs, output):
    z, _, centroids, _, _, backend = inputs
    ctx.save_for_backward(z, output[2], centroids)
    ctx.backend = backend


def _assign_stats_backward(ctx, grad_sqdev, grad_counts, grad_assign):
    z, assign, centroids = ctx.saved_tensors
    return scatter_grad(z, assign, centroids, 2 * grad_sqdev, ctx.backend), None, None, None, None, None


assign_stats.register_autograd(_assign_stats_backward, setup_context=_assign_stats_setup)


class _TracedKernels:
    """The backend contract as the registered ops, for torch.compile to trace; full covariance in its batched
    PyTorch form (the grouped forms read the cluster sizes, which a trace cannot)."""

    def __init__(self, backend: str):
        self.backend = backend

    def assign_stats(self, z, labels, centroids, m, class_conditional):
        sqdev, counts, assign = assign_stats(z, labels, centroids, m, class_conditional, self.backend)
        return assign, counts, sqdev

    def scatter_grad(self, z, assign, centroids, coef, grad_out=None, factor=1.0):
        return scatter_grad(z, assign, centroids, coef, self.backend, grad_out, factor)

    cluster_second_moments = staticmethod(full_covariance.second_moments)
    matrix_grad = staticmethod(full_covariance.matrix_grad)


def kernels(backend: str):
    """Where the hot operations of ``backend`` (a resolved name) run: the backend module itself in eager mode
    (the custom-op dispatcher costs tens of microseconds a call, as much as a whole op at B=128 on a CPU), the
    registered ops while torch.compile traces. This is the only ``is_compiling`` check of the library."""
    if torch.compiler.is_compiling():
        return _TracedKernels(backend)
    return backends.get(backend)


# --------------------------------------------------------------------------- the loss


class CEMFunction(torch.autograd.Function):
    """Forward: statistics -> variant math -> loss (and the new state). Backward: one gather pass.

    ``apply(z [B, D], labels [B], centroids [K, D], pi, variance, variant, params)`` with the state in the
    accumulation dtype, ``variant`` a ``cem_fast.variants.Variant`` and ``params`` a ``LossParams``. Returns
    ``(loss, new_pi, new_variance)``; the last two are None when the backend wrote the new state into ``pi`` and
    ``variance`` (``params.update_state``).
    """

    @staticmethod
    def forward(ctx, z, labels, centroids, pi, variance, variant, params):
        p = params
        k = kernels(p.backend)
        full = p.covariance == "full"
        fused = not full and variant.code in getattr(k, "FUSED_VARIANT_CODES", ())
        if fused and p.process_group is None and hasattr(k, "forward_diag"):
            loss, coef, new_pi, new_var, assign = k.forward_diag(
                z, labels, centroids, pi, variance, variant.kernel_args(p), update_state=p.update_state
            )
        else:
            assign, counts, stat = k.assign_stats(z, labels, centroids, p.m, p.class_conditional)
            if full:
                stat = k.cluster_second_moments(z, assign, centroids)
            if p.process_group is not None:
                counts, stat = all_reduce_sum(counts, stat, p.process_group)
            if fused and hasattr(k, "variant_math"):
                loss, coef, new_pi, new_var = k.variant_math(counts, stat, pi, variance, variant.kernel_args(p))
            else:
                loss, coef, new_pi, new_var = variant.math(counts, stat, pi, variance, p)
        if full:
            chol, factor = coef
            ctx.save_for_backward(z, assign, centroids, factor, chol)
        else:
            ctx.save_for_backward(z, assign, centroids, coef)
        ctx.full = full
        ctx.backend = p.backend
        ctx.set_materialize_grads(False)  # no zero gradients built for the state outputs (two launches)
        # Under data parallelism every rank holds the global loss; DDP averages gradients over ranks,
        # so each rank's exact gradient is scaled by the world size (folded into grad_scale).
        ctx.grad_scale = 2.0 * world_size(p.process_group)
        if p.update_state and new_pi is pi and new_var is variance:
            return loss, None, None  # written in place: returned, they would come back as views
        ctx.mark_non_differentiable(new_pi, new_var)
        return loss, new_pi, new_var

    @staticmethod
    def backward(ctx, grad_loss, _grad_pi, _grad_var):
        z, assign, centroids, coef, *chol = ctx.saved_tensors  # chol: full covariance only
        if grad_loss is None:  # the loss itself took no part in what is differentiated
            return (None,) * 7
        k = kernels(ctx.backend)
        if not ctx.full:
            dz = k.scatter_grad(z, assign, centroids, coef, grad_loss, ctx.grad_scale)
        elif hasattr(k, "factored_matrix_grad"):
            dz = k.factored_matrix_grad(z, assign, centroids, chol[0], coef * (grad_loss * ctx.grad_scale))
        else:
            factor = coef * (grad_loss * ctx.grad_scale)
            dz = k.matrix_grad(z, assign, centroids, full_covariance.coef_matrix(chol[0], factor))
        return dz, None, None, None, None, None, None
