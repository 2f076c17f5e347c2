"""Train a split model with a defence and (optionally) CEM: Algorithm 1 of the paper.

    python -m reproduce.train --preset cpu --data-root /work/shared/data --defense noise_nopeek \
        --cem-lambda 16 --out runs/nn_cem

One step (top to bottom)::

    z       = encoder(x)                          # clean smashed data
    defence.adversary_step(x01, z.detach())       # ResSFL/PATROL: train the simulated attacker
    logits  = server(defence.perturb(z))          # the server sees the perturbed features
    loss    = CE + defence.regularizer(x, z, y) + lambda_eff * cem(z, y)
    loss.backward(); client_opt.step(); server_opt.step()

CEM is built only when ``--cem-lambda > 0``. Its clusters are refit at each epoch end from the
clean features the epoch already computed (``--cem-refit extra-pass``: the authors' extra eval
pass); in epoch 1 there are none yet and the term is zero. See ``reproduce.runs`` for the run
directory format and ``reproduce.presets`` for the presets and the schedule choices.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from reproduce import presets as presets_mod
from reproduce.checkpoint import load_checkpoint, save_atomic, write_json_atomic
from reproduce.data import dataset_info, denormalize, load_dataset, subset
from reproduce.data.augment import AUGMENTATIONS, set_augmentation  # [preset] named augmentations
from reproduce.defences import canonical_name, default_bottleneck, defence_options
from reproduce.models import parse_bottleneck
from reproduce.runs import (CHECKPOINT_FILE, CONFIG_FILE, FINAL_FILE, METRICS_FILE, build_model,
                            build_run_defence, load_model_state, setup_defence)
from reproduce.schedules import CEM_SCHEDULES, LR_SCHEDULES, LRFactor, cem_weight

CEM_VARIANTS = ("paper", "official", "official-trained")
CEM_REFITS = ("epoch-features", "extra-pass")
NOISE_MODES = ("auto", "on", "off")
# Settings that may differ between a run and its --resume.
_RESUME_MAY_CHANGE = {"device", "workers", "progress", "command", "versions", "threads"}
_DERIVED = {"train_size", "test_size", "world_size", "defence_resolved"}
# Defence options settable from the CLI: flag dest -> option name.
_DEFENCE_FLAGS = {
    "defence_strength": "strength", "dropout_rate": "rate", "ssim_threshold": "ssim_threshold",
    "adv_steps": "steps", "pretrain_epochs": "pretrain_epochs", "pretrain_split": "pretrain_split",
    "adversary_sees": "adversary_sees", "prune_epoch": "prune_epoch", "pruning_ratio": "pruning_ratio",
    "prune_importance": "importance", "authors_pruning": "authors_pruning",
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
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number {'> 0' if positive else '>= 0'}, got {text}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reproduce.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="cpu", choices=tuple(presets_mod.PRESETS), help="base settings (default cpu)")
    a("--out", required=True, help="run directory (config.json, checkpoint.pt, metrics.jsonl, final.pt)")
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt (a run stopped before its first "
      "checkpoint starts over with its stored settings)")
    a("--dataset", help="cifar10 | cifar100 | facescrub | tinyimagenet | cifar10-sample "
                        "(default: the preset's with --data-root, else cifar10-sample)")
    a("--data-root", help="folder with the datasets (default: none -> the offline cifar10-sample)")
    a("--arch", choices=("vgg11_bn", "resnet20"))
    a("--cut", type=_positive_int("--cut"), help="client layers (default 4 for vgg11_bn, 5 for resnet20)")
    a("--bottleneck", help="bottleneck option, e.g. noRELU_C8S1 or none (default: the defence's)")
    a("--no-sigmoid", dest="sigmoid", action="store_false", default=None, help="BatchNorm instead of Sigmoid at the cut")
    a("--defense", "--defence", dest="defence", help="none | bottleneck | noise | nopeek | dropout | ressfl | "
                                                      "patrol | noise_nopeek | noise_arl")
    a("--sigma", type=_nonneg_float("--sigma"), help="noise std (noise defences) and CEM's Sigma_p (default 0.025)")
    a("--noise", choices=NOISE_MODES, help="add Gaussian noise of std sigma before the server: auto (default) = "
                                          "on for noise defences and whenever CEM is on (Algorithm 1 adds it)")
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
    a("--augment", dest="augment", choices=AUGMENTATIONS, help="authors | crop-flip | none "  # [preset]
      "(default: the preset's)")
    a("--workers", type=int, help="DataLoader workers (default 0)")
    a("--seed", type=int)
    a("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    a("--threads", type=_positive_int("--threads"), help="torch CPU threads (default: torch's)")
    a("--dtype", choices=("float32", "float64"), default="float32",
      help="parameter and activation dtype (float64 for exactness checks, e.g. several processes against one)")
    a("--no-progress", dest="progress", action="store_false", default=True)
    a("--stop-after-epoch", type=_positive_int("--stop-after-epoch"),
      help="debug: stop (as if killed) after this epoch's checkpoint")
    g = p.add_argument_group("defence options")
    g.add_argument("--defence-strength", type=_nonneg_float("--defence-strength", positive=True),
                   help="NoPeek dCor weight / ResSFL, PATROL SSIM-penalty weight "
                        "(default 0.3, the authors' run_exp.sh)")  # [preset]
    g.add_argument("--dropout-rate", type=_nonneg_float("--dropout-rate"), help="default 0.2")
    g.add_argument("--ssim-threshold", type=_nonneg_float("--ssim-threshold"), help="default 0.5 (0.6 facescrub/tinyimagenet)")
    g.add_argument("--adv-steps", type=_positive_int("--adv-steps"),
                   help="decoder steps per batch (default 1; PATROL 3)")  # [preset]
    g.add_argument("--pretrain-epochs", type=int, help="ResSFL decoder pretraining epochs")
    g.add_argument("--pretrain-split", choices=("train", "test"), help="train (default) or the authors' test 90%%")
    g.add_argument("--adversary-sees", choices=("perturbed", "clean"),  # [preset]
                   help="what the simulated attacker sees: clean z (default, the authors') or the noisy z")
    g.add_argument("--prune-epoch", type=_positive_int("--prune-epoch"), help="PATROL pruning epoch (default 3/4)")
    g.add_argument("--pruning-ratio", help="'match' (the encoder's size without the extra layer) or a fraction "
                   "in [0, 1) (default: the authors' pruning)")  # [preset]
    g.add_argument("--prune-importance", choices=("l1", "taylor"))
    g.add_argument("--authors-pruning", action="store_true", default=None,
                   help="ratio 0.05, Taylor, skip <=32-ch convs (the default unless --pruning-ratio or "
                   "--prune-importance is given)")  # [preset]
    return p


def _versions() -> dict:
    import torchvision
    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": np.__version__}
    for mod in ("cem_fast", "torch_pruning", "torchmetrics"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            out[mod] = None
    return out


def resolve_config(args: argparse.Namespace) -> dict:
    """Preset + CLI overrides -> the complete, validated settings dict written to config.json."""
    cfg = presets_mod.preset(args.preset)
    for key in ("arch", "cut", "bottleneck", "sigmoid", "defence", "sigma", "noise", "cem_lambda", "cem_variant",
                "cem_clusters", "cem_covariance", "cem_backend", "cem_schedule", "cem_refit", "epochs", "batch_size",
                "eval_batch_size", "lr", "momentum", "weight_decay", "lr_schedule", "authors_warmup_bug",
                "train_subset", "test_subset", "augment", "workers", "seed"):
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
    if args.preset == "paper" and args.epochs is None:
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
    cfg["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg["progress"] = bool(args.progress)
    cfg["threads"] = args.threads
    cfg["dtype"] = args.dtype
    cfg["command"] = None
    cfg["versions"] = _versions()
    return cfg


# ----------------------------------------------------------------------------- helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _info_of(dataset):
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset.info


def _load_data(cfg: dict):
    train = load_dataset(cfg["dataset"], "train", data_root=cfg["data_root"], augment=cfg["augment"])
    set_augmentation(train, cfg["augment"])  # [preset] the preset's kind (True = the authors')
    plain = load_dataset(cfg["dataset"], "train", data_root=cfg["data_root"], augment=False)
    test = load_dataset(cfg["dataset"], "test", data_root=cfg["data_root"], augment=False)
    info = _info_of(train)
    if info.name != cfg["dataset"]:  # e.g. "facescrub" served by the 6-identity stand-in "facescrub-6id"
        warnings.warn(f"--dataset {cfg['dataset']}: training on {info.name} ({info.num_classes} classes), "
                      "the data found under --data-root")
        cfg.update(dataset=info.name, dataset_requested=cfg["dataset"], num_classes=info.num_classes,
                   image_size=info.image_size, in_channels=info.channels)
    if cfg["train_subset"] is not None and cfg["train_subset"] < len(train):
        train = subset(train, cfg["train_subset"], seed=cfg["seed"])
        plain = Subset(plain, train.indices)
    if cfg["test_subset"] is not None and cfg["test_subset"] < len(test):
        test = subset(test, cfg["test_subset"], seed=cfg["seed"])
    return train, plain, test


def _repoint_client_optimizer(opt: torch.optim.Optimizer, encoder: torch.nn.Module) -> None:
    """After pruning replaced encoder parameters: step the new ones, keep surviving momentum."""
    params = list(encoder.parameters())
    kept = {p: opt.state[p] for p in params if p in opt.state}
    opt.param_groups[0]["params"] = params
    opt.state.clear()
    opt.state.update(kept)


class Collapse(UserWarning):
    """The encoder's features collapsed or the accuracy is at chance."""


