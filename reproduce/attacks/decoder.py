"""Decoder-based model inversion attack (He et al. 2019 style; paper §S.3, facts §4a).

A ResDecoder(N=8, C=64) learns ``perturb(encoder(x)) -> x`` with MSE on [0, 1]
images. The epoch with the lowest MSE on a held-out part of the attack's OWN
training data is kept (the authors select on a test batch, a leak), then it is
scored once on the attack's test data.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from reproduce.attacks.evaluate import evaluate_reconstruction, reconstruct, seeded
from reproduce.attacks.features import FeatureSet, Perturbation, fit_val_split
from reproduce.attacks.state import check_config, load_resumable
from reproduce.checkpoint import save_atomic

__all__ = [
    "DecoderAttackConfig",
    "AttackResult",
    "build_inversion_decoder",
    "run_decoder_attack",
    "load_best_decoder",
]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "decoder_best.pt"
_FORMAT = "reproduce.attacks.decoder/v1"


@dataclass(frozen=True)
class DecoderAttackConfig:
    """Hyper-parameters of the decoder attack (defaults: the authors' code)."""

    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3  # the paper text says 5e-3; the code uses 1e-3
    weight_decay: float = 1e-4
    eta_min: float = 1e-5
    val_fraction: float = 0.1
    num_blocks: int = 8
    width: int = 64
    seed: int = 0
    eval_batch_size: int = 256
    num_samples: int = 16

    def __post_init__(self) -> None:
        check_config(self, positive_ints=("epochs", "batch_size", "num_blocks", "width", "eval_batch_size"),
                     positive=("lr", "eta_min"), nonnegative=("weight_decay",))


@dataclass
class AttackResult:
    """Outcome of one attack setting. ``model`` holds the selected (best-validation) weights."""

    model: nn.Module
    test_metrics: dict
    val_metrics: dict
    best_epoch: int
    epochs: int
    history: list
    samples: dict
    sizes: dict
    wall_time_s: float
    extra: dict = field(default_factory=dict)


def build_inversion_decoder(smashed_shape, image_shape, num_blocks: int = 8, width: int = 64) -> nn.Module:
    """ResDecoder mapping features of ``smashed_shape`` (C,H,W) to images of ``image_shape`` (c,h,w)."""
    from reproduce.models import ResDecoder

    channels, height, _ = smashed_shape
    out_channels, out_size, _ = image_shape
    return ResDecoder(
        in_channels=channels,
        in_size=height,
        out_size=out_size,
        out_channels=out_channels,
        num_blocks=num_blocks,
        width=width,
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(seed) * 1_000_003 + int(epoch)


def _eval_seed(seed: int) -> int:
    return int(seed) * 1_000_003 + 999_331


def _train_one_epoch(model, optimizer, data: FeatureSet, perturb, config, device, epoch, progress) -> float:
    model.train()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(_epoch_seed(config.seed, epoch)))
    total, count = 0.0, 0
    with seeded(_epoch_seed(config.seed, epoch), device):
        batches = order.split(config.batch_size)
        for idx in tqdm(batches, desc=f"decoder epoch {epoch}", disable=not progress, leave=False):
            z = perturb(data.features[idx].to(device))
            target = data.images[idx].to(device).float().div_(255.0)
            loss = F.mse_loss(model(z), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * idx.numel()
            count += idx.numel()
    return total / count


def _protocol(config: DecoderAttackConfig, fit: FeatureSet, val: FeatureSet, test: FeatureSet) -> dict:
    return {
        "config": dataclasses.asdict(config),
        "n_fit": len(fit),
        "n_val": len(val),
        "n_test": len(test),
        "smashed_shape": list(fit.smashed_shape),
        "image_shape": list(fit.image_shape),
    }


def run_decoder_attack(
    train_data: FeatureSet,
    test_data: FeatureSet,
    perturb: Perturbation,
    config: DecoderAttackConfig = DecoderAttackConfig(),
    *,
    device: str | torch.device = "cpu",
    state_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> AttackResult:
    """Train the inversion decoder on ``train_data`` and score it on ``test_data``.

    A seeded ``config.val_fraction`` of ``train_data`` is held out to pick the
    best epoch. With ``state_dir`` the state is checkpointed atomically after
    every epoch and a rerun resumes from it (bit-identical on the same device);
    the selected decoder is also saved there as ``decoder_best.pt``.
    """
    if not isinstance(config, DecoderAttackConfig):
        raise TypeError(f"config must be a DecoderAttackConfig, got {type(config).__name__}")
    started = time.perf_counter()
    device = torch.device(device)
    fit, val = fit_val_split(train_data, test_data, config.val_fraction, config.seed, device)
    protocol = _protocol(config, fit, val, test_data)

    with seeded(config.seed, device):
        model = build_inversion_decoder(
            fit.smashed_shape, fit.image_shape, config.num_blocks, config.width
        ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.eta_min)
    start_epoch, history = 0, []
    best_epoch, best_val, best_state = 0, float("inf"), None
    prior_wall = 0.0

    ckpt_path = Path(state_dir) / CHECKPOINT_NAME if state_dir is not None else None
    if ckpt_path is not None:
        state = load_resumable(ckpt_path, _FORMAT, protocol)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, history = state["epoch"], state["history"]
            best_epoch, best_val, best_state = state["best_epoch"], state["best_val_mse"], state["best_state"]
            prior_wall = state.get("wall_time_s", 0.0)

    eval_kwargs = dict(batch_size=config.eval_batch_size, device=device, noise_seed=_eval_seed(config.seed))
    bar = tqdm(range(start_epoch + 1, config.epochs + 1), desc="decoder attack", disable=not progress)
    for epoch in bar:
        lr = optimizer.param_groups[0]["lr"]
        train_loss = _train_one_epoch(model, optimizer, fit, perturb, config, device, epoch, progress)
        scheduler.step()
        val_mse = evaluate_reconstruction(model, val, perturb, **eval_kwargs)["mse"]
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_mse": val_mse})
        if val_mse < best_val:
            best_epoch, best_val = epoch, val_mse
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(loss=f"{train_loss:.4f}", val_mse=f"{val_mse:.4f}", best=best_epoch)
        if ckpt_path is not None:
            save_atomic(
                {
                    "format": _FORMAT,
                    "protocol": protocol,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": history,
                    "best_epoch": best_epoch,
                    "best_val_mse": best_val,
                    "best_state": best_state,
                    "wall_time_s": prior_wall + time.perf_counter() - started,
                },
                ckpt_path,
            )
    if best_state is None:
        raise RuntimeError("decoder attack finished without a finite validation MSE")

    best = copy.deepcopy(model)
    best.load_state_dict(best_state)
    best.eval()
    test_metrics = evaluate_reconstruction(best, test_data, perturb, **eval_kwargs)
    val_metrics = evaluate_reconstruction(best, val, perturb, **eval_kwargs)
    samples = {
        "original": test_data.images[: config.num_samples].cpu(),
        "reconstruction": reconstruct(best, test_data, perturb, limit=config.num_samples, **eval_kwargs),
    }
    if state_dir is not None:
        save_atomic(
            {
                "format": _FORMAT + "/best",
                "state_dict": best_state,
                "smashed_shape": list(fit.smashed_shape),
                "image_shape": list(fit.image_shape),
                "num_blocks": config.num_blocks,
                "width": config.width,
                "best_epoch": best_epoch,
                "protocol": protocol,
            },
            Path(state_dir) / BEST_NAME,
        )
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
    )


def load_best_decoder(state_dir: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild the selected decoder saved by :func:`run_decoder_attack` in ``state_dir``."""
    path = Path(state_dir) / BEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"no trained decoder attack at {path}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_inversion_decoder(saved["smashed_shape"], saved["image_shape"], saved["num_blocks"], saved["width"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved
