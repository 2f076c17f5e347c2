"""The adaptive attack: a decoder attacker that knows the defence and what CEM publishes server-side.

Threat model (stronger than ``decoder``):

* it knows the defence's perturbation exactly and can apply it itself, so its decoder trains on
  ``draws`` fresh perturbations of every image per epoch (a denoising decoder of the real channel);
* it knows CEM's structure: a per-class k-means of the clean features (what the server-side CEM state
  holds). It fits the same model (``cem_fast.CEMLoss(...).refit``) on its own clean features and uses it
  as a Gaussian-mixture prior: the observed ``z~`` is first moved towards the posterior mean
  ``E[z | z~] = sum_k r_k(z~) (mu_k + V_k (V_k + s^2)^-1 (z~ - mu_k))`` (a per-cluster Wiener filter),
  by a learned gate ``g``: the decoder sees ``z~ + g (E[z | z~] - z~)``;
* it starts from the ``decoder`` attack's selected weights with ``g = 0`` (exactly that decoder), and
  that starting point is a candidate of the held-out selection, so on held-out data it is never worse.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .data import FeatureSet
from .decoder import DecoderConfig, prepare_for_bf16, train_decoder_epoch
from .loop import AttackState, TrainedAttack
from .nets import build_decoder

__all__ = [
    "AdaptiveConfig",
    "AdaptiveAttack",
    "ClusterDenoiser",
    "AdaptiveInverter",
    "fit_cluster_prior",
    "noise_variance",
]


@dataclass(frozen=True)
class AdaptiveConfig(DecoderConfig):
    """The decoder's hyper-parameters plus ``draws`` (noise draws per image and epoch) and the k-means size."""

    draws: int = 4
    clusters_per_class: int = 3  # CEM's default for variant "paper"
    lr: float = 5e-4  # a warm start: half the decoder's rate

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("draws", "clusters_per_class"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


class ClusterDenoiser(nn.Module):
    """Posterior mean of clean flat features under a diagonal Gaussian mixture, observed with noise variance s^2."""

    def __init__(self, centroids: torch.Tensor, weights: torch.Tensor, variances: torch.Tensor, noise_var: float):
        super().__init__()
        keep = weights > 0
        mu, var = centroids[keep].double(), variances[keep].double().clamp_min(0)
        tot = var + float(noise_var) + 1e-12
        self.register_buffer("mu", mu.float())
        self.register_buffer("inv_tot", tot.reciprocal().float())
        self.register_buffer("gain", (var / tot).float())
        const = torch.log(weights[keep].double()) - 0.5 * (mu.pow(2) / tot + tot.log()).sum(1)
        self.register_buffer("const", const.float())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logp = self.const - 0.5 * (z.pow(2) @ self.inv_tot.T - 2 * z @ (self.mu * self.inv_tot).T)
        r = torch.softmax(logp, dim=1)
        return r @ self.mu + z * (r @ self.gain) - r @ (self.gain * self.mu)


class AdaptiveInverter(nn.Module):
    """``decoder(z~ + gate * (denoiser(z~) - z~))``; ``gate`` starts at 0 (the plain decoder)."""

    def __init__(self, decoder: nn.Module, denoiser: ClusterDenoiser):
        super().__init__()
        self.decoder, self.denoiser = decoder, denoiser
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(1).float()
        with torch.autocast(z.device.type, enabled=False):  # the posterior stays float32 under any autocast
            moved = flat + self.gate * (self.denoiser(flat) - flat)
        return self.decoder(moved.view_as(z))


def fit_cluster_prior(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, clusters_per_class: int, sigma: float, seed: int = 0
):
    """CEM's per-class k-means state fitted on clean ``features`` (a ``cem_fast.CEMLoss``, variant paper, diag)."""
    from cem_fast import CEMLoss

    cem = CEMLoss(
        num_classes,
        clusters_per_class=clusters_per_class,
        sigma=max(float(sigma), 1e-6),
        variant="paper",
        covariance="diag",
        backend="torch",
        seed=seed,
    )
    return cem.refit(features.flatten(1).float(), labels)


def noise_variance(perturb, sigma: Optional[float], train: FeatureSet, seed: int = 0) -> float:
    """The defence's noise variance per dimension: ``sigma^2``, or measured (seeded) from the callable itself."""
    from .loop import seeded

    if sigma is not None:
        return float(sigma) ** 2
    z = train.features[:512]
    with seeded(int(seed) * 1_000_003 + 17):
        return float((perturb(z) - z).pow(2).mean())


class AdaptiveAttack(TrainedAttack):
    """See the module docstring. ``init``: the decoder attack's selected model (None: a fresh decoder)."""

    name = "adaptive"
    seed_offset = 700_000

    def __init__(
        self,
        config: AdaptiveConfig = AdaptiveConfig(),
        *,
        num_classes: int,
        noise_var: float,
        init: Optional[nn.Module] = None,
        init_info: Optional[dict] = None,
    ):
        if not isinstance(config, AdaptiveConfig):
            raise TypeError(f"config must be an AdaptiveConfig, got {type(config).__name__}")
        if init is not None and not isinstance(init, nn.Module):
            raise TypeError(f"init must be an nn.Module (the decoder attack's model), got {type(init).__name__}")
        if not noise_var >= 0:
            raise ValueError(f"noise_var must be >= 0, got {noise_var!r}")
        super().__init__(config)
        self.num_classes, self.noise_var = int(num_classes), float(noise_var)
        self.init, self.init_info = init, init_info or {}
        self.select_initial = init is not None

    def protocol(self) -> dict:
        return {**super().protocol(), "noise_var": self.noise_var, "init": self.init_info}

    def setup(self, fit: FeatureSet, device: torch.device) -> AttackState:
        c = self.config
        cem = fit_cluster_prior(
            fit.features.cpu(), fit.labels.cpu(), self.num_classes, c.clusters_per_class, self.noise_var**0.5
        )
        d = cem.centroids.shape[-1]
        denoiser = ClusterDenoiser(
            cem.centroids.reshape(-1, d), cem.pi.reshape(-1), cem.variance.reshape(-1, d), self.noise_var
        )
        if self.init is not None:
            decoder = copy.deepcopy(self.init)
        else:
            decoder = build_decoder(fit.feature_shape, fit.image_shape, c.num_blocks, c.width)
        model = AdaptiveInverter(decoder, denoiser).to(device)
        if c.bf16_autocast:
            model.decoder = prepare_for_bf16(model.decoder, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=c.t_max, eta_min=c.eta_min)
        return AttackState(inverter=model, optimizers={"adaptive": optimizer}, schedulers={"adaptive": scheduler})

    def epoch(self, state, fit, perturb, epoch, device, progress) -> dict:
        loss = train_decoder_epoch(
            state.inverter,
            state.optimizers["adaptive"],
            fit,
            perturb,
            self.config.batch_size,
            device,
            f"adaptive epoch {epoch}",
            progress,
            draws=self.config.draws,
            bf16=self.config.bf16_autocast,
        )
        return {"train_loss": loss, "gate": state.inverter.gate.item()}
