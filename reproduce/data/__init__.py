"""Datasets (CIFAR-10/100, FaceScrub, Tiny ImageNet, the shipped CIFAR-10 sample) and helpers."""

from .datasets import DATASETS, DEFAULT_ROOT, SAMPLE_PATH, DatasetInfo, dataset_info, denormalize, load_dataset, subset

__all__ = [
    "DATASETS",
    "DEFAULT_ROOT",
    "SAMPLE_PATH",
    "DatasetInfo",
    "dataset_info",
    "denormalize",
    "load_dataset",
    "subset",
]
