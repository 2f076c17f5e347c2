"""A uint8 image dataset served a whole batch at a time, augmented on the batch (the batched data pipeline).

``BatchedImages(dataset, augment)`` holds the decoded uint8 images of an in-memory dataset from
``load_dataset`` (or a ``Subset`` of one); ``batched[indices]`` returns ``(x, y)`` for a list of
indices: the images gathered, augmented as one batch (``crop_flip_batch``: random crop with zero
padding of image size / 8, i.e. 4 px at 32 px, and a horizontal flip with probability 0.5, the
``crop-flip`` augmentation's distribution), then normalised in one fused pass, exactly as the
dataset's per-image transform normalises. Use it with a batch sampler and ``batch_size=None``
(``reproduce.train_data.train_loader`` does): the same batches as the per-image loader of the same
generator, at a fraction of the per-image cost. Augmentation draws from torch's global RNG (a
DataLoader worker's when ``workers > 0``), as the per-image transforms do.

The work runs on one intra-op thread: the batch's ops are small, and a second thread mostly waits
(badly so on a loaded machine).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.data import Dataset, Subset

from .augment import check_augmentation, crop_flip_batch

BATCHED_AUGMENTATIONS = ("crop-flip", "flip", "none")


@contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _images_and_targets(dataset) -> tuple[torch.Tensor, torch.Tensor, object]:
    """uint8 images, labels and ``info`` of an in-memory dataset or nested ``Subset`` of one."""
    index = None
    while isinstance(dataset, Subset):
        inner = torch.as_tensor(dataset.indices, dtype=torch.long)
        index = inner if index is None else inner[index]
        dataset = dataset.dataset
    images = getattr(dataset, "images", None)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(
            f"the batched data pipeline needs images held in memory as uint8 (load_dataset's "
            f"ImageTensorDataset), got {type(dataset).__name__}; use --data-pipeline per-image"
        )
    targets = dataset.targets
    if index is not None:
        images, targets = images[index], targets[index]
    return images, targets, dataset.info


class BatchedImages(Dataset):
    """``ds[list of indices] -> (normalised float32 [B,C,H,W], int64 labels [B])``, augmented as a batch."""

    def __init__(self, dataset, augment):
        kind = check_augmentation(augment)
        if kind not in BATCHED_AUGMENTATIONS:
            raise ValueError(
                f"augment must be one of {BATCHED_AUGMENTATIONS} for the batched data pipeline, got {kind!r} "
                "(its rotation runs per image: use --data-pipeline per-image)"
            )
        self.images, self.targets, self.info = _images_and_targets(dataset)
        # flip: crop_flip_batch with no padding (every crop offset is 0)
        self.padding = {"crop-flip": max(1, self.info.image_size // 8), "flip": 0}.get(kind)
        # (x/255 - mean)/std == x*scale - shift: the per-image transform's constants, per channel
        self.scale = (1.0 / (255.0 * torch.tensor(self.info.std))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(self.info.mean) / torch.tensor(self.info.std)).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(f"indices must be a list of indices (one batch), got shape {tuple(idx.shape)}")
        with _one_thread():
            x = self.images[idx]
            if self.padding is not None:
                x = crop_flip_batch(x, self.padding)
            return torch.addcmul(-self.shift, x.float(), self.scale), self.targets[idx]
