"""Training augmentations by name, and a batched crop + flip on uint8 tensors.

* ``authors``: the authors' augmentation (random crop with 4 px padding, horizontal flip,
  +-15 degree rotation on CIFAR; flip + rotation elsewhere), meant for 240 epochs.
* ``crop-flip``: random crop (padding = image size / 8, i.e. 4 px at 32 px) and horizontal flip,
  no rotation: the usual augmentation of short CIFAR runs (the ``cpu`` presets).
* ``flip``: horizontal flip only (the mildest one: for runs too short to fit crop + flip).
* ``none``: no augmentation.

``set_augmentation(dataset, kind)`` installs one of them on a dataset built by
``load_dataset(..., augment=True)`` (it replaces the per-image transform's augmentation, so the
float conversion and normalisation stay the dataset's). ``crop_flip_batch`` is the same
crop + flip done on a whole uint8 batch at once, for a tensor data pipeline.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Subset

AUGMENTATIONS = ("authors", "crop-flip", "flip", "none")


def check_augmentation(kind) -> str:
    """``kind`` as a name of ``AUGMENTATIONS`` (``True`` -> ``authors``, ``False`` -> ``none``)."""
    if isinstance(kind, bool):
        return "authors" if kind else "none"
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS} or a bool, got {kind!r}")
    return kind


def build_augmentation(kind, dataset: str, image_size: int):
    """The torchvision v2 transform for ``kind`` on PIL images / uint8 tensors; None for ``none``."""
    from torchvision.transforms import v2

    kind = check_augmentation(kind)
    if kind == "none":
        return None
    if kind == "flip":
        return v2.RandomHorizontalFlip()
    if kind == "crop-flip":
        return v2.Compose([v2.RandomCrop(image_size, padding=max(1, image_size // 8)), v2.RandomHorizontalFlip()])
    if dataset.startswith("cifar"):
        return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.RandomRotation(15)])
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomRotation(15)])


def _base(dataset):
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def set_augmentation(dataset, kind) -> None:
    """Install augmentation ``kind`` on ``dataset`` (or the dataset under its ``Subset`` wrappers)."""
    kind = check_augmentation(kind)
    base = _base(dataset)
    transform = getattr(base, "transform", None)
    if transform is None or not hasattr(transform, "augment"):
        raise TypeError(f"set_augmentation needs a dataset from load_dataset, got {type(base).__name__}")
    transform.augment = build_augmentation(kind, base.info.name, base.info.image_size)


def crop_flip_batch(
    images: torch.Tensor, padding: int = 4, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Random crop (zero padding ``padding``) and horizontal flip of each image of a ``[B,C,H,W]`` batch."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B,C,H,W], got shape {tuple(images.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).tolist()
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).tolist()
    flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    # one slice per image (views, one copy in stack): faster on the CPU than a 4-D gather
    out = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    return torch.where(flip[:, None, None, None], out.flip(3), out)