def _check_collapse(row: dict, cfg: dict) -> None:
    sigma = cfg["sigma"]
    floor = 1e-3 * sigma ** 2 if sigma > 0 else 1e-8
    if row["feature_var"] < floor:
        warnings.warn(f"epoch {row['epoch']}: clean-feature variance {row['feature_var']:.3g} < {floor:.3g} "
                      f"(1e-3 sigma^2): the encoder output is collapsing to a constant; lower --cem-lambda "
                      f"or use --cem-schedule official", Collapse, stacklevel=2)
    if row["epoch"] > 2 and row["train_acc"] <= 1.5 / cfg["num_classes"]:
        warnings.warn(f"epoch {row['epoch']}: training accuracy {row['train_acc']:.3f} is at chance "
                      f"(1/{cfg['num_classes']})", Collapse, stacklevel=2)


# ----------------------------------------------------------------------------- torchrun (DDP)

class Dist:
    """Data-parallel context from torchrun's environment (WORLD_SIZE > 1); a no-op otherwise."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.group = None
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.group = dist.group.WORLD

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``x [n_r, ...]`` of all ranks in rank order (the ``n_r`` may differ)."""
        if not self.enabled:
            return x
        import torch.distributed as dist
        sizes = [int(s) for s in self.gather_objects(int(x.shape[0]))]
        padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded)
        return torch.cat([c[:n] for c, n in zip(chunks, sizes)])


