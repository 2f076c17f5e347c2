"""The decoder attack (He et al. 2019; the paper's attack): an inversion network trained on ``perturb(z) -> x``.

Threat model: the attacker holds the frozen encoder's outputs for its own images (a black-box query
access to the client, or the client's training data at train time) and the defence's noise level. It
trains a ResDecoder (8 residual blocks, 64 channels by default) with MSE on [0, 1] images until the MSE
on a held-out part of its own data stops improving (``LoopConfig.patience``, ``max_epochs``).

``DecoderConfig.bf16_autocast`` trains the decoder's convolutions under bf16 autocast with channels_last
weights (off by default). The weights, the optimiser, the loss and every score stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import FeatureSet
from .loop import AttackState, TrainedAttack
from .nets import build_decoder

__all__ = ["DecoderConfig", "DecoderAttack", "train_decoder_epoch", "load_decoder", "bf16_autocast_available"]


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
    bf16_autocast: bool = False  # train under bf16 autocast, channels_last (needs bf16 kernels on a CPU)

    def __post_init__(self) -> None:
        if not isinstance(self.bf16_autocast, bool):
            raise TypeError(f"bf16_autocast must be a bool, got {self.bf16_autocast!r}")
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


def bf16_autocast_available(device) -> bool:
    """Whether bf16 autocast has fast kernels on ``device``: a CUDA device, or a CPU whose oneDNN has bf16
    kernels (AVX-512 BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepare_for_bf16(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model`` with channels_last weights, after checking ``device`` has bf16 kernels (ValueError if not)."""
    if not bf16_autocast_available(device):
        raise ValueError(
            "bf16_autocast: this CPU has no bf16 kernels in oneDNN (needs AVX-512 BF16 or AMX); attack without it"
        )
    return model.to(memory_format=torch.channels_last)


def train_decoder_epoch(
    model,
    optimizer,
    fit: FeatureSet,
    perturb,
    batch_size: int,
    device,
    desc: str,
    progress,
    draws: int = 1,
    bf16: bool = False,
) -> float:
    """One epoch of MSE training of ``model`` on ``perturb(z) -> x``; ``draws`` fresh noise draws per image;
    ``bf16``: the forward under bf16 autocast (the loss in float32)."""
    from .data import progress_bar

    model.train()
    order = torch.randperm(len(fit)).repeat(draws)
    if draws > 1:
        order = order[torch.randperm(len(order))]
    total, count = 0.0, 0
    for idx in progress_bar(order.split(batch_size), desc, progress, leave=False):
        z = perturb(fit.features[idx].to(device))
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = model(z)
        loss = F.mse_loss(out.float(), fit.images[idx].to(device))
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
        if c.bf16_autocast:
            model = prepare_for_bf16(model, device)
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
            bf16=self.config.bf16_autocast,
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
