"""Argument checks with the messages users see. Each raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return int(value)


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def features(name: str, z, dim_hint: str = "[B, C, H, W] or [B, D]") -> torch.Tensor:
    """A floating tensor with a batch dimension, flattened to ``[B, D]``."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {z.dtype}")
    if z.dim() < 2:
        raise ValueError(f"{name} must have shape {dim_hint}, got {tuple(z.shape)}")
    return flatten(z)


def flatten(z: torch.Tensor) -> torch.Tensor:
    """``[B, ...] -> [B, D]``, also for an empty batch (where ``reshape(0, -1)`` is ambiguous)."""
    return z.reshape(z.shape[0], math.prod(z.shape[1:]))


def labels(name: str, y, batch: int, num_classes: int, device, validate: bool) -> torch.Tensor:
    """Integer labels ``[batch]`` in ``[0, num_classes)``, as int64 on ``device``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices, got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one label per sample), got {tuple(y.shape)}")
    if y.device != torch.device(device):
        raise ValueError(f"{name} is on {y.device} but the features are on {device}")
    if validate:
        label_range(name, y, num_classes)
    return y if y.dtype == torch.int64 else y.to(torch.int64)


def label_range(name: str, y: torch.Tensor, num_classes: int) -> None:
    """Every label in ``[0, num_classes)`` (reads two values from the device)."""
    if y.numel():
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def finite(name: str, z: torch.Tensor) -> None:
    # NaN and Inf reach the sum (one cheap reduction); a sum that overflows although every value is
    # finite (large values, or fp16/bf16) is told apart by the full elementwise check.
    z = z.detach()  # a sum that tracks gradients would cost a graph node per call
    if z.numel() and not math.isfinite(z.sum().item()) and not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def __getattr__(name: str):
    # ``checks.VARIANTS`` moved to ``cem_fast.VARIANTS`` (the variants' registry); kept readable for old imports.
    if name == "VARIANTS":
        from .variants import VARIANTS

        return VARIANTS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
