"""The decoder attack (He et al. 2019; the paper's attack): an inversion network trained on ``perturb(z) -> x``.

Threat model: the attacker holds the frozen encoder's outputs for its own images (a black-box query
access to the client, or the client's training data at train time) and the defence's noise level. It
trains a ResDecoder (8 residual blocks, 64 channels by default) with MSE on [0, 1] images until the MSE
on a held-out part of its own data stops improving (``LoopConfig.patience``, ``max_epochs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import FeatureSet
from .loop import AttackState, TrainedAttack
from .nets import build_decoder

__all__ = ["DecoderConfig", "DecoderAttack", "train_decoder_epoch", "load_decoder"]


@dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of the decoder attack (defaults: the authors' code)."""

    batch_size: int = 256
    lr: float = 1e-3  # the paper text says 5e-3; the code uses 1e-3
    weight_decay: float = 1e-4
    eta_min: float = 1e-5
    num_blocks: int = 8
    width: int = 64
    t_max: int = 50  # epochs of the cosine schedule (the paper's 50)

    def __post_init__(self) -> None:
        for name in ("batch_size", "width", "t_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 0:
            raise ValueError(f"num_blocks must be an int >= 0, got {self.num_blocks!r}")
        for name in ("lr", "eta_min"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


def train_decoder_epoch(
    model, optimizer, fit: FeatureSet, perturb, batch_size: int, device, desc: str, progress, draws: int = 1
) -> float:
    """One epoch of MSE training of ``model`` on ``perturb(z) -> x``; ``draws`` fresh noise draws per image."""
    from .data import progress_bar

    model.train()
    order = torch.randperm(len(fit)).repeat(draws)
    if draws > 1:
        order = order[torch.randperm(len(order))]
    total, count = 0.0, 0
    for idx in progress_bar(order.split(batch_size), desc, progress, leave=False):
        z = perturb(fit.features[idx].to(device))
        loss = F.mse_loss(model(z), fit.images[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * idx.numel()
        count += idx.numel()
    return total / count


class DecoderAttack(TrainedAttack):
    """The inversion decoder, trained from scratch (see the module docstring for its threat model)."""

    name = "decoder"

    def __init__(self, config: DecoderConfig = DecoderConfig()):
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
        super().__init__(config)

    def setup(self, fit: FeatureSet, device: torch.device) -> AttackState:
        c = self.config
        model = build_decoder(fit.feature_shape, fit.image_shape, c.num_blocks, c.width).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=c.t_max, eta_min=c.eta_min)
        return AttackState(inverter=model, optimizers={"decoder": optimizer}, schedulers={"decoder": scheduler})

    def epoch(self, state, fit, perturb, epoch, device, progress) -> dict:
        loss = train_decoder_epoch(
            state.inverter,
            state.optimizers["decoder"],
            fit,
            perturb,
            self.config.batch_size,
            device,
            f"decoder epoch {epoch}",
            progress,
        )
        return {"train_loss": loss}


def load_decoder(state_dir) -> tuple:
    """The selected decoder that :func:`~cem_fast.audit.loop.train_attack` saved in ``state_dir`` (eval mode),
    and the saved record (``best_epoch``, ``protocol``)."""
    from pathlib import Path

    from .loop import BEST_NAME

    path = Path(state_dir) / BEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no trained decoder attack at {path}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    protocol = saved["protocol"]
    config = DecoderConfig(**protocol["attack"])
    model = build_decoder(protocol["feature_shape"], protocol["image_shape"], config.num_blocks, config.width)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved
