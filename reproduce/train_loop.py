"""One epoch of Algorithm 1, evaluation, the CEM refit's features, and the training run's small helpers.

``train_epoch`` is the step of ``reproduce.train`` (see its docstring for the step, top to bottom);
``evaluate`` is test accuracy with the defence's perturbation on; ``collect_features`` is the authors'
extra pass for the refit; ``check_collapse`` warns when the encoder's features collapse.
"""

from __future__ import annotations

import random
import sys
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from reproduce.data import denormalize
from reproduce.ddp import Dist
from reproduce.speed import to_batch_format


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def repoint_client_optimizer(opt: torch.optim.Optimizer, encoder: torch.nn.Module) -> None:
    """After pruning replaced encoder parameters: step the new ones, keep surviving momentum."""
    params = list(encoder.parameters())
    kept = {p: opt.state[p] for p in params if p in opt.state}
    opt.param_groups[0]["params"] = params
    opt.state.clear()
    opt.state.update(kept)


class Collapse(UserWarning):
    """The encoder's features collapsed or the accuracy is at chance."""


def check_collapse(row: dict, cfg: dict) -> None:
    sigma = cfg["sigma"]
    floor = 1e-3 * sigma**2 if sigma > 0 else 1e-8
    if row["feature_var"] < floor:
        warnings.warn(
            f"epoch {row['epoch']}: clean-feature variance {row['feature_var']:.3g} < {floor:.3g} "
            f"(1e-3 sigma^2): the encoder output is collapsing to a constant; lower --cem-lambda "
            f"or use --cem-schedule official",
            Collapse,
            stacklevel=2,
        )
    if row["epoch"] > 2 and row["train_acc"] <= 1.5 / cfg["num_classes"]:
        warnings.warn(
            f"epoch {row['epoch']}: training accuracy {row['train_acc']:.3f} is at chance (1/{cfg['num_classes']})",
            Collapse,
            stacklevel=2,
        )


def show_progress(cfg: dict) -> bool:
    """Progress bars only when asked for (``--no-progress`` not given) and stderr is a terminal."""
    return bool(cfg.get("progress")) and sys.stderr.isatty()


def _progress(iterable, cfg, desc):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=not show_progress(cfg))


def train_epoch(
    epoch, model, defence, cem, loader, opts, cfg, device, lam_eff, dist_ctx: Optional[Dist] = None
) -> tuple[dict, list, list]:
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
    for x, y in _progress(
        loader,
        cfg if dist_ctx is None or dist_ctx.main else {**cfg, "progress": False},
        f"epoch {epoch}/{cfg['epochs']}",
    ):
        x, y = x.to(device, _param_dtype(model), non_blocking=True), y.to(device, non_blocking=True)
        x = to_batch_format(x, cfg)  # channels_last when the run says so
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
        packed = dist_ctx.sum_(
            torch.cat(
                [
                    torch.stack(list(sums.values())),
                    torch.stack([correct.double(), torch.tensor(float(count), device=device, dtype=torch.float64)]),
                    zsum,
                    zsq,
                ]
            )
        )
        k = len(sums)
        sums = dict(zip(sums, packed[:k]))
        correct, count = packed[k], int(packed[k + 1])
        zsum, zsq = packed[k + 2 : k + 2 + zsum.numel()], packed[k + 2 + zsum.numel() :]
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


def build_cem(cfg: dict, dataset_size: int, device, process_group=None):
    if not cfg["cem_enabled"]:
        return None
    from cem_fast import CEMLoss

    return CEMLoss(
        cfg["num_classes"],
        clusters_per_class=cfg["cem_clusters"],
        sigma=cfg["sigma"],
        variant=cfg["cem_variant"],
        covariance=cfg["cem_covariance"],
        dataset_size=dataset_size,
        backend=cfg["cem_backend"],
        warmup="zero",
        seed=cfg["seed"],
        process_group=process_group,
    ).to(device)
