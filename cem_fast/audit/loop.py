"""The skeleton every trained attack shares: split, resumable state, best epoch on held-out data, re-score.

An attack supplies its model and its epoch step (:class:`TrainedAttack`); :func:`train_attack` does the
rest: a seeded, class-stratified held-out part of the attacker's data picks the best epoch (with patience
and a max-epoch budget), every epoch is checkpointed atomically (a rerun resumes and replays exactly; once the
attack is finished its ``best.pt`` alone holds the selected weights and the record a rerun re-scores from),
the learning curve is kept, and the selected weights are scored once on the test data.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .data import FeatureSet, Perturbation, progress_bar, stratified_split
from .metrics import ReconstructionMeter

__all__ = [
    "LoopConfig",
    "TrainedAttack",
    "AttackState",
    "AttackResult",
    "train_attack",
    "seeded",
    "evaluate_reconstruction",
    "reconstruct",
    "eval_seed",
    "save_atomic",
    "load_resumable",
]

# Config fields added after attacks were checkpointed and recorded, with their defaults: at the default a field
# stays out of the protocol, so those checkpoints still resume and their records still compare.
LATER_FIELDS = {"bf16_autocast": False}

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"


def eval_seed(seed: int) -> int:
    """The noise seed every attack is scored under, so all attacks see the same noisy features."""
    return int(seed) * 1_000_003 + 999_331


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu"):
    """Run the block with the global RNGs seeded to ``seed``, restoring them afterwards.

    The defence's noise draws from the global RNG, so seeding it per epoch makes a resumed attack replay.
    """
    device = torch.device(device)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(int(seed))
        yield


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_resumable(path: Path, fmt: str, protocol: dict) -> Optional[dict]:
    """The checkpoint at ``path`` (None if absent) after checking its format and protocol.

    A checkpoint written under other hyper-parameters or data sizes cannot be continued faithfully
    (the LR schedule and splits differ), so that is an error.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != fmt:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path} is not a {fmt} checkpoint (found {found!r}); delete {path.parent} (or pass --fresh) to start over"
        )
    if state["protocol"] != protocol:
        raise ValueError(
            f"{path} was written with a different attack protocol; delete {path.parent} "
            f"(or pass --fresh) to restart.\n saved: {state['protocol']}\n now:   {protocol}"
        )
    return state


def _load_finished(path: Path, fmt: str, protocol: dict) -> Optional[dict]:
    """The ``best.pt`` of a finished attack (None if absent, or written before it held the finished record)."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "finished" not in saved:
        return None  # a best.pt without its record (an older version) resumes nothing: train again
    if saved.get("format") != fmt + "/best" or saved["protocol"] != protocol:
        raise ValueError(
            f"{path} was written with a different attack protocol (a finished {saved.get('format')!r}); delete "
            f"{path.parent} (or pass --fresh) to restart.\n saved: {saved['protocol']}\n now:   {protocol}"
        )
    return saved


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    data: FeatureSet,
    perturb: Perturbation,
    *,
    batch_size: int,
    device: str | torch.device,
    noise_seed: int,
    limit: Optional[int] = None,
) -> torch.Tensor:
    """Reconstructions in [0, 1] (on the CPU) of the first ``limit`` items of ``data`` (eval mode)."""
    n = len(data) if limit is None else min(limit, len(data))
    was_training = model.training
    model.eval()
    out = []
    try:
        with seeded(noise_seed, device):
            for start in range(0, n, batch_size):
                z = data.features[start : min(start + batch_size, n)].to(device)
                out.append(model(perturb(z)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else data.images[:0].clone()


@torch.no_grad()
def evaluate_reconstruction(
    model: nn.Module,
    data: FeatureSet,
    perturb: Perturbation,
    *,
    batch_size: int,
    device: str | torch.device,
    noise_seed: int,
) -> dict:
    """MSE / PSNR / SSIM of ``model(perturb(z))`` against the images, per image, under a fixed noise seed."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty FeatureSet")
    was_training = model.training
    model.eval()
    meter = ReconstructionMeter()
    try:
        with seeded(noise_seed, device):
            for start in range(0, len(data), batch_size):
                stop = min(start + batch_size, len(data))
                z = data.features[start:stop].to(device)
                meter.update(model(perturb(z)).float(), data.images[start:stop].to(device).float())
    finally:
        model.train(was_training)
    return meter.compute()


