"""Configuration of ``python -m reproduce.train``: the command line, and the preset + flags -> ``config.json``.

``build_parser()`` is the command line; ``resolve_config(args)`` turns a preset (``reproduce.presets``) and
the flags given into the complete, validated settings dict that a run stores in its ``config.json``;
``resume_config(stored, cfg, args)`` decides what a ``--resume`` runs with (the stored settings bind).
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import numpy as np
import torch

from cem_fast import VARIANTS as CEM_VARIANTS
from reproduce import presets as presets_mod
from reproduce import speed
from reproduce.data import DATASETS, dataset_info
from reproduce.data.augment import AUGMENTATIONS
from reproduce.defences import DEFENCES, canonical_name, default_bottleneck, defence_options
from reproduce.machine import default_device, machine_info
from reproduce.models import parse_bottleneck
from reproduce.runs import build_run_defence
from reproduce.schedules import CEM_SCHEDULES, LR_SCHEDULES
from reproduce.train_data import DATA_PIPELINES, check_data_pipeline

DEFAULT_PRESET = "cpu"  # of reproduce.train and reproduce.table alike
CEM_REFITS = ("epoch-features", "extra-pass")
NOISE_MODES = ("auto", "on", "off")
DTYPES = ("float32", "float64")
# What a run from before a setting existed ran with.
_OLD_RUN_DEFAULTS = {
    "dtype": "float32",
    "channels_last": False,
    "bf16_autocast": False,
    "compile": False,
    "data_pipeline": "per-image",
}
# Settings that may differ between a run and its --resume.
_RESUME_MAY_CHANGE = {"device", "workers", "progress", "command", "versions", "threads", "machine"}
_DERIVED = {"train_size", "test_size", "world_size", "defence_resolved"}
# Defence options settable from the CLI: flag dest -> option name.
_DEFENCE_FLAGS = {
    "defence_strength": "strength",
    "dropout_rate": "rate",
    "ssim_threshold": "ssim_threshold",
    "adv_steps": "steps",
    "pretrain_epochs": "pretrain_epochs",
    "pretrain_split": "pretrain_split",
    "adversary_sees": "adversary_sees",
    "prune_epoch": "prune_epoch",
    "pruning_ratio": "pruning_ratio",
    "prune_importance": "importance",
    "authors_pruning": "authors_pruning",
}


# ----------------------------------------------------------------------------- CLI / config


def _positive_int(flag):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {v}")
        return v

    return parse


def _nonneg_float(flag, positive=False):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            bound = "> 0" if positive else ">= 0"
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number {bound}, got {text}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m reproduce.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a(
        "--preset",
        choices=tuple(presets_mod.PRESETS),
        help=f"base settings (default {DEFAULT_PRESET}; with --resume: the run's)",
    )
    a("--out", required=True, help="run directory (see reproduce.rundir for its files)")
    a(
        "--resume",
        action="store_true",
        help="continue the run in OUT from its last finished epoch (a run stopped "
        "before its first checkpoint starts over with its stored settings; a finished run is left as it is)",
    )
    a(
        "--dataset",
        choices=DATASETS,
        help="default: the preset's with --data-root, else cifar10-sample (facescrub-6id: the 6-identity stand-in)",
    )
    a("--data-root", help="folder with the datasets (default: none -> the offline cifar10-sample)")
    a("--download", action="store_true", help="let torchvision download a CIFAR set missing from --data-root")
    a("--arch", choices=("vgg11_bn", "resnet20"))
    a("--cut", type=_positive_int("--cut"), help="client layers (default 4 for vgg11_bn, 5 for resnet20)")
    a("--bottleneck", help="bottleneck option, e.g. noRELU_C8S1 or none (default: the defence's)")
    a(
        "--no-sigmoid",
        dest="sigmoid",
        action="store_false",
        default=None,
        help="BatchNorm instead of Sigmoid at the cut",
    )
    a("--defense", "--defence", dest="defence", help=" | ".join(DEFENCES))
    a("--sigma", type=_nonneg_float("--sigma"), help="noise std (noise defences) and CEM's Sigma_p (default 0.025)")
    a(
        "--noise",
        choices=NOISE_MODES,
        help="add Gaussian noise of std sigma before the server: auto (default) = "
        "on for noise defences and whenever CEM is on (Algorithm 1 adds it)",
    )
    a("--cem-lambda", type=_nonneg_float("--cem-lambda"), help="CEM weight; 0 = no CEM at all (default 16)")
    a("--cem-variant", choices=CEM_VARIANTS)
    a("--cem-clusters", type=_positive_int("--cem-clusters"), help="clusters per class (default: the variant's)")
    a("--cem-covariance", choices=("diag", "full"))
    a("--cem-backend", choices=("auto", "torch", "cpp", "cuda", "triton"), help="cem_fast backend (default auto)")
    a("--cem-schedule", choices=CEM_SCHEDULES, help="constant (paper) or official (lambda*0.001/lr)")
    a("--cem-refit", choices=CEM_REFITS, help="refit from the epoch's features or an extra eval pass (authors)")
    a("--epochs", type=_positive_int("--epochs"))
    a("--batch-size", type=_positive_int("--batch-size"))
    a("--eval-batch-size", type=_positive_int("--eval-batch-size"))
    a("--lr", type=_nonneg_float("--lr", positive=True))
    a("--momentum", type=_nonneg_float("--momentum"))
    a("--weight-decay", type=_nonneg_float("--weight-decay"))
    a("--lr-schedule", choices=LR_SCHEDULES, help="paper (scaled [60,120,180]/240), authors, cosine")
    a("--authors-warmup-bug", action="store_true", default=None, help="epoch 1 at LR 0, as the authors' code")
    a("--train-subset", type=_positive_int("--train-subset"), help="class-balanced training subset size")
    a("--test-subset", type=_positive_int("--test-subset"), help="class-balanced test subset size")
    a("--full-data", action="store_true", help="ignore the preset's subsets (use all images)")
    a("--no-augment", dest="augment", action="store_false", default=None)
    a("--augment", dest="augment", choices=AUGMENTATIONS, help="the training augmentation (default: the preset's)")
    a("--workers", type=int, help="DataLoader workers (default 0)")
    a("--seed", type=int)
    a("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    a("--threads", type=_positive_int("--threads"), help="torch CPU threads (default: torch's)")
    a(
        "--dtype",
        choices=DTYPES,
        help="parameter and activation dtype (default float32; float64 for exactness checks, e.g. several "
        "processes against one)",
    )
    s = p.add_argument_group("speed options (docs/presets.md has their measurements)")
    s.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="model and input batches in channels_last memory format (z, noise and CEM as without it; "
        "default: the preset's)",
    )
    s.add_argument(
        "--bf16-autocast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CPU bf16 autocast around the encoder's cut layers and the server's conv stack in training; "
        "z, the noise, CEM and the loss stay float32 (needs a CPU with bf16 support; default: the preset's)",
    )
    s.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile (inductor) the encoder and the server; the first step compiles (default: off)",
    )
    s.add_argument(
        "--data-pipeline",
        choices=DATA_PIPELINES,
        help="per-image (the dataset's transform per image) or batched (uint8 batches augmented as a whole; "
        "crop-flip or no augmentation); default: the preset's",
    )
    a(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=True,
        help="no progress bars (they are shown only when stderr is a terminal anyway)",
    )
    a(
        "--stop-after-epoch",
        type=_positive_int("--stop-after-epoch"),
        help="debug: stop (as if killed) after this epoch's checkpoint",
    )
    g = p.add_argument_group("defence options")
    g.add_argument(
        "--defence-strength",
        type=_nonneg_float("--defence-strength", positive=True),
        help="NoPeek dCor weight / ResSFL, PATROL SSIM-penalty weight (default 0.3, the authors' run_exp.sh)",
    )
    g.add_argument("--dropout-rate", type=_nonneg_float("--dropout-rate"), help="default 0.2")
    g.add_argument(
        "--ssim-threshold", type=_nonneg_float("--ssim-threshold"), help="default 0.5 (0.6 facescrub/tinyimagenet)"
    )
    g.add_argument(
        "--adv-steps", type=_positive_int("--adv-steps"), help="decoder steps per batch (default 1; PATROL 3)"
    )
    g.add_argument("--pretrain-epochs", type=int, help="ResSFL decoder pretraining epochs")
    g.add_argument("--pretrain-split", choices=("train", "test"), help="train (default) or the authors' test 90%%")
    g.add_argument(
        "--adversary-sees",
        choices=("perturbed", "clean"),
        help="what the simulated attacker sees: clean z (default, the authors') or the noisy z",
    )
    g.add_argument("--prune-epoch", type=_positive_int("--prune-epoch"), help="PATROL pruning epoch (default 3/4)")
    g.add_argument(
        "--pruning-ratio",
        help="'match' (the encoder's size without the extra layer) or a fraction "
        "in [0, 1) (default: the authors' pruning)",
    )
    g.add_argument("--prune-importance", choices=("l1", "taylor"))
    g.add_argument(
        "--authors-pruning",
        action="store_true",
        default=None,
        help="ratio 0.05, Taylor, skip <=32-ch convs (the default unless --pruning-ratio or "
        "--prune-importance is given)",
    )
    return p


def _versions() -> dict:
    import torchvision

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
    }
    for mod in ("cem_fast", "torch_pruning", "torchmetrics"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            out[mod] = None
    return out


def resolve_config(args: argparse.Namespace) -> dict:
    """Preset + CLI overrides -> the complete, validated settings dict written to config.json."""
    cfg = presets_mod.preset(args.preset or DEFAULT_PRESET)
    for key in (
        "arch",
        "cut",
        "bottleneck",
        "sigmoid",
        "defence",
        "sigma",
        "noise",
        "cem_lambda",
        "cem_variant",
        "cem_clusters",
        "cem_covariance",
        "cem_backend",
        "cem_schedule",
        "cem_refit",
        "epochs",
        "batch_size",
        "eval_batch_size",
        "lr",
        "momentum",
        "weight_decay",
        "lr_schedule",
        "authors_warmup_bug",
        "train_subset",
        "test_subset",
        "augment",
        "workers",
        "seed",
        "channels_last",
        "bf16_autocast",
        "compile",
        "data_pipeline",
    ):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    if args.full_data:
        if args.train_subset is None:
            cfg["train_subset"] = None
        if args.test_subset is None:
            cfg["test_subset"] = None
    cfg["data_root"] = None if args.data_root is None else str(Path(args.data_root).expanduser().resolve())
    if args.dataset is not None:
        cfg["dataset"] = args.dataset
    elif cfg["data_root"] is None:
        cfg["dataset"] = presets_mod.OFFLINE_DATASET
    if cfg["cut"] is None:
        cfg["cut"] = presets_mod.DEFAULT_CUT[cfg["arch"]]
    if cfg["preset"] == "paper" and args.epochs is None:
        cfg["epochs"] = presets_mod.DEFAULT_EPOCHS_PAPER[cfg["arch"]]
    if cfg["workers"] < 0:
        raise ValueError(f"--workers must be >= 0, got {cfg['workers']}")

    cfg["defence"] = canonical_name(cfg["defence"])
    if cfg["bottleneck"] is None:
        cfg["bottleneck"] = default_bottleneck(cfg["defence"])
    accepted = defence_options(cfg["defence"])
    opts = {}
    for flag, option in _DEFENCE_FLAGS.items():
        value = getattr(args, flag, None)
        if flag == "pretrain_epochs" and value is None and "pretrain_epochs" in accepted:
            value = cfg["pretrain_epochs"]
        if value is None:
            continue
        if option not in accepted:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to --defense {cfg['defence']}")
        opts[option] = value
    if opts.get("pruning_ratio") not in (None, "match"):
        try:
            opts["pruning_ratio"] = float(opts["pruning_ratio"])
        except ValueError:
            raise ValueError(f"--pruning-ratio must be 'match' or a number, got {opts['pruning_ratio']!r}") from None
    if cfg["defence"] in ("noise", "noise_nopeek", "noise_arl"):
        opts["sigma"] = cfg["sigma"]
    cfg["defence_options"] = opts
    parse_bottleneck(cfg["bottleneck"])  # ValueError naming the bottleneck string

    cem_on = cfg["cem_lambda"] > 0
    if cem_on and cfg["sigma"] <= 0:
        raise ValueError("--sigma must be > 0 when --cem-lambda > 0 (CEM's bound needs the noise variance)")
    noise_defence = cfg["defence"] in ("noise", "noise_nopeek", "noise_arl")
    if noise_defence and cfg["sigma"] <= 0:
        raise ValueError(f"--sigma must be > 0 for --defense {cfg['defence']}")
    if cfg["noise"] == "on" and cfg["sigma"] <= 0:
        raise ValueError("--sigma must be > 0 with --noise on")
    if cfg["noise"] == "off" and noise_defence:
        raise ValueError(f"--noise off contradicts --defense {cfg['defence']}")
    # noise_on: noise added in FRONT of a defence that has none of its own.
    cfg["noise_on"] = (not noise_defence) and (cfg["noise"] == "on" or (cfg["noise"] == "auto" and cem_on))
    cfg["cem_enabled"] = cem_on
    if cfg["authors_warmup_bug"] and cfg["lr_schedule"] != "authors":
        raise ValueError("--authors-warmup-bug needs --lr-schedule authors")

    try:
        build_run_defence({**cfg, "noise_on": False})
    except TypeError as e:
        raise ValueError(str(e)) from None
    info = dataset_info(cfg["dataset"])
    cfg.update(image_size=info.image_size, in_channels=info.channels, num_classes=info.num_classes)
    cfg["extra_client_layer"] = cfg["defence"] == "patrol"
    cfg["device"] = args.device or default_device()
    cfg["progress"] = bool(args.progress)
    cfg["threads"] = args.threads
    cfg["dtype"] = args.dtype or "float32"
    if cfg["bf16_autocast"] == "auto":  # a preset's "where the device has bf16 kernels"; config.json gets the bool
        cfg["bf16_autocast"] = cfg["dtype"] == "float32" and speed.bf16_supported(torch.device(cfg["device"]).type)
    speed.check_speed_options(cfg)
    check_data_pipeline(cfg)
    cfg["command"] = None
    cfg["versions"] = _versions()
    cfg["machine"] = machine_info(cfg["device"])
    return cfg


def check_resume_config(old: dict, new: dict) -> None:
    """ValueError naming every setting (outside the ones a resume may change) that differs."""
    old, new = ({**_OLD_RUN_DEFAULTS, **c} for c in (old, new))  # runs from before a setting existed
    diff = sorted(
        k for k in set(old) | set(new) if k not in _RESUME_MAY_CHANGE and k not in _DERIVED and old.get(k) != new.get(k)
    )
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ValueError(f"--resume with different settings than the run in its directory ({details})")


def resume_config(stored: dict, cfg: dict, args: argparse.Namespace) -> dict:
    """The settings a ``--resume`` runs with: ``stored``, plus what a resume may change (device, threads, ...).

    A flag given now must agree with the stored run (ValueError naming the clash).
    """
    stored = {**_OLD_RUN_DEFAULTS, **stored}  # runs from before a setting existed
    given = {k for k, v in vars(args).items() if v is not None and k in stored}
    clash = sorted(k for k in given - _RESUME_MAY_CHANGE if stored[k] != cfg[k])
    if clash:
        raise ValueError(
            "--resume with settings that differ from the stored run: "
            + ", ".join(f"{k} {stored[k]!r} (stored) vs {cfg[k]!r}" for k in clash)
        )
    return {**stored, **{k: cfg[k] for k in _RESUME_MAY_CHANGE if k in cfg and (k in given or k not in stored)}}
