"""CUDA backend for CUDA tensors: ``csrc/cem_cuda.cu``, built with nvcc on first use (see ``extension.py``).

Same contract as ``torch_backend``.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .extension import load_cuda_extension


@functools.cache
def _loaded() -> bool:
    try:
        ext = load_cuda_extension()
        if torch.cuda.is_available():  # one tiny launch: a binary without code for this GPU fails here, not mid-training
            z = torch.zeros(1, 1, device="cuda")
            ext.assign_stats(z, torch.zeros(1, dtype=torch.int64, device="cuda"), z, 1, True)
            torch.cuda.synchronize()
        return True
    except Exception as exc:  # no toolkit, a compile error, an import error, no kernel image for this GPU
        warnings.warn(f"cem_fast: the CUDA extension could not be built or loaded, so the 'cuda' backend is "
                      f"unavailable ({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=3)
        return False


def is_available(device_type: str = "cuda") -> bool:
    """True for CUDA tensors when a GPU is visible and the extension has built and loaded (tried once)."""
    return device_type == "cuda" and torch.cuda.is_available() and _loaded()


def assign_stats(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int,
                 class_conditional: bool):
    return load_cuda_extension().assign_stats(z, labels, centroids, int(m), bool(class_conditional))


def scatter_grad(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor,
                 coef: torch.Tensor) -> torch.Tensor:
    return load_cuda_extension().scatter_grad(z, assign, centroids, coef)