@dataclass(frozen=True)
class LoopConfig:
    """The budget and selection of a trained attack.

    ``max_epochs``: the epoch budget; ``patience``: stop after this many epochs without a better held-out
    MSE (None: never stop early); ``val_fraction``: the held-out part of the attacker's data.
    """

    max_epochs: int = 50
    patience: Optional[int] = 5
    val_fraction: float = 0.1
    seed: int = 0
    eval_batch_size: int = 256
    num_samples: int = 16

    def __post_init__(self) -> None:
        for name in ("max_epochs", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience <= 0):
            raise ValueError(f"patience must be None or a positive int, got {self.patience!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative int, got {self.num_samples!r}")


@dataclass
class AttackState:
    """What an attack trains: its modules, optimisers and schedulers (all checkpointed by name).

    ``inverter`` maps perturbed features to images; its weights are what the selection keeps.
    ``counters`` holds plain numbers an epoch step carries over (e.g. the GAN's critic steps).
    """

    inverter: nn.Module
    modules: dict = field(default_factory=dict)
    optimizers: dict = field(default_factory=dict)
    schedulers: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {
            "inverter": self.inverter.state_dict(),
            **{f"module.{k}": m.state_dict() for k, m in self.modules.items()},
            **{f"optimizer.{k}": o.state_dict() for k, o in self.optimizers.items()},
            **{f"scheduler.{k}": s.state_dict() for k, s in self.schedulers.items()},
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        self.inverter.load_state_dict(state["inverter"])
        for prefix, group in (("module", self.modules), ("optimizer", self.optimizers), ("scheduler", self.schedulers)):
            for k, obj in group.items():
                obj.load_state_dict(state[f"{prefix}.{k}"])
        self.counters.update(state["counters"])


class TrainedAttack:
    """One trained attack: its name, its config, its model (``setup``) and its epoch step (``epoch``).

    ``select_initial``: the weights before the first epoch (a warm start) are a candidate of the
    selection, so the attack never ends worse on held-out data than the model it starts from.
    """

    name = "attack"
    select_initial = False
    seed_offset = 0

    def __init__(self, config):
        self.config = config

    def protocol(self) -> dict:
        """What a resumed checkpoint must match (the config plus whatever the model was started from)."""
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self.config).items()
            if k not in LATER_FIELDS or v != LATER_FIELDS[k]
        }

    def setup(self, fit: FeatureSet, device: torch.device) -> AttackState:
        raise NotImplementedError

    def epoch(
        self,
        state: AttackState,
        fit: FeatureSet,
        perturb: Perturbation,
        epoch: int,
        device: torch.device,
        progress: Optional[bool],
    ) -> dict:
        """Train one epoch (the global RNG is already seeded for it); return its statistics."""
        raise NotImplementedError

    def extra(self, state: AttackState) -> dict:
        """Numbers the record gets beside the metrics (e.g. the GAN's step counts)."""
        return {}


@dataclass
class AttackResult:
    """Outcome of one attack. ``model`` holds the selected weights; ``record()`` is its JSON form."""

    name: str
    model: nn.Module
    test_metrics: dict
    val_metrics: dict
    best_epoch: int
    epochs: int
    max_epochs: int
    history: list
    samples: dict
    sizes: dict
    train_class_counts: list
    scored_class_counts: list
    wall_time_s: float
    config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {
            "mse": self.test_metrics["mse"],
            "psnr": self.test_metrics["psnr"],
            "ssim": self.test_metrics["ssim"],
            "n_scored": self.test_metrics["n_images"],
            "metrics": self.test_metrics,
            "val_metrics": self.val_metrics,
            "best_epoch": self.best_epoch,
            "epochs": self.epochs,
            "max_epochs": self.max_epochs,
            "sizes": self.sizes,
            "train_class_counts": self.train_class_counts,
            "scored_class_counts": self.scored_class_counts,
            "wall_time_s": self.wall_time_s,
            "learning_curve": self.history,
            "config": self.config,
            **self.extra,
        }


