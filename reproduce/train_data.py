"""The training run's data: the datasets with the run's subsets, the (DDP-sharded) loader, the pretraining loader.

``data_pipeline``: ``per-image`` (the dataset's transform on each image, collated) or ``batched``
(``reproduce.data.batched``: uint8 batches augmented and normalised as a whole). Both draw the same
batches from the loader's generator; the augmentations have the same distribution, not the same draws.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, Subset

from reproduce.data import load_dataset, subset
from reproduce.data.augment import check_augmentation, set_augmentation
from reproduce.data.batched import BATCHED_AUGMENTATIONS, BatchedImages
from reproduce.ddp import Dist, GlobalBatchShard

DATA_PIPELINES = ("per-image", "batched")


def check_data_pipeline(cfg: dict) -> None:
    """ValueError naming ``--data-pipeline`` when it is unknown or cannot do ``cfg``'s augmentation."""
    pipeline = cfg.get("data_pipeline", "per-image")
    if pipeline not in DATA_PIPELINES:
        raise ValueError(f"--data-pipeline must be one of {DATA_PIPELINES}, got {pipeline!r}")
    if pipeline == "batched" and check_augmentation(cfg["augment"]) not in BATCHED_AUGMENTATIONS:
        raise ValueError(
            f"--data-pipeline batched does --augment {' or '.join(BATCHED_AUGMENTATIONS)}, not "
            f"{check_augmentation(cfg['augment'])} (its rotation runs per image)"
        )


def _info_of(dataset):
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset.info


def load_data(cfg: dict, download: bool = False):
    """(augmented train, plain train, test) datasets of ``cfg``, with its class-balanced subsets."""

    def load(split, augment):
        return load_dataset(cfg["dataset"], split, data_root=cfg["data_root"], augment=augment, download=download)

    train, plain, test = load("train", cfg["augment"]), load("train", False), load("test", False)
    set_augmentation(train, cfg["augment"])  # the preset's kind (True = the authors')
    info = _info_of(train)
    if info.name != cfg["dataset"]:  # e.g. "facescrub" served by the 6-identity stand-in "facescrub-6id"
        warnings.warn(
            f"--dataset {cfg['dataset']}: training on {info.name} ({info.num_classes} classes), "
            "the data found under --data-root"
        )
        cfg.update(
            dataset=info.name,
            dataset_requested=cfg["dataset"],
            num_classes=info.num_classes,
            image_size=info.image_size,
            in_channels=info.channels,
        )
    if cfg["train_subset"] is not None and cfg["train_subset"] < len(train):
        train = subset(train, cfg["train_subset"], seed=cfg["seed"])
        plain = Subset(plain, train.indices)
    if cfg["test_subset"] is not None and cfg["test_subset"] < len(test):
        test = subset(test, cfg["test_subset"], seed=cfg["seed"])
    return train, plain, test


def train_loader(train_ds, cfg: dict, dist_ctx: Dist, device, gen: torch.Generator):
    """The training loader, its DDP shard sampler (None in one process) and the samples per epoch."""
    n, bs = len(train_ds), cfg["batch_size"]
    drop_last = n > bs and n % bs == 1  # a 1-sample batch breaks train-mode BN
    per_epoch = n - (n % bs if drop_last else 0)
    pin = device.type == "cuda"
    if cfg.get("data_pipeline", "per-image") == "batched":
        # One dataset item per batch (batch_size=None): the same batches as the per-image loader below.
        if dist_ctx.enabled:
            batches = _global_batches(train_ds, bs, per_epoch, dist_ctx, gen, drop_last)
        else:
            batches = torch.utils.data.BatchSampler(
                torch.utils.data.RandomSampler(train_ds, generator=gen), bs, drop_last
            )
        loader = DataLoader(
            BatchedImages(train_ds, cfg["augment"]),
            batch_size=None,
            sampler=batches,
            generator=gen,
            num_workers=cfg["workers"],
            pin_memory=pin,
        )
        return loader, batches if dist_ctx.enabled else None, per_epoch
    if not dist_ctx.enabled:
        loader = DataLoader(
            train_ds,
            batch_size=bs,
            shuffle=True,
            generator=gen,
            drop_last=drop_last,
            num_workers=cfg["workers"],
            pin_memory=pin,
        )
        return loader, None, per_epoch
    sampler = _global_batches(train_ds, bs, per_epoch, dist_ctx, gen, drop_last)
    loader = DataLoader(train_ds, batch_sampler=sampler, generator=gen, num_workers=cfg["workers"], pin_memory=pin)
    return loader, sampler, per_epoch


def _global_batches(train_ds, bs: int, per_epoch: int, dist_ctx: Dist, gen, drop_last: bool) -> GlobalBatchShard:
    """This rank's slices of the 1-process loader's batches."""
    # --batch-size is the global batch: each rank takes its slice of the 1-process loader's batch
    # (same generator, same permutation), so the ranks together train on exactly its batches.
    if bs % dist_ctx.world:
        raise ValueError(
            f"--batch-size {bs} (the global batch) must be divisible by the number of processes ({dist_ctx.world})"
        )
    if 0 < per_epoch % bs < dist_ctx.world:
        raise ValueError(
            f"the last batch ({per_epoch % bs} rows) cannot be split over {dist_ctx.world} "
            "processes: change --batch-size or --train-subset"
        )
    batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(train_ds, generator=gen), bs, drop_last)
    return GlobalBatchShard(batches, dist_ctx.rank, dist_ctx.world)


def _parts(defence):
    return list(defence.parts) if hasattr(defence, "parts") else [defence]


def pretrain_loader(defence, cfg, plain_ds):
    """The loader of a defence's decoder pretraining (ResSFL), or None when it has none."""
    if not any(getattr(p, "pretrain_epochs", 0) for p in _parts(defence)):
        return None
    if getattr(defence, "pretrain_split", "train") == "test":
        test = load_dataset(cfg["dataset"], "test", data_root=cfg["data_root"], augment=False)
        ds = Subset(test, range(int(0.9 * len(test))))  # the authors: the first 90 % of the test split
    else:
        ds = plain_ds
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    return DataLoader(ds, batch_size=cfg["batch_size"], shuffle=True, generator=gen, num_workers=cfg["workers"])
