"""C++/OpenMP backend for CPU tensors: ``csrc/cem_cpu.cpp``, built on first use (see ``extension.py``).

Same contract as ``torch_backend`` (deterministic, independent of the thread count; ``counts``,
``sqdev`` and ``dz`` equal the torch backend's bit for bit, the distances are summed in another order).
"""
from __future__ import annotations

import functools
import warnings

import torch

from .extension import load_cpp_extension


@functools.cache
def _loaded() -> bool:
    try:
        load_cpp_extension()
        return True
    except Exception as exc:  # a missing compiler, a compile error, an import error
        warnings.warn(f"cem_fast: the C++ CPU extension could not be built or loaded, so the 'cpp' backend is "
                      f"unavailable ({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=3)
        return False


def is_available(device_type: str = "cpu") -> bool:
    """True for CPU tensors once the extension has built and loaded (tried once per process)."""
    return device_type == "cpu" and _loaded()


def assign_stats(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int,
                 class_conditional: bool):
    return load_cpp_extension().assign_stats(z, labels, centroids, int(m), bool(class_conditional))


def scatter_grad(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor,
                 coef: torch.Tensor) -> torch.Tensor:
    return load_cpp_extension().scatter_grad(z, assign, centroids, coef)


def variant_math(counts, sqdev, pi, variance, variant_code: int, m: int, class_conditional: bool, sigma: float,
                 num_classes: int, dataset_size: float, trained_threshold: float, log_entropy: bool,
                 replicate_index_bug: bool, mean_dim: bool):
    """``cem_fast.variants`` (diagonal covariance) in C++: ``(loss, coef, pi_new, variance_new)``."""
    return load_cpp_extension().variant_math(counts, sqdev, pi, variance, variant_code, m, class_conditional, sigma,
                                             num_classes, dataset_size, trained_threshold, log_entropy,
                                             replicate_index_bug, mean_dim)


def forward_diag(z, labels, centroids, pi, variance, variant_code: int, m: int, class_conditional: bool,
                 sigma: float, num_classes: int, dataset_size: float, trained_threshold: float, log_entropy: bool,
                 replicate_index_bug: bool, mean_dim: bool):
    """``assign_stats`` then ``variant_math`` in one call: ``(loss, coef, pi_new, variance_new, assign)``."""
    return load_cpp_extension().forward_diag(z, labels, centroids, pi, variance, variant_code, m, class_conditional,
                                             sigma, num_classes, dataset_size, trained_threshold, log_entropy,
                                             replicate_index_bug, mean_dim)