def _split(
    train: FeatureSet, test: FeatureSet, val_fraction: float, seed: int, device: torch.device
) -> tuple[FeatureSet, FeatureSet]:
    if not isinstance(train, FeatureSet) or not isinstance(test, FeatureSet):
        raise TypeError("train and test must be FeatureSets")
    if train.feature_shape != test.feature_shape or train.image_shape != test.image_shape:
        raise ValueError(
            f"train and test have different feature or image shapes: {train.feature_shape} / "
            f"{train.image_shape} vs {test.feature_shape} / {test.image_shape}"
        )
    if len(test) == 0:
        raise ValueError("the test data is empty")
    fit_idx, val_idx = stratified_split(train.labels, val_fraction, seed)
    fit, val = train.subset(fit_idx), train.subset(val_idx)
    if device.type != "cpu":
        fit, val = fit.to(device), val.to(device)
    return fit, val


def train_attack(
    attack: TrainedAttack,
    train: FeatureSet,
    test: FeatureSet,
    perturb: Perturbation,
    loop: LoopConfig = LoopConfig(),
    *,
    num_classes: Optional[int] = None,
    device: str | torch.device = "cpu",
    state_dir: str | os.PathLike | None = None,
    progress: Optional[bool] = None,
) -> AttackResult:
    """Train ``attack`` on ``train`` (a held-out part picks the epoch) and score it once on ``test``.

    With ``state_dir`` every epoch is checkpointed there and a rerun resumes (bit-identical on one
    device); the selected weights are saved as ``best.pt``, which once the attack is finished is all that
    stays (with the learning curve and counters: a rerun re-scores without training).
    """
    if not isinstance(attack, TrainedAttack):
        raise TypeError(f"attack must be a TrainedAttack, got {type(attack).__name__}")
    if not isinstance(loop, LoopConfig):
        raise TypeError(f"loop must be a LoopConfig, got {type(loop).__name__}")
    started = time.perf_counter()
    device = torch.device(device)
    fit, val = _split(train, test, loop.val_fraction, loop.seed, device)
    n_classes = num_classes or int(max(train.labels.max().item(), test.labels.max().item())) + 1
    protocol = {
        "attack": attack.protocol(),
        "loop": asdict(loop),
        "n_fit": len(fit),
        "n_val": len(val),
        "n_test": len(test),
        "feature_shape": list(fit.feature_shape),
        "image_shape": list(fit.image_shape),
    }
    fmt = f"cem_fast.audit.{attack.name}/v2"
    with seeded(loop.seed, device):
        state = attack.setup(fit, device)
    eval_kwargs = dict(batch_size=loop.eval_batch_size, device=device, noise_seed=eval_seed(loop.seed))

    start_epoch, history, prior_wall = 0, [], 0.0
    best_epoch, best_val, best_state, since_best = 0, float("inf"), None, 0
    ckpt_path = Path(state_dir) / CHECKPOINT_NAME if state_dir is not None else None
    best_path = Path(state_dir) / BEST_NAME if state_dir is not None else None
    saved = load_resumable(ckpt_path, fmt, protocol) if ckpt_path is not None else None
    done = _load_finished(best_path, fmt, protocol) if saved is None and best_path is not None else None
    if done is not None:  # a finished attack: best.pt holds all of it, nothing left to train
        saved = {**done["finished"], "best_epoch": done["best_epoch"], "best_state": done["state_dict"]}
        state.counters.update(saved["counters"])
    elif saved is not None:
        state.load_state_dict(saved["state"])
    if saved is not None:
        start_epoch, history, prior_wall = saved["epoch"], saved["history"], saved["wall_time_s"]
        best_epoch, best_val, best_state = saved["best_epoch"], saved["best_val_mse"], saved["best_state"]
        since_best = saved["since_best"]
    else:
        init_val = evaluate_reconstruction(state.inverter, val, perturb, **eval_kwargs)["mse"]
        history.append({"epoch": 0, "val_mse": init_val})
        if attack.select_initial:
            best_val, best_state = init_val, _copy_state(state.inverter)

    epochs = range(start_epoch + 1, loop.max_epochs + 1)
    finished = done is not None or (loop.patience is not None and since_best >= loop.patience)
    bar = progress_bar(epochs, f"{attack.name} attack", progress) if not finished else []
    for epoch in bar:
        lrs = {
            f"lr_{name}" if len(state.optimizers) > 1 else "lr": o.param_groups[0]["lr"]
            for name, o in state.optimizers.items()
        }
        with seeded(int(loop.seed) * 1_000_003 + attack.seed_offset + epoch, device):
            stats = attack.epoch(state, fit, perturb, epoch, device, progress)
        with warnings.catch_warnings():
            # An epoch may make no step of an optimiser (the GAN's generator); the schedule is per epoch all the same.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for scheduler in state.schedulers.values():
                scheduler.step()
        val_mse = evaluate_reconstruction(state.inverter, val, perturb, **eval_kwargs)["mse"]
        history.append({"epoch": epoch, **lrs, **stats, "val_mse": val_mse})
        if val_mse < best_val:
            best_epoch, best_val, best_state, since_best = epoch, val_mse, _copy_state(state.inverter), 0
        else:
            since_best += 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(val_mse=f"{val_mse:.4f}", best=best_epoch)
        if ckpt_path is not None:
            save_atomic(
                {
                    "format": fmt,
                    "protocol": protocol,
                    "epoch": epoch,
                    "state": state.state_dict(),
                    "history": history,
                    "best_epoch": best_epoch,
                    "best_val_mse": best_val,
                    "best_state": best_state,
                    "since_best": since_best,
                    "wall_time_s": prior_wall + time.perf_counter() - started,
                },
                ckpt_path,
            )
        if loop.patience is not None and since_best >= loop.patience:
            break
    if best_state is None:
        raise RuntimeError(f"{attack.name} attack finished without a finite held-out MSE")

    best = copy.deepcopy(state.inverter)
    best.load_state_dict(best_state)
    best.eval()
    if state_dir is not None:
        # Once finished, best.pt is the attack's whole state (the weights once, and what a rerun needs to re-score
        # without training); the per-epoch checkpoint, which holds optimisers and a second copy, goes.
        finished_record = {
            "epoch": history[-1]["epoch"],
            "history": history,
            "best_val_mse": best_val,
            "since_best": since_best,
            "counters": dict(state.counters),
            "wall_time_s": prior_wall + time.perf_counter() - started,
        }
        save_atomic(
            {
                "format": fmt + "/best",
                "state_dict": best_state,
                "best_epoch": best_epoch,
                "protocol": protocol,
                "finished": finished_record,
            },
            best_path,
        )
        ckpt_path.unlink(missing_ok=True)
    test_metrics = evaluate_reconstruction(best, test, perturb, **eval_kwargs)
    samples = {
        "original": test.images[: loop.num_samples].cpu(),
        "reconstruction": reconstruct(best, test, perturb, limit=loop.num_samples, **eval_kwargs),
    }
    return AttackResult(
        name=attack.name,
        model=best,
        test_metrics=test_metrics,
        val_metrics=evaluate_reconstruction(best, val, perturb, **eval_kwargs),
        best_epoch=best_epoch,
        epochs=history[-1]["epoch"],
        max_epochs=loop.max_epochs,
        history=history,
        samples=samples,
        sizes={"fit": len(fit), "val": len(val), "test": len(test)},
        train_class_counts=fit.class_counts(n_classes),
        scored_class_counts=test.class_counts(n_classes),
        wall_time_s=prior_wall + time.perf_counter() - started,
        config={**attack.protocol(), **asdict(loop)},
        extra=attack.extra(state),
    )


def _copy_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
