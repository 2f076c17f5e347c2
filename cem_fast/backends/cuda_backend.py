"""CUDA backend for CUDA tensors: ``csrc/cem_cuda.cu``, built with nvcc on first use (see ``extension.py``).

Same contract as ``torch_backend``; full covariance runs the batched PyTorch forms (no host sync).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import full_covariance
from .extension import load_cuda_extension
from .torch_backend import scaled_coef


@functools.cache
def _build_error() -> Optional[str]:
    try:
        ext = load_cuda_extension()
        # one tiny launch: a binary without code for this GPU fails here, not mid-training
        if torch.cuda.is_available():
            z = torch.zeros(1, 1, device="cuda")
            ext.assign_stats(z, torch.zeros(1, dtype=torch.int64, device="cuda"), z, 1, True)
            torch.cuda.synchronize()
        return None
    except Exception as exc:  # no toolkit, a compile error, an import error, no kernel image for this GPU
        return f"the CUDA extension could not be built or loaded: {type(exc).__name__}: {exc}"


def is_available(device_type: str) -> bool:
    """True for CUDA tensors when a GPU is visible and the extension has built and loaded (tried once)."""
    return device_type == "cuda" and torch.cuda.is_available() and _build_error() is None


def load_error(device_type: str) -> Optional[str]:
    """Why ``is_available`` is False on a visible GPU (the build or load failure), else None."""
    return _build_error() if device_type == "cuda" and torch.cuda.is_available() else None


def assign_stats(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int, class_conditional: bool):
    return load_cuda_extension().assign_stats(z, labels, centroids, int(m), bool(class_conditional))


def scatter_grad(
    z: torch.Tensor,
    assign: torch.Tensor,
    centroids: torch.Tensor,
    coef: torch.Tensor,
    grad_out: Optional[torch.Tensor] = None,
    factor: float = 1.0,
) -> torch.Tensor:
    """The kernel reads a ``[K, 1]`` coefficient with a zero column stride: no expansion needed."""
    return load_cuda_extension().scatter_grad(z, assign, centroids, scaled_coef(coef, grad_out, factor))


cluster_second_moments = full_covariance.second_moments
matrix_grad = full_covariance.matrix_grad
