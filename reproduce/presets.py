"""Training presets: ``smoke`` (seconds), ``cpu`` / ``cpu-full`` (short CPU runs), ``paper`` (the paper's).

Every CLI flag of ``python -m reproduce.train`` overrides the preset's value. Measurements behind
the ``cpu`` presets' choices: ``docs/presets.md``.

Choices the paper leaves open, made here once:

* LR schedule (paper: "SGD, initial LR 0.05 and an appropriate decay"): ``MultiStepLR`` with
  the authors' first three milestones ``[60, 120, 180]`` of 240 epochs, **scaled** to the run
  length, gamma 0.2 (``lr_schedule="paper"``, the ``paper`` preset). The authors' schedule
  (milestones ``[60,120,180,210,260]`` scaled the same way, their epoch-1 LR-0 warm-up bug
  optional) is ``lr_schedule="authors"``; ``"cosine"`` and ``"warmup-cosine"`` are also offered.
* Augmentation: the authors' crop + flip + 15 degree rotation (``augment=True`` / ``"authors"``)
  for the ``paper`` preset; a horizontal flip only (``"flip"``) for ``cpu`` (10,000 images, 15 epochs:
  crop + flip underfits there, no augmentation overfits; ``reproduce/results/cpu_preset.md``); crop + flip
  (``"crop-flip"``) for ``cpu-full``.
* CEM weight: constant ``lambda`` (the paper's Eq. 8); the authors' LR-tied weight is
  ``cem_schedule="official"``. ``reproduce.strength.paper_units`` converts lambda to the
  paper's units (the CEM push does not depend on lambda alone but on lambda / N).
* Cut: VGG11-BN cut 4 (the paper's "first two conv layers": conv64, M, conv128, M, then the
  8-channel bottleneck and Sigmoid, smashed 8x8x8 on CIFAR). ResNet-20 cut 5, the cut the
  authors' ResNet-20 GAN-attack script loads (the paper's "first four conv layers" does not
  map onto a layer-list boundary of their ResNet-20). The ``smoke`` preset is ResNet-20: a smoke run's files
  stay under 10 MB (VGG11-BN's weights alone are 39 MB).
* Epochs: 240 (VGG11) / 120 (ResNet-20).
* ``cpu`` preset: 10,000 class-balanced CIFAR-10 training images, 2,000 test images,
  15 epochs, batch 128, SGD LR 0.05 with one warm-up epoch then a cosine to ~0
  (``warmup-cosine``), horizontal flips; ResSFL's decoder pretraining is cut to 2 epochs. Without
  ``--data-root`` it runs on the shipped ``cifar10-sample`` (5,000 + 1,000 real CIFAR-10 images)
  so that it works offline. The 240-epoch milestones scaled to 15 epochs (the earlier ``cpu``
  preset) left a quarter of the steps at LR 4e-4 and trained to 39-51 % test accuracy.
* ``cpu-full`` preset: all 50,000 training images and the full 10,000-image test set, 25
  epochs (2 of them warm-up) of the same schedule and augmentation; ResSFL pretraining 3 epochs.
  It trains with the speed options measured faster on the project's CPU: channels_last, bf16
  autocast of the conv stacks where the CPU has bf16 kernels, and the batched data pipeline
  (``reproduce.speed``, ``reproduce.data.batched``; ``--no-channels-last``, ``--no-bf16-autocast``,
  ``--data-pipeline per-image`` turn them off). The other presets train in plain float32.
"""

from __future__ import annotations

from typing import Any

# Settings every preset defines; the CLI may override each of them.
_COMMON: dict[str, Any] = {
    "dataset": "cifar10",
    "arch": "vgg11_bn",
    "cut": None,  # None: the per-arch default below
    "bottleneck": None,  # None: the defence's default (noRELU_C8S1; "none" for no defence)
    "sigmoid": True,
    "defence": "bottleneck",
    "sigma": 0.025,
    "noise": "auto",
    "cem_lambda": 16.0,
    "cem_variant": "paper",
    "cem_clusters": None,
    "cem_covariance": "diag",
    "cem_backend": "auto",
    "cem_schedule": "constant",
    "cem_refit": "epoch-features",
    "epochs": 240,
    "batch_size": 128,
    "eval_batch_size": 256,
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_schedule": "paper",
    "authors_warmup_bug": False,
    "train_subset": None,
    "test_subset": None,
    "augment": True,
    "workers": 0,
    "seed": 125,
    "pretrain_epochs": 30,
    # speed options (reproduce.speed, the batched pipeline of reproduce.data.batched); docs/presets.md
    "channels_last": False,
    "bf16_autocast": False,
    "compile": False,
    "data_pipeline": "per-image",
}

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        **_COMMON,
        "dataset": "cifar10-sample",
        "arch": "resnet20",  # 4.5 MB of weights (VGG11-BN's are 39 MB): a smoke run's files stay under 10 MB
        "epochs": 2,
        "batch_size": 8,
        "eval_batch_size": 16,
        "train_subset": 32,
        "test_subset": 16,
        "pretrain_epochs": 1,
        "seed": 0,
    },
    "cpu": {
        **_COMMON,
        "epochs": 15,
        "batch_size": 128,
        "lr": 0.05,
        "lr_schedule": "warmup-cosine",
        "augment": "flip",
        "train_subset": 10_000,
        "test_subset": 2_000,
        "pretrain_epochs": 2,
    },
    "cpu-full": {
        **_COMMON,
        "epochs": 25,
        "batch_size": 128,
        "lr": 0.05,
        "lr_schedule": "warmup-cosine",
        "augment": "crop-flip",
        "train_subset": None,
        "test_subset": None,
        "pretrain_epochs": 3,
        # measured faster on the 2-core AMD EPYC (docs/presets.md): 2.2x per step at 1 thread together
        "channels_last": True,
        "bf16_autocast": "auto",  # where the CPU (oneDNN) or the GPU has bf16 kernels; config.json records it
        "data_pipeline": "batched",
    },
    "paper": {**_COMMON},
}

DEFAULT_CUT = {"vgg11_bn": 4, "resnet20": 5}
DEFAULT_EPOCHS_PAPER = {"vgg11_bn": 240, "resnet20": 120}
OFFLINE_DATASET = "cifar10-sample"


def preset(name: str) -> dict[str, Any]:
    """A copy of preset ``name``'s settings; ValueError naming the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return dict(PRESETS[name], preset=name)
