"""Evaluation of an inversion model, and the seeded RNG scope attacks train under."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from reproduce.attacks.features import FeatureSet, Perturbation
from reproduce.metrics import ReconstructionMeter

__all__ = ["seeded", "reconstruct", "evaluate_reconstruction"]


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu"):
    """Run the block with the global RNGs seeded to ``seed``, restoring them afterwards.

    Used so that the defence's noise (which may draw from the global RNG) is a
    function of (seed, epoch): a resumed attack then replays exactly.
    """
    device = torch.device(device)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(int(seed))
        yield


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    data: FeatureSet,
    perturb: Perturbation,
    *,
    batch_size: int,
    device: str | torch.device,
    noise_seed: int,
    limit: int | None = None,
) -> torch.Tensor:
    """Reconstructions in [0, 1] (on CPU) of the first ``limit`` items of ``data`` (eval mode)."""
    n = len(data) if limit is None else min(limit, len(data))
    was_training = model.training
    model.eval()
    out = []
    try:
        with seeded(noise_seed, device):
            for start in range(0, n, batch_size):
                z = data.features[start:min(start + batch_size, n)].to(device)
                out.append(model(perturb(z)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def evaluate_reconstruction(
    model: nn.Module,
    data: FeatureSet,
    perturb: Perturbation,
    *,
    batch_size: int,
    device: str | torch.device,
    noise_seed: int,
) -> dict:
    """MSE / PSNR / SSIM of ``model(perturb(z))`` against the images, per image (see metrics).

    The noise is drawn from a fixed seed so that every epoch is scored on the
    same noisy features.
    """
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty FeatureSet")
    was_training = model.training
    model.eval()
    meter = ReconstructionMeter()
    try:
        with seeded(noise_seed, device):
            for start in range(0, len(data), batch_size):
                stop = min(start + batch_size, len(data))
                z = data.features[start:stop].to(device)
                target = data.images[start:stop].to(device).float().div_(255.0)
                meter.update(model(perturb(z)).float(), target)
    finally:
        model.train(was_training)
    return meter.compute()
