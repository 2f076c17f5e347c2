"""Reconstruction and task metrics.

Images are compared in [0, 1] (denormalised). MSE, PSNR and SSIM are computed
PER IMAGE and then averaged over images. The authors' code instead averages
``10 log10(1 / MSE_batch)`` over batches; that number is kept separately as
``psnr_per_batch_authors`` so tables can be compared with the paper.
"""

from __future__ import annotations

import torch

__all__ = [
    "mse_per_image",
    "psnr_per_image",
    "ssim_per_image",
    "psnr_from_mse",
    "accuracy",
    "ReconstructionMeter",
]

SSIM_KERNEL_SIZE = 11
SSIM_SIGMA = 1.5


def _check_pair(reconstruction: torch.Tensor, target: torch.Tensor) -> None:
    for name, value in (("reconstruction", reconstruction), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 4:
            raise ValueError(f"{name} must be [B, C, H, W], got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor in [0, 1], got {value.dtype}")
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction shape {tuple(reconstruction.shape)} != target shape {tuple(target.shape)}")


def mse_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image, shape [B]."""
    _check_pair(reconstruction, target)
    diff = reconstruction.double() - target.double()
    return diff.pow(2).flatten(1).mean(dim=1)


def psnr_from_mse(mse: torch.Tensor | float) -> torch.Tensor:
    """PSNR in dB for data range 1: ``10 log10(1 / mse)`` (inf where mse == 0)."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return -10.0 * torch.log10(mse)


def psnr_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, data range 1) of each image, shape [B]."""
    return psnr_from_mse(mse_per_image(reconstruction, target))


def ssim_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each image (11x11 Gaussian window, sigma 1.5, data range 1), shape [B].

    torchmetrics averages the SSIM map over the valid (unpadded) region; the
    authors' pytorch_ssim zero-pads and averages over the whole map, which
    gives slightly different values near the border.
    """
    _check_pair(reconstruction, target)
    from torchmetrics.functional.image import structural_similarity_index_measure  # the `audit` extra

    return structural_similarity_index_measure(
        reconstruction.float(),
        target.float(),
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_KERNEL_SIZE,
        data_range=1.0,
        reduction="none",
    ).double()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of ``logits`` [B, K] against int ``labels`` [B]."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, K], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [B]={logits.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("logits and labels must not be empty")
    return (logits.argmax(dim=1) == labels).double().mean().item()


class ReconstructionMeter:
    """Accumulates reconstruction metrics over batches.

    ``compute()`` returns per-image averages of MSE, PSNR and SSIM, plus the
    authors' per-batch PSNR (mean over batches of ``10 log10(1/MSE_batch)``),
    which depends on how the data was batched.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self._mse_sum = 0.0
        self._psnr_sum = 0.0
        self._ssim_sum = 0.0
        self._batch_psnr_sum = 0.0
        self._num_batches = 0

    @torch.no_grad()
    def update(self, reconstruction: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of images in [0, 1]."""
        mse = mse_per_image(reconstruction, target)
        if mse.numel() == 0:
            return
        ssim = ssim_per_image(reconstruction, target)
        self.count += mse.numel()
        self._mse_sum += mse.sum().item()
        self._psnr_sum += psnr_from_mse(mse).sum().item()
        self._ssim_sum += ssim.sum().item()
        self._batch_psnr_sum += psnr_from_mse(mse.mean()).item()
        self._num_batches += 1

    def compute(self) -> dict:
        """Return ``{"mse", "psnr", "ssim", "psnr_per_batch_authors", "n_images"}``."""
        if self.count == 0:
            raise ValueError("ReconstructionMeter.compute() called before any update()")
        return {
            "mse": self._mse_sum / self.count,
            "psnr": self._psnr_sum / self.count,
            "ssim": self._ssim_sum / self.count,
            "psnr_per_batch_authors": self._batch_psnr_sum / self._num_batches,
            "n_images": self.count,
        }
