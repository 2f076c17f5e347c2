"""The white-box attack (optimisation-based inversion, He et al. 2019 "rMLE"): the encoder is known.

Threat model: the attacker has the client's encoder (its weights) and the observed features ``z~``,
and knows the noise level ``sigma``. For each image it minimises
``||E(x) - z~||^2 / (2 sigma^2) + beta * TV(x)`` over ``x`` in [0, 1] with Adam for a fixed number of
steps (no selection on the ground truth), starting from the mean image of its own data or from the
decoder attack's reconstruction. It runs on a fixed, seeded, class-stratified subset of the test images.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from .data import FeatureSet, Normalization, Perturbation, class_counts, progress_bar, stratified_subset
from .loop import AttackResult, eval_seed, seeded
from .metrics import ReconstructionMeter

__all__ = ["WhiteboxConfig", "run_whitebox", "total_variation"]


@dataclass(frozen=True)
class WhiteboxConfig:
    """``steps`` Adam steps at ``lr`` on ``n_images`` test images, ``batch_size`` at a time; ``tv_weight`` is beta.

    ``sigma_floor`` stands in for sigma when the defence adds no noise (the objective needs a scale).
    ``start``: ``"decoder"`` (the decoder attack's output where one is given) or ``"mean"``.
    """

    steps: int = 300
    lr: float = 0.02
    tv_weight: float = 0.05
    n_images: int = 128
    batch_size: int = 64
    sigma_floor: float = 0.05
    start: str = "decoder"
    curve_points: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "n_images", "batch_size", "curve_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr", "sigma_floor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.tv_weight >= 0:
            raise ValueError(f"tv_weight must be >= 0, got {self.tv_weight!r}")
        if self.start not in ("decoder", "mean"):
            raise ValueError(f"start must be 'decoder' or 'mean', got {self.start!r}")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of each image ``[B, c, h, w]``: sum of absolute horizontal and vertical differences, ``[B]``."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(1)
    return dh + dw


def _invert_batch(encoder, z_obs, x0, truth, normalization, scale, config, progress, desc):
    x = x0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=config.lr)
    every = max(1, config.steps // config.curve_points)
    curve = []
    for step in progress_bar(range(1, config.steps + 1), desc, progress, leave=False):
        z = encoder(x if normalization is None else normalization.normalize(x))
        data = (z - z_obs).pow(2).flatten(1).sum(1) / (2.0 * scale * scale)
        objective = data + config.tv_weight * total_variation(x)
        optimizer.zero_grad(set_to_none=True)
        objective.sum().backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
            if step % every == 0 or step == config.steps:
                curve.append(
                    {
                        "step": step,
                        "objective": objective.mean().item(),
                        "mse": (x - truth).pow(2).flatten(1).mean(1).mean().item(),
                    }
                )
    return x.detach(), curve


def run_whitebox(
    encoder: nn.Module,
    test: FeatureSet,
    perturb: Perturbation,
    config: WhiteboxConfig = WhiteboxConfig(),
    *,
    sigma: Optional[float],
    normalization: Optional[Normalization],
    mean_image: torch.Tensor,
    start_model: Optional[nn.Module] = None,
    num_classes: Optional[int] = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Optional[bool] = None,
    num_samples: int = 16,
) -> AttackResult:
    """Invert the perturbed features of a stratified subset of ``test`` through ``encoder`` (see the module)."""
    if not isinstance(config, WhiteboxConfig):
        raise TypeError(f"config must be a WhiteboxConfig, got {type(config).__name__}")
    started = time.perf_counter()
    device = torch.device(device)
    chosen = stratified_subset(test.labels, config.n_images, seed)
    scored = test.subset(chosen)
    scale = float(sigma) if sigma else config.sigma_floor
    with seeded(eval_seed(seed) + 1, device):
        z_obs = perturb(scored.features.to(device))
    use_decoder = config.start == "decoder" and start_model is not None
    if use_decoder:
        was_training = start_model.training
        start_model.eval()
        with torch.no_grad():
            x0 = torch.cat([start_model(z_obs[i : i + 256]).float() for i in range(0, len(z_obs), 256)])
        start_model.train(was_training)
    else:
        x0 = mean_image.to(device).float().expand(len(scored), *scored.image_shape).contiguous()
    was_training = encoder.training
    grads = [p.requires_grad for p in encoder.parameters()]
    encoder.eval().requires_grad_(False)
    meter, recon, curves = ReconstructionMeter(), [], []
    try:
        for start in range(0, len(scored), config.batch_size):
            stop = min(start + config.batch_size, len(scored))
            truth = scored.images[start:stop].to(device)
            x, curve = _invert_batch(
                encoder,
                z_obs[start:stop],
                x0[start:stop],
                truth,
                normalization,
                scale,
                config,
                progress,
                f"whitebox images {start}-{stop}",
            )
            meter.update(x, truth)
            recon.append(x.cpu())
            curves.append(curve)
    finally:
        encoder.train(was_training)
        for p, g in zip(encoder.parameters(), grads):
            p.requires_grad_(g)
    sizes = [min(config.batch_size, len(scored) - s) for s in range(0, len(scored), config.batch_size)]
    curve = [
        {
            "step": points[0]["step"],
            **{k: sum(c[i][k] * n for c, n in zip(curves, sizes)) / len(scored) for k in ("objective", "mse")},
        }
        for i, points in enumerate(zip(*curves))
    ]
    k = num_classes or int(test.labels.max().item()) + 1
    reconstruction = torch.cat(recon)
    return AttackResult(
        name="whitebox",
        model=None,
        test_metrics=meter.compute(),
        val_metrics={},
        best_epoch=config.steps,
        epochs=config.steps,
        max_epochs=config.steps,
        history=curve,
        samples={"original": scored.images[:num_samples].cpu(), "reconstruction": reconstruction[:num_samples]},
        sizes={"test": len(scored)},
        train_class_counts=[],
        scored_class_counts=class_counts(scored.labels, k),
        wall_time_s=time.perf_counter() - started,
        config={
            **asdict(config),
            "sigma_used": scale,
            "started_from": "decoder" if use_decoder else "mean",
            "seed": seed,
        },
        extra={"scored_indices": chosen.tolist()},
    )
