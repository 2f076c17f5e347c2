"""GAN-based model inversion attack (GMI-style WGAN-GP; paper §S.3, facts §4b).

The generator is the decoder attack's ResDecoder, initialised from its trained
weights, fed ``perturb(encoder(x))``. A WGAN-GP critic judges [0, 1] images.
Critic loss ``-(mean D(x) - mean D(G(z~))) + 10 GP``; generator loss
``-mean D(G(z~)) + 1500 MSE(G(z~), x)``, one generator step per 10 critic
steps. The epoch with the lowest held-out MSE (on the attack's own training
data) is kept and scored once on the test data.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from reproduce.attacks.decoder import AttackResult
from reproduce.attacks.evaluate import evaluate_reconstruction, reconstruct, seeded
from reproduce.attacks.features import FeatureSet, Perturbation, fit_val_split
from reproduce.attacks.state import check_config, load_resumable
from reproduce.checkpoint import save_atomic

__all__ = ["GANAttackConfig", "gradient_penalty", "run_gan_attack"]

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = "reproduce.attacks.gan/v1"


@dataclass(frozen=True)
class GANAttackConfig:
    """Hyper-parameters of the GAN attack (defaults: the authors' code on CIFAR)."""

    epochs: int = 150
    batch_size: int = 128
    lr_generator: float = 5e-4
    lr_critic: float = 5e-3
    betas: tuple = (0.5, 0.999)
    t_max: int = 300
    n_critic: int = 10
    gp_weight: float = 10.0
    mse_weight: float = 1500.0
    val_fraction: float = 0.1
    seed: int = 0
    eval_batch_size: int = 256
    num_samples: int = 16

    def __post_init__(self) -> None:
        check_config(self, positive_ints=("epochs", "batch_size", "t_max", "n_critic", "eval_batch_size"),
                     positive=("lr_generator", "lr_critic"), nonnegative=("gp_weight", "mse_weight"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP penalty ``mean((||grad D(x_hat)||_2 - 1)^2)`` on random interpolates."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    interpolates = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    scores = critic(interpolates)
    (grad,) = torch.autograd.grad(scores.sum(), interpolates, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(seed) * 1_000_003 + 500_000 + int(epoch)


def _eval_seed(seed: int) -> int:
    # Same noise draw as the decoder attack's evaluation, so the two are comparable.
    return int(seed) * 1_000_003 + 999_331


def _train_one_epoch(generator, critic, opt_g, opt_d, data, perturb, config, device, epoch, step, progress):
    generator.train()
    critic.train()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(_epoch_seed(config.seed, epoch)))
    sums = {"critic_loss": 0.0, "gp": 0.0, "generator_loss": 0.0, "generator_mse": 0.0}
    n_critic_steps, n_generator_steps = 0, 0
    with seeded(_epoch_seed(config.seed, epoch), device):
        for idx in tqdm(order.split(config.batch_size), desc=f"gan epoch {epoch}", disable=not progress, leave=False):
            real = data.images[idx].to(device).float().div_(255.0)
            z = perturb(data.features[idx].to(device))

            with torch.no_grad():
                fake = generator(z)
            gp = gradient_penalty(critic, real, fake)
            d_loss = -(critic(real).mean() - critic(fake).mean()) + config.gp_weight * gp
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            sums["critic_loss"] += d_loss.item()
            sums["gp"] += gp.item()
            n_critic_steps += 1

            step += 1
            if step % config.n_critic == 0:
                fake = generator(z)
                mse = F.mse_loss(fake, real)
                g_loss = -critic(fake).mean() + config.mse_weight * mse
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()
                sums["generator_loss"] += g_loss.item()
                sums["generator_mse"] += mse.item()
                n_generator_steps += 1
    stats = {
        "critic_loss": sums["critic_loss"] / n_critic_steps,
        "gp": sums["gp"] / n_critic_steps,
        "generator_steps": n_generator_steps,
        "generator_loss": sums["generator_loss"] / n_generator_steps if n_generator_steps else None,
        "generator_mse": sums["generator_mse"] / n_generator_steps if n_generator_steps else None,
    }
    return stats, step


def run_gan_attack(
    train_data: FeatureSet,
    test_data: FeatureSet,
    perturb: Perturbation,
    generator: nn.Module,
    config: GANAttackConfig = GANAttackConfig(),
    *,
    device: str | torch.device = "cpu",
    state_dir: str | os.PathLike | None = None,
    progress: bool = True,
    init_info: dict | None = None,
) -> AttackResult:
    """Fine-tune ``generator`` (a trained inversion decoder, copied) adversarially.

    ``train_data`` is split (seeded ``val_fraction``) into fit and validation
    parts; the best epoch on validation MSE is scored on ``test_data``. With
    ``state_dir`` every epoch is checkpointed atomically and reruns resume;
    ``init_info`` (e.g. where the generator's weights came from) is part of
    the protocol a resumed checkpoint must match.
    """
    from reproduce.models import WGANCritic

    if not isinstance(config, GANAttackConfig):
        raise TypeError(f"config must be a GANAttackConfig, got {type(config).__name__}")
    if not isinstance(generator, nn.Module):
        raise TypeError(f"generator must be an nn.Module, got {type(generator).__name__}")
    started = time.perf_counter()
    device = torch.device(device)
    fit, val = fit_val_split(train_data, test_data, config.val_fraction, config.seed, device)
    channels, image_size, _ = fit.image_shape
    protocol = {
        "config": {**dataclasses.asdict(config), "betas": list(config.betas)},
        "n_fit": len(fit),
        "n_val": len(val),
        "n_test": len(test_data),
        "smashed_shape": list(fit.smashed_shape),
        "image_shape": list(fit.image_shape),
        "init": init_info or {},
    }

    generator = copy.deepcopy(generator).to(device)
    with seeded(config.seed, device):
        critic = WGANCritic(in_channels=channels, image_size=image_size).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_generator, betas=tuple(config.betas))
    opt_d = torch.optim.Adam(critic.parameters(), lr=config.lr_critic, betas=tuple(config.betas))
    sched_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=config.t_max)
    sched_d = torch.optim.lr_scheduler.CosineAnnealingLR(opt_d, T_max=config.t_max)
    eval_kwargs = dict(batch_size=config.eval_batch_size, device=device, noise_seed=_eval_seed(config.seed))

    start_epoch, step, history, prior_wall = 0, 0, [], 0.0
    best_epoch, best_val, best_state = 0, float("inf"), None
    ckpt_path = Path(state_dir) / CHECKPOINT_NAME if state_dir is not None else None
    state = load_resumable(ckpt_path, _FORMAT, protocol) if ckpt_path is not None else None
    if state is not None:
        generator.load_state_dict(state["generator"])
        critic.load_state_dict(state["critic"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        sched_g.load_state_dict(state["sched_g"])
        sched_d.load_state_dict(state["sched_d"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        best_epoch, best_val, best_state = state["best_epoch"], state["best_val_mse"], state["best_state"]
        prior_wall = state.get("wall_time_s", 0.0)
    else:
        # Epoch 0 = the decoder attack's weights; logged for reference, never selected.
        init_val = evaluate_reconstruction(generator, val, perturb, **eval_kwargs)["mse"]
        history.append({"epoch": 0, "val_mse": init_val})

    bar = tqdm(range(start_epoch + 1, config.epochs + 1), desc="gan attack", disable=not progress)
    for epoch in bar:
        lr_g, lr_d = opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]
        stats, step = _train_one_epoch(
            generator, critic, opt_g, opt_d, fit, perturb, config, device, epoch, step, progress
        )
        with warnings.catch_warnings():
            # An epoch with fewer than n_critic batches makes no generator step; the
            # cosine schedule is per epoch all the same.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            sched_g.step()
        sched_d.step()
        val_mse = evaluate_reconstruction(generator, val, perturb, **eval_kwargs)["mse"]
        history.append({"epoch": epoch, "lr_generator": lr_g, "lr_critic": lr_d, **stats, "val_mse": val_mse})
        if val_mse < best_val:
            best_epoch, best_val = epoch, val_mse
            best_state = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
        bar.set_postfix(val_mse=f"{val_mse:.4f}", best=best_epoch)
        if ckpt_path is not None:
            save_atomic(
                {
                    "format": _FORMAT,
                    "protocol": protocol,
                    "epoch": epoch,
                    "step": step,
                    "generator": generator.state_dict(),
                    "critic": critic.state_dict(),
                    "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(),
                    "sched_g": sched_g.state_dict(),
                    "sched_d": sched_d.state_dict(),
                    "history": history,
                    "best_epoch": best_epoch,
                    "best_val_mse": best_val,
                    "best_state": best_state,
                    "wall_time_s": prior_wall + time.perf_counter() - started,
                },
                ckpt_path,
            )
    if best_state is None:
        raise RuntimeError("GAN attack finished without a finite validation MSE")
    if step < config.n_critic:
        warnings.warn(f"GAN attack made {step} critic steps and no generator step (n_critic={config.n_critic}); "
                      f"use more epochs or a smaller batch size", stacklevel=2)

    best = copy.deepcopy(generator)
    best.load_state_dict(best_state)
    best.eval()
    test_metrics = evaluate_reconstruction(best, test_data, perturb, **eval_kwargs)
    val_metrics = evaluate_reconstruction(best, val, perturb, **eval_kwargs)
    samples = {
        "original": test_data.images[: config.num_samples].cpu(),
        "reconstruction": reconstruct(best, test_data, perturb, limit=config.num_samples, **eval_kwargs),
    }
    return AttackResult(
        model=best,
        test_metrics=test_metrics,
        val_metrics=val_metrics,
        best_epoch=best_epoch,
        epochs=config.epochs,
        history=history,
        samples=samples,
        sizes={"fit": len(fit), "val": len(val), "test": len(test_data)},
        wall_time_s=prior_wall + time.perf_counter() - started,
        extra={"generator_steps_total": step // config.n_critic, "critic_steps_total": step},
    )
