"""The GAN attack (GMI-style WGAN-GP, the paper's second attack), kept for the paper's tables.

The generator is the decoder attack's selected decoder, fine-tuned against a WGAN-GP critic on [0, 1]
images. Critic loss ``-(mean D(x) - mean D(G(z~))) + 10 GP``; generator loss ``-mean D(G(z~)) + 1500 MSE``,
one generator step per ``n_critic`` critic steps. The starting weights are a candidate of the held-out
selection, so the GAN never ends worse (on held-out data) than the decoder it starts from.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import FeatureSet, progress_bar
from .loop import AttackState, TrainedAttack
from .nets import WGANCritic

__all__ = ["GANConfig", "GANAttack", "gradient_penalty"]


@dataclass(frozen=True)
class GANConfig:
    """Hyper-parameters of the GAN attack (defaults: the authors' code on CIFAR)."""

    batch_size: int = 128
    lr_generator: float = 5e-4
    lr_critic: float = 5e-3
    betas: tuple = (0.5, 0.999)
    t_max: int = 300
    n_critic: int = 10
    gp_weight: float = 10.0
    mse_weight: float = 1500.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "t_max", "n_critic"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr_generator", "lr_critic"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("gp_weight", "mse_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP penalty ``mean((||grad D(x_hat)||_2 - 1)^2)`` on random interpolates."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    interpolates = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    scores = critic(interpolates)
    (grad,) = torch.autograd.grad(scores.sum(), interpolates, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()


class GANAttack(TrainedAttack):
    """Adversarial fine-tuning of ``generator`` (a trained inversion decoder, copied)."""

    name = "gan"
    select_initial = True
    seed_offset = 500_000

    def __init__(self, generator: nn.Module, config: GANConfig = GANConfig(), *, init_info: dict | None = None):
        if not isinstance(config, GANConfig):
            raise TypeError(f"config must be a GANConfig, got {type(config).__name__}")
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator must be an nn.Module, got {type(generator).__name__}")
        super().__init__(config)
        self.generator, self.init_info = generator, init_info or {}

    def protocol(self) -> dict:
        return {**super().protocol(), "init": self.init_info}

    def setup(self, fit: FeatureSet, device: torch.device) -> AttackState:
        c = self.config
        channels, height, width = fit.image_shape
        if height != width:
            raise ValueError(f"the GAN critic needs square images, got {height}x{width}")
        generator = copy.deepcopy(self.generator).to(device)
        critic = WGANCritic(in_channels=channels, image_size=height).to(device)
        opt_g = torch.optim.Adam(generator.parameters(), lr=c.lr_generator, betas=tuple(c.betas))
        opt_d = torch.optim.Adam(critic.parameters(), lr=c.lr_critic, betas=tuple(c.betas))
        return AttackState(
            inverter=generator,
            modules={"critic": critic},
            optimizers={"generator": opt_g, "critic": opt_d},
            schedulers={
                "generator": torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=c.t_max),
                "critic": torch.optim.lr_scheduler.CosineAnnealingLR(opt_d, T_max=c.t_max),
            },
            counters={"step": 0},
        )

    def epoch(self, state, fit, perturb, epoch, device, progress) -> dict:
        c = self.config
        generator, critic = state.inverter, state.modules["critic"]
        opt_g, opt_d = state.optimizers["generator"], state.optimizers["critic"]
        generator.train()
        critic.train()
        sums = {"critic_loss": 0.0, "gp": 0.0, "generator_loss": 0.0, "generator_mse": 0.0}
        n_critic_steps, n_generator_steps = 0, 0
        order = torch.randperm(len(fit))
        for idx in progress_bar(order.split(c.batch_size), f"gan epoch {epoch}", progress, leave=False):
            real = fit.images[idx].to(device)
            z = perturb(fit.features[idx].to(device))
            with torch.no_grad():
                fake = generator(z)
            gp = gradient_penalty(critic, real, fake)
            d_loss = -(critic(real).mean() - critic(fake).mean()) + c.gp_weight * gp
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            sums["critic_loss"] += d_loss.item()
            sums["gp"] += gp.item()
            n_critic_steps += 1
            state.counters["step"] += 1
            if state.counters["step"] % c.n_critic == 0:
                fake = generator(z)
                mse = F.mse_loss(fake, real)
                g_loss = -critic(fake).mean() + c.mse_weight * mse
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()
                sums["generator_loss"] += g_loss.item()
                sums["generator_mse"] += mse.item()
                n_generator_steps += 1
        return {
            "critic_loss": sums["critic_loss"] / n_critic_steps,
            "gp": sums["gp"] / n_critic_steps,
            "generator_steps": n_generator_steps,
            "generator_loss": sums["generator_loss"] / n_generator_steps if n_generator_steps else None,
            "generator_mse": sums["generator_mse"] / n_generator_steps if n_generator_steps else None,
        }

    def extra(self, state: AttackState) -> dict:
        step = state.counters["step"]
        if step < self.config.n_critic:
            warnings.warn(
                f"GAN attack made {step} critic steps and no generator step "
                f"(n_critic={self.config.n_critic}); use more epochs or a smaller batch size",
                stacklevel=3,
            )
        return {"generator_steps_total": step // self.config.n_critic, "critic_steps_total": step}
