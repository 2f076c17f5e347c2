"""The one interface every defence implements.

A training step calls, in this order::

    z = model.encoder(x)
    defence.adversary_step(x_unit, z.detach())        # ResSFL / PATROL: train the simulated attacker
    z_seen = defence.perturb(z)                       # what the server (and an attacker) receives
    logits = model.server(z_seen)
    loss = ce + defence.regularizer(x, z, y, x_unit=x_unit) + lambda_eff * cem(z, y)

``x`` is the normalised input, ``x_unit`` the same batch denormalised to [0, 1] (only built
when ``defence.needs_unit_images``). Before training the trainer calls ``setup`` (sizes the
defence to the model) and ``pretrain``; at the start of every epoch ``on_epoch_start``.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn


class Defence(nn.Module):
    """Base class: the identity defence (no perturbation, no extra loss, no adversary).

    Attributes a subclass may override:
      name                  registry name
      extra_client_layer    the model must be built with PATROL's extra client layer
      needs_unit_images     regularizer/adversary_step want ``x_unit`` (images in [0, 1])
      adds_noise            perturb adds Gaussian noise of std ``sigma``
      active_in_eval        perturb also acts in eval mode (validation, attack time)
    """

    name = "none"
    extra_client_layer = False
    needs_unit_images = False
    adds_noise = False
    active_in_eval = True

    def setup(
        self,
        model: nn.Module,
        *,
        image_size: int,
        in_channels: int = 3,
        dataset: str = "",
        device: torch.device | str = "cpu",
        total_epochs: int = 1,
        baseline_encoder_params: Optional[int] = None,
        bf16_autocast: bool = False,
    ) -> None:
        """Size defence-owned modules to ``model`` (smashed shape, image size); ``bf16_autocast`` (the trainer's
        ``--bf16-autocast``) runs their convolutions under CPU bf16 autocast. Default: nothing."""

    def perturb(self, z: torch.Tensor) -> torch.Tensor:
        """Return what the server sees. Default: ``z`` unchanged."""
        return z

    def regularizer(
        self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor, *, x_unit: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """Extra encoder loss on the clean features ``z`` (with grad), or None."""
        return None

    def adversary_step(self, x_unit: Optional[torch.Tensor], z: torch.Tensor) -> dict:
        """Train defence-owned adversaries on detached features; returns logged scalars."""
        return {}

    def pretrain(self, encoder: nn.Module, loader: Iterable, *, denormalize, device, progress: bool = False) -> dict:
        """Train defence-owned adversaries before the main training. Default: nothing."""
        return {}

    def on_epoch_start(self, epoch: int, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> bool:
        """Hook at the start of ``epoch`` (1-based). Returns True if the encoder's parameters
        were replaced (the trainer then re-points the client optimizer)."""
        return False

    def describe(self) -> dict:
        """The resolved hyper-parameters, for config.json."""
        return {"name": self.name}

    def _perturbing(self) -> bool:
        return self.training or self.active_in_eval

    # nn.Module.__call__ would run forward(); make defence(z) mean perturb(z).
    def forward(self, z: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return self.perturb(z)


def check_positive(value, argument: str, *, allow_zero: bool = False) -> float:
    """``float(value)`` if it is a finite number > 0 (>= 0 with allow_zero), else ValueError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{argument} must be a number, got {value!r}") from None
    if not (v == v) or v in (float("inf"), float("-inf")) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{argument} must be a finite number {bound}, got {value!r}")
    return v
