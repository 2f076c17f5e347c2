"""C++/OpenMP backend for CPU tensors: ``csrc/cem_cpu.cpp``, built on first use (see ``extension.py``).

Same contract as ``torch_backend`` (deterministic, independent of the thread count; ``counts``,
``sqdev`` and ``dz`` equal the torch backend's bit for bit, the distances are summed in another order),
plus the fused forward (assignment, statistics and the variant math in one call: thirty ATen calls on
tiny tensors cost more than the kernels at B = 128) and the label-range check inside ``assign_stats``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import full_covariance
from .contract import KernelArgs, check_kernel_args
from .extension import load_cpp_extension
from .torch_backend import scaled_coef

FUSED_VARIANT_CODES = frozenset({0, 1, 2})  # official, official-trained, paper (csrc/cem_cpu_variants.h)
CHECKS_LABELS = True  # assign_stats raises ValueError for a label out of range


@functools.cache
def _build_error() -> Optional[str]:
    try:
        load_cpp_extension()
        return None
    except Exception as exc:  # a missing compiler, a compile error, an import error
        return f"the C++ CPU extension could not be built or loaded: {type(exc).__name__}: {exc}"


def is_available(device_type: str) -> bool:
    """True for CPU tensors once the extension has built and loaded (tried once per process)."""
    return device_type == "cpu" and _build_error() is None


def load_error(device_type: str) -> Optional[str]:
    """Why ``is_available`` is False on the CPU (the build or load failure), else None."""
    return _build_error() if device_type == "cpu" else None


def assign_stats(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int, class_conditional: bool):
    return load_cpp_extension().assign_stats(z, labels, centroids, int(m), bool(class_conditional))


def scatter_grad(
    z: torch.Tensor,
    assign: torch.Tensor,
    centroids: torch.Tensor,
    coef: torch.Tensor,
    grad_out: Optional[torch.Tensor] = None,
    factor: float = 1.0,
) -> torch.Tensor:
    return load_cpp_extension().scatter_grad(z, assign, centroids, scaled_coef(coef, grad_out, factor))


cluster_second_moments = full_covariance.cluster_second_moments
matrix_grad = full_covariance.matrix_grad
factored_matrix_grad = full_covariance.segmented_full_grad


def variant_math(counts, sqdev, pi, variance, args: KernelArgs):
    """A variant's math (diagonal covariance) in C++: ``(loss, coef, pi_new, variance_new)``."""
    return load_cpp_extension().variant_math(counts, sqdev, pi, variance, *check_kernel_args(args))


def forward_diag(z, labels, centroids, pi, variance, args: KernelArgs, update_state: bool = False):
    """``assign_stats`` then ``variant_math`` in one call: ``(loss, coef, pi_new, variance_new, assign)``.
    The new state is always returned as new tensors (``update_state`` is accepted and not needed)."""
    return load_cpp_extension().forward_diag(z, labels, centroids, pi, variance, *check_kernel_args(args))