class GlobalBatchShard(torch.utils.data.Sampler):
    """This rank's rows of each global batch of ``batches`` (a batch sampler over the whole dataset).

    Rank ``r`` of ``W`` takes rows ``[r*b//W, (r+1)*b//W)`` of a batch of ``b`` rows, so the ranks' shards
    concatenated in rank order are exactly the 1-process batch. ``positions`` lists the epoch-order
    positions of the rows this rank was given so far in the current epoch (for the CEM refit's order).
    """

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world
        self.positions: list[int] = []

    def __iter__(self):
        self.positions = []
        start = 0
        for batch in self.batches:
            b = len(batch)
            lo, hi = self.rank * b // self.world, (self.rank + 1) * b // self.world
            self.positions.extend(range(start + lo, start + hi))
            start += b
            yield batch[lo:hi]

    def __len__(self) -> int:
        return len(self.batches)


class _GlooSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Train-mode BatchNorm with statistics over all ranks, for CPU tensors (torch's SyncBatchNorm is GPU-only).

    Two differentiable all-reduces per layer (sum and count, then squared deviations). Their backward sums
    the gradients over the ranks, so after DDP's averaging each parameter gets the gradient of the
    global batch. Eval mode, and training outside torch.distributed, is plain BatchNorm.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1):
            return super().forward(x)
        self._check_input_dim(x)
        from torch.distributed.nn.functional import all_reduce
        group = self.process_group or dist.group.WORLD
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        # In float64, as ATen's CPU BatchNorm accumulates: float32 sums lose ~1e-4 in small-variance channels.
        xd = x.double()
        count = xd.new_full((1,), x.numel() // x.shape[1] if x.numel() else 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its replacement has no autograd support
            packed = all_reduce(torch.cat([xd.sum(dims), count]), group=group)
            total = packed[-1]
            mean = packed[:-1] / total
            xc = xd - mean.view(shape)
            var = all_reduce((xc * xc).sum(dims), group=group) / total
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.double().view(shape) + self.bias.double().view(shape)
        y = y.to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                n = float(total)
                unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return y


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device, process_group=None) -> torch.nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` on accelerators; on CPU the gloo version above.

    Parameters and buffers are shared with the original layers and the state_dict keys stay the same.
    """
    if device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        out = _GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device, process_group))
    return out


class _Net:
    """The encoder and server the step calls (DDP-wrapped under torchrun)."""

    def __init__(self, model, dist_ctx: "Dist", device):
        self.model = model
        self.encoder, self.server = model.encoder, model.server
        if dist_ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # Global train-mode BN statistics: the same normalisation as one process on the global batch.
            model.encoder = self.encoder = convert_sync_batchnorm(model.encoder, device)
            model.server = self.server = convert_sync_batchnorm(model.server, device)
            ids = [device.index] if device.type == "cuda" and device.index is not None else None
            self.encoder = DDP(model.encoder, device_ids=ids)
            self.server = DDP(model.server, device_ids=ids)

    def train(self):
        self.model.train()

    def eval(self):
        self.model.eval()


# ----------------------------------------------------------------------------- training

def _progress(iterable, cfg, desc):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (cfg["progress"] and sys.stderr.isatty()))


def train_epoch(epoch, model, defence, cem, loader, opts, cfg, device, lam_eff,
                dist_ctx: Optional["Dist"] = None) -> tuple[dict, list, list]:
    """One epoch of Algorithm 1; returns the epoch's metrics and (for the CEM refit) its features."""
    model.train()
    defence.train()
    keep_features = cem is not None and cfg["cem_refit"] == "epoch-features"
    ddp = dist_ctx is not None and dist_ctx.enabled
    feats, labels = [], []
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("loss", "ce", "cem", "reg", "adv_ssim")}
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    zsum = zsq = None
    for x, y in _progress(loader, cfg if dist_ctx is None or dist_ctx.main else {**cfg, "progress": False},
                          f"epoch {epoch}/{cfg['epochs']}"):
        x, y = x.to(device, _param_dtype(model), non_blocking=True), y.to(device, non_blocking=True)
        x_unit = denormalize(x, cfg["dataset"]) if defence.needs_unit_images else None
        z = model.encoder(x)
        adv = defence.adversary_step(x_unit, z.detach())
        logits = model.server(defence.perturb(z))
        if ddp:
            # This rank's share of the global-batch mean, times the world size (DDP averages the ranks'
            # gradients): exact also when the last batch splits unevenly.
            b_global = int(dist_ctx.sum_(torch.tensor([x.shape[0]], device=device)))
            ce_sum = F.cross_entropy(logits, y, reduction="sum")
            ce = ce_sum.detach() / x.shape[0]
            objective = ce_sum * (dist_ctx.world / b_global)
        else:
            ce = F.cross_entropy(logits, y)
        loss = ce
        reg = defence.regularizer(x, z, y, x_unit=x_unit)
        if reg is not None:
            loss = loss + reg
        if cem is not None:
            cem_value = cem(z, y)  # global value; under DDP its gradient is pre-scaled like objective's
            loss = loss + lam_eff * cem_value
        if ddp:
            if reg is not None:
                objective = objective + reg  # a per-rank estimate (NoPeek's dCor needs the whole batch)
            if cem is not None:
                objective = objective + lam_eff * cem_value
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        (objective if ddp else loss).backward()
        for opt in opts.values():
            opt.step()

        b = x.shape[0]
        count += b
        sums["loss"] += loss.detach() * b
        sums["ce"] += ce.detach() * b
        if reg is not None:
            sums["reg"] += reg.detach() * b
        if cem is not None:
            sums["cem"] += cem_value.detach() * b
        if "adv_ssim" in adv:
            sums["adv_ssim"] += adv["adv_ssim"] * b
        correct += (logits.argmax(1) == y).sum()
        zd = z.detach().reshape(b, -1).double()
        zsum = zd.sum(0) if zsum is None else zsum + zd.sum(0)
        zsq = (zd * zd).sum(0) if zsq is None else zsq + (zd * zd).sum(0)
        if keep_features:
            feats.append(z.detach())
            labels.append(y)
    if dist_ctx is not None and dist_ctx.enabled:
        packed = dist_ctx.sum_(torch.cat([torch.stack(list(sums.values())),
                                          torch.stack([correct.double(), torch.tensor(float(count), device=device,
                                                                                      dtype=torch.float64)]),
                                          zsum, zsq]))
        k = len(sums)
        sums = dict(zip(sums, packed[:k]))
        correct, count = packed[k], int(packed[k + 1])
        zsum, zsq = packed[k + 2:k + 2 + zsum.numel()], packed[k + 2 + zsum.numel():]
    mean = zsum / count
    row = {k: float(v) / count for k, v in sums.items()}
    row["train_acc"] = float(correct) / count
    row["feature_var"] = float((zsq / count - mean * mean).clamp_min(0).mean())
    if cem is None:
        row.pop("cem")
    if not defence.needs_unit_images:
        row.pop("adv_ssim")
    return row, feats, labels


def _param_dtype(model) -> torch.dtype:
    return next(model.encoder.parameters()).dtype


@torch.no_grad()
def collect_features(model, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' extra pass: clean features of the training set, encoder in eval mode."""
    model.eval()
    feats, labels = [], []
    for x, y in loader:
        feats.append(model.encoder(x.to(device, _param_dtype(model))))
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(model, defence, loader, device) -> float:
    """Test accuracy with the defence's perturbation on (as the authors validate)."""
    model.eval()
    defence.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    for x, y in loader:
        x, y = x.to(device, _param_dtype(model)), y.to(device)
        correct += (model.server(defence.perturb(model.encoder(x))).argmax(1) == y).sum()
        count += x.shape[0]
    return float(correct) / max(count, 1)


def _build_cem(cfg: dict, dataset_size: int, device, process_group=None):
    if not cfg["cem_enabled"]:
        return None
    from cem_fast import CEMLoss
    return CEMLoss(cfg["num_classes"], clusters_per_class=cfg["cem_clusters"], sigma=cfg["sigma"],
                   variant=cfg["cem_variant"], covariance=cfg["cem_covariance"], dataset_size=dataset_size,
                   backend=cfg["cem_backend"], warmup="zero", seed=cfg["seed"],
                   process_group=process_group).to(device)


def _check_resume_config(old: dict, new: dict) -> None:
    old, new = ({"dtype": "float32", **c} for c in (old, new))  # runs from before --dtype existed
    diff = sorted(k for k in set(old) | set(new)
                  if k not in _RESUME_MAY_CHANGE and k not in _DERIVED and old.get(k) != new.get(k))
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ValueError(f"--resume with different settings than the run in its directory ({details})")


def run(cfg: dict, out: str | os.PathLike, *, resume: bool = False, stop_after_epoch: Optional[int] = None,
        on_epoch_end: Optional[Callable[[int, dict], None]] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Train as ``cfg`` says into run directory ``out``; returns the per-epoch metrics.

    ``stop_after_epoch`` stops right after that epoch's checkpoint (a simulated kill);
    ``on_epoch_end(epoch, row)`` is called after each checkpoint. Under torchrun (WORLD_SIZE > 1)
    it trains data-parallel (DDP; gloo on CPU) and only rank 0 writes files.
    """
    out = Path(out)
    device = torch.device(cfg["device"])
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    dist_ctx = Dist(device)
    if not dist_ctx.main:
        log = lambda *_: None  # noqa: E731
    ckpt_path = out / CHECKPOINT_FILE
    state = None
    if resume:
        if ckpt_path.is_file():
            state = load_checkpoint(ckpt_path, map_location=device)
        elif not (out / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT_FILE} in {out}")
        else:  # killed during its first epoch: nothing to keep but the settings, which are checked below
            log(f"--resume: {out} has no {CHECKPOINT_FILE} yet (stopped before the end of epoch 1); starting it over")
    elif (out / CONFIG_FILE).exists() or ckpt_path.exists():
        raise FileExistsError(f"{out} already holds a run; use --resume or another --out")
    dist_ctx.barrier()

    seed_everything(cfg["seed"])
    train_ds, plain_ds, test_ds = _load_data(cfg)
    cfg["train_size"], cfg["test_size"] = len(train_ds), len(test_ds)
    cfg["world_size"] = dist_ctx.world
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    model = build_model(cfg).to(device, dtype)
    defence = build_run_defence(cfg).to(device, dtype)
    if dist_ctx.enabled and (defence.needs_unit_images or defence.extra_client_layer):
        raise ValueError(f"--defense {cfg['defence']} (a simulated attacker / pruning) is not supported under "
                         "torchrun; train it in one process")
    setup_defence(defence, model, cfg, device)
    cfg["defence_resolved"] = defence.describe()
    if resume:
        _check_resume_config(json.loads((out / CONFIG_FILE).read_text()), cfg)
    elif dist_ctx.main:
        write_json_atomic(cfg, out / CONFIG_FILE)
    if state is not None:
        load_model_state(model, state["model"])  # may resize a pruned encoder first
        defence.load_state_dict(state["defence"])
    net = _Net(model, dist_ctx, device)

    def sgd(params):
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    opts = {"client": sgd(model.encoder.parameters()), "server": sgd(model.server.parameters())}
    factor = LRFactor(cfg["lr_schedule"], cfg["epochs"], cfg["authors_warmup_bug"])
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in opts.items()}
    n = len(train_ds)
    bs = cfg["batch_size"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    drop_last = n > bs and n % bs == 1  # a 1-sample batch breaks train-mode BN
    per_epoch = n - (n % bs if drop_last else 0)
    if dist_ctx.enabled:
        # --batch-size is the global batch: each rank takes its slice of the 1-process loader's batch
        # (same generator, same permutation), so the ranks together train on exactly its batches.
        if bs % dist_ctx.world:
            raise ValueError(f"--batch-size {bs} (the global batch) must be divisible by the number of "
                             f"processes ({dist_ctx.world})")
        if 0 < per_epoch % bs < dist_ctx.world:
            raise ValueError(f"the last batch ({per_epoch % bs} rows) cannot be split over {dist_ctx.world} "
                             "processes: change --batch-size or --train-subset")
        batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(train_ds, generator=gen), bs,
                                                drop_last)
        sampler = GlobalBatchShard(batches, dist_ctx.rank, dist_ctx.world)
        loader = DataLoader(train_ds, batch_sampler=sampler, generator=gen, num_workers=cfg["workers"],
                            pin_memory=device.type == "cuda")
    else:
        sampler = None
        loader = DataLoader(train_ds, batch_size=bs, shuffle=True, generator=gen, drop_last=drop_last,
                            num_workers=cfg["workers"], pin_memory=device.type == "cuda")
    cem = _build_cem(cfg, per_epoch, device, process_group=dist_ctx.group)
    test_loader = DataLoader(test_ds, batch_size=cfg["eval_batch_size"], shuffle=False, num_workers=cfg["workers"])
    metrics: list[dict] = []
    start = 1
    if state is not None:
        for k in opts:
            opts[k].load_state_dict(state["optimizers"][k])
            scheds[k].load_state_dict(state["schedulers"][k])
        if cem is not None:
            cem.load_state_dict(state["cem"])
        gen.set_state(state["loader_generator"])
        if len(state["rng"]) != dist_ctx.world:
            raise ValueError(f"the checkpoint was written by {len(state['rng'])} process(es), not {dist_ctx.world}")
        _set_rng_state(state["rng"][dist_ctx.rank])
        metrics = list(state["metrics"])
        start = state["epoch"] + 1
        if dist_ctx.main:
            _write_metrics(out, metrics)  # drop lines of an epoch that never reached its checkpoint
        log(f"resuming {out} at epoch {start}/{cfg['epochs']}")
    else:
        if dist_ctx.main:
            _write_metrics(out, [])
        if dist_ctx.enabled:
            torch.manual_seed(cfg["seed"] + 7919 * dist_ctx.rank)  # per-rank noise / augmentation streams
        pre_loader = _pretrain_loader(defence, cfg, plain_ds)
        if pre_loader is not None:
            logs = defence.pretrain(model.encoder, pre_loader, device=device, progress=cfg["progress"],
                                    denormalize=lambda x: denormalize(x, cfg["dataset"]))
            if logs:
                log(f"defence pretraining: {logs}")

    for epoch in range(start, cfg["epochs"] + 1):
        t0 = time.time()
        if defence.on_epoch_start(epoch, model, opts):
            _repoint_client_optimizer(opts["client"], model.encoder)
            log(f"epoch {epoch}: {cfg['defence']} changed the encoder "
                f"({sum(p.numel() for p in model.encoder.parameters())} parameters now)")
        lr_client = opts["client"].param_groups[0]["lr"]
        lr_server = opts["server"].param_groups[0]["lr"]
        lam_eff = cem_weight(cfg["cem_schedule"], cfg["cem_lambda"], lr_server) if cem is not None else 0.0
        row, feats, labels = train_epoch(epoch, net, defence, cem, loader, opts, cfg, device, lam_eff, dist_ctx)
        if cem is not None:
            if cfg["cem_refit"] == "extra-pass":
                # Under DDP each rank encodes a contiguous part; gathered in rank order = dataset order.
                part = range(dist_ctx.rank * n // dist_ctx.world, (dist_ctx.rank + 1) * n // dist_ctx.world)
                extra = DataLoader(Subset(train_ds, part) if dist_ctx.enabled else train_ds,
                                   batch_size=cfg["eval_batch_size"])
                f_all, y_all = collect_features(model, extra, device)
                f_all, y_all = dist_ctx.gather_rows(f_all), dist_ctx.gather_rows(y_all)
            else:
                f_all, y_all = torch.cat(feats), torch.cat(labels)
                if dist_ctx.enabled:  # every rank's features, in the 1-process epoch order (k-means++ depends on it)
                    pos = dist_ctx.gather_rows(torch.tensor(sampler.positions, dtype=torch.int64, device=device))
                    order = torch.argsort(pos)
                    f_all, y_all = dist_ctx.gather_rows(f_all)[order], dist_ctx.gather_rows(y_all)[order]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # our own collapse check below says it once
                cem.refit(f_all, y_all, gather=False)  # under DDP the features are already every rank's
            del feats, labels, f_all, y_all
        row["test_acc"] = evaluate(model, defence, test_loader, device)
        for sch in scheds.values():
            sch.step()
        row = {"epoch": epoch, **row, "lr": lr_client, "lr_server": lr_server,
               "lambda_eff": lam_eff, "cem_fitted": bool(cem is not None and cem.fitted),
               "time_s": time.time() - t0}
        metrics.append(row)
        rng = dist_ctx.gather_objects(_rng_state())
        if dist_ctx.main:
            _append_metrics(out, row)
            save_atomic({"epoch": epoch, "model": model.state_dict(),
                         "optimizers": {k: o.state_dict() for k, o in opts.items()},
                         "schedulers": {k: sch.state_dict() for k, sch in scheds.items()},
                         "cem": None if cem is None else cem.state_dict(), "defence": defence.state_dict(),
                         "rng": rng, "loader_generator": gen.get_state(), "metrics": metrics,
                         "config": cfg}, ckpt_path)
        dist_ctx.barrier()
        cem_txt = f" cem {row['cem']:.4f} (x{lam_eff:g})" if "cem" in row else ""
        log(f"epoch {epoch}/{cfg['epochs']}: loss {row['loss']:.4f} ce {row['ce']:.4f}{cem_txt} "
            f"train acc {row['train_acc']:.3f} test acc {row['test_acc']:.3f} lr {lr_client:.3g} "
            f"feat var {row['feature_var']:.3g} ({row['time_s']:.1f}s)")
        if dist_ctx.main:
            _check_collapse(row, cfg)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < cfg["epochs"]:
            log(f"stopping after epoch {epoch} (--stop-after-epoch); continue with --resume")
            return metrics

    if dist_ctx.main:
        save_atomic({"model": model.state_dict(), "defence": defence.state_dict(),
                     "cem": None if cem is None else cem.state_dict(), "metrics": metrics, "config": cfg,
                     "epoch": cfg["epochs"]}, out / FINAL_FILE)
    dist_ctx.barrier()
    log(f"done: {out / FINAL_FILE}")
    return metrics


def _pretrain_loader(defence, cfg, plain_ds):
    if not any(getattr(p, "pretrain_epochs", 0) for p in _parts(defence)):
        return None
    if getattr(defence, "pretrain_split", "train") == "test":
        test = load_dataset(cfg["dataset"], "test", data_root=cfg["data_root"], augment=False)
        ds = Subset(test, range(int(0.9 * len(test))))  # the authors: the first 90 % of the test split
    else:
        ds = plain_ds
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    return DataLoader(ds, batch_size=cfg["batch_size"], shuffle=True, generator=gen, num_workers=cfg["workers"])


def _parts(defence):
    return list(defence.parts) if hasattr(defence, "parts") else [defence]


def _write_metrics(out: Path, metrics: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in metrics)
    tmp = out / (METRICS_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out / METRICS_FILE)


def _append_metrics(out: Path, row: dict) -> None:
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point (``python -m reproduce.train``); returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ValueError as e:
        parser.error(str(e))
    cfg["command"] = " ".join(["python -m reproduce.train", *argv])
    if args.resume:
        # The stored config is authoritative; a flag given now must agree with it.
        path = Path(args.out) / CONFIG_FILE
        if not path.is_file():
            parser.error(f"--resume: no {CONFIG_FILE} in {args.out}")
        stored = {"dtype": "float32", **json.loads(path.read_text())}  # runs from before --dtype existed
        given = {k for k, v in vars(args).items() if v is not None and k in stored}
        clash = sorted(k for k in given - _RESUME_MAY_CHANGE if stored[k] != cfg[k])
        if clash:
            parser.error("--resume with settings that differ from the stored run: "
                         + ", ".join(f"{k} {stored[k]!r} (stored) vs {cfg[k]!r}" for k in clash))
        cfg = {**stored, **{k: cfg[k] for k in _RESUME_MAY_CHANGE if k in cfg and (k in given or k not in stored)}}
    run(cfg, args.out, resume=args.resume, stop_after_epoch=args.stop_after_epoch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
