"""What a fused diagonal-covariance kernel takes after the state: ``KernelArgs`` (``forward_diag``, ``variant_math``).

``Variant.kernel_args(params)`` builds it once per loss evaluation; every backend's ``forward_diag`` and
``variant_math`` take it as one argument, ``args``. A ``NamedTuple``: as cheap to build as a tuple, and
``*args`` gives the C++ extension's positional arguments in their order (``csrc/cem_cpu.cpp``).
"""

from __future__ import annotations

from typing import NamedTuple


class KernelArgs(NamedTuple):
    """The settings of one fused call besides the tensors: the variant's number in the kernels
    (0 official, 1 official-trained, 2 paper), the clustering, sigma, the samples per epoch, the official-trained
    options (its hinge constant ``trained_threshold``, ``log_entropy``, ``replicate_index_bug``) and whether the
    loss is a mean over dimensions."""

    variant_code: int
    m: int
    class_conditional: bool
    sigma: float
    num_classes: int
    dataset_size: float
    trained_threshold: float
    log_entropy: bool
    replicate_index_bug: bool
    mean_dim: bool


def check_kernel_args(args) -> KernelArgs:
    """``args`` if it is a ``KernelArgs`` (TypeError naming ``args`` otherwise)."""
    if not isinstance(args, KernelArgs):
        raise TypeError(
            f"args must be a cem_fast.backends.KernelArgs (from Variant.kernel_args), got {type(args).__name__}"
        )
    return args
