"""Reconstruction and task metrics (they live in ``cem_fast.audit.metrics``)."""

from cem_fast.audit.metrics import (
    ReconstructionMeter,
    accuracy,
    mse_per_image,
    psnr_from_mse,
    psnr_per_image,
    ssim_per_image,
)

__all__ = [
    "mse_per_image",
    "psnr_per_image",
    "ssim_per_image",
    "psnr_from_mse",
    "accuracy",
    "ReconstructionMeter",
]
