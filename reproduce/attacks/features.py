"""What the inversion adversary trains on: frozen-encoder features, images, splits, noise.

The encoder is frozen during an attack, so its clean output is computed once
per dataset split (eval mode, no augmentation) and kept in memory. Each
training batch then only pays for the defence's perturbation (fresh noise)
and the attack model itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

Perturbation = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "FeatureSet",
    "Perturbation",
    "compute_features",
    "defence_noise_sigma",
    "gaussian_perturbation",
    "make_perturbation",
    "split_train_val",
    "fit_val_split",
    "split_infer_time",
]


@dataclass
class FeatureSet:
    """Clean encoder features [N, C, H, W] (float32) with their images [N, 3, h, w].

    Images are stored as uint8 in [0, 255] (exact for 8-bit datasets such as
    CIFAR, FaceScrub and TinyImageNet); ``images_float`` gives them in [0, 1].
    """

    features: torch.Tensor
    images: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.features, torch.Tensor) or not isinstance(self.images, torch.Tensor):
            raise TypeError("features and images must be torch.Tensors")
        if self.features.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"features has {self.features.shape[0]} rows but images has {self.images.shape[0]}"
            )
        if self.images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {self.images.dtype}")

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def smashed_shape(self) -> tuple:
        return tuple(self.features.shape[1:])

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def subset(self, indices: torch.Tensor) -> "FeatureSet":
        return FeatureSet(self.features[indices], self.images[indices])

    def to(self, device) -> "FeatureSet":
        return FeatureSet(self.features.to(device), self.images.to(device))

    def images_float(self, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        images = self.images if indices is None else self.images[indices]
        return images.float().div_(255.0)


def _to_uint8(images01: torch.Tensor) -> torch.Tensor:
    return images01.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


@torch.no_grad()
def compute_features(
    encoder: nn.Module,
    dataset: Dataset,
    denormalize: Callable[[torch.Tensor], torch.Tensor],
    *,
    indices: Optional[Sequence[int]] = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "features",
) -> FeatureSet:
    """Run the frozen ``encoder`` (eval mode) over ``dataset`` once.

    ``dataset`` yields (normalised image, label); ``denormalize`` maps a
    normalised batch back to [0, 1]. ``indices`` selects a subset, in order.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if indices is not None:
        dataset = Subset(dataset, list(indices))
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    features, images = [], []
    try:
        for x, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
            features.append(encoder(x.to(device)).float().cpu())
            images.append(_to_uint8(denormalize(x)))
    finally:
        encoder.train(was_training)
    return FeatureSet(torch.cat(features), torch.cat(images))


def gaussian_perturbation(sigma: float) -> Perturbation:
    """``z -> z + sigma * N(0, I)``, fresh noise per call (identity when sigma == 0)."""
    if not isinstance(sigma, (int, float)) or sigma < 0:
        raise ValueError(f"sigma must be a non-negative number, got {sigma!r}")
    sigma = float(sigma)

    def perturb(z: torch.Tensor) -> torch.Tensor:
        if sigma == 0.0:
            return z
        return z + sigma * torch.randn_like(z)

    return perturb


def defence_noise_sigma(defence) -> float:
    """Std of the Gaussian noise ``defence`` adds to the features it sends (0.0 if none).

    Looks at the defence and, for combined defences, its ``parts``; a noise part
    switched off in eval mode (``active_in_eval=False``) does not count.
    """
    if defence is None:
        return 0.0
    parts = list(getattr(defence, "parts", [defence]))
    for part in parts:
        if getattr(part, "adds_noise", False) and getattr(part, "active_in_eval", True):
            return float(part.sigma)
    return 0.0


def make_perturbation(defence, noise_aware: bool = False, sigma: Optional[float] = None) -> Perturbation:
    """What the adversary's attack model sees on top of the clean features.

    As in the authors' attack, the default adds only the defence's Gaussian
    noise (std ``sigma``, default :func:`defence_noise_sigma`); with
    ``noise_aware`` the defence's full perturbation (``defence.perturb``:
    noise plus dropout, top-k pruning, ...) is used.
    """
    if noise_aware:
        if defence is None or not callable(getattr(defence, "perturb", None)):
            raise ValueError("noise_aware=True needs a defence with a perturb(z) method")
        return defence.perturb
    return gaussian_perturbation(defence_noise_sigma(defence) if sigma is None else sigma)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of ``range(n)`` into (fit, validation) index tensors."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 samples to hold out a validation part, got n={n}")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def split_infer_time(n: int, attack_fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' inference-time split: first 90% of the test set to train, last 10% to test."""
    if not 0.0 < attack_fraction < 1.0:
        raise ValueError(f"attack_fraction must be in (0, 1), got {attack_fraction}")
    n_attack = int(n * attack_fraction)
    if n_attack < 1 or n_attack >= n:
        raise ValueError(f"test split of {n} images too small for a {attack_fraction} split")
    return torch.arange(n_attack), torch.arange(n_attack, n)


def fit_val_split(train_data: "FeatureSet", test_data: "FeatureSet", val_fraction: float, seed: int,
                  device: torch.device) -> tuple["FeatureSet", "FeatureSet"]:
    """Check an attack's two feature sets and split the training one into a fit and a held-out part
    (on ``device``); the held-out part picks the best epoch, the test data is only scored."""
    if not isinstance(train_data, FeatureSet) or not isinstance(test_data, FeatureSet):
        raise TypeError("train_data and test_data must be FeatureSets")
    if train_data.smashed_shape != test_data.smashed_shape or train_data.image_shape != test_data.image_shape:
        raise ValueError("train_data and test_data have different feature or image shapes")
    if len(test_data) == 0:
        raise ValueError("test_data is empty")
    fit_idx, val_idx = split_train_val(len(train_data), val_fraction, seed)
    fit, val = train_data.subset(fit_idx), train_data.subset(val_idx)
    if device.type != "cpu":
        fit, val = fit.to(device), val.to(device)
    return fit, val
