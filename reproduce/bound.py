"""Eq. 3's entropy bound of a finished run, estimated the same way for every run and stored as ``RUN/bound.json``.

    python -m reproduce.bound RUN_OR_FOLDER ... [--force] [--max-images N] [--device D] [--data-root DIR]

``estimate(run_dir)`` refits a fresh ``CEMLoss`` (variant ``paper``, diagonal covariances, the run's clusters per
class, the std of the Gaussian noise the attacker faces, torch backend, float64, eval mode) on the run's clean
training features: the trained encoder in eval mode, no augmentation, the run's own training subset (a
class-balanced, seed-0 subset of ``max_images`` of it when it is larger). Nothing of the CEM state the run trained
with is read, so runs with and without CEM, of any variant, get one estimator.

Units. ``bound`` is Eq. 3's lower bound on ``H(x|z) - H(x)``: ``-sum_k pi_k (-log pi_k + 1/2 log |Sigma_k +
sigma^2 I| / |sigma^2 I|)``, in nats summed over the D feature dimensions (``cem_fast.entropy_bound``). Theorem 1
turns ``H(x|z) >= H(x) + bound`` into a floor on the best attacker's per-pixel MSE, ``exp(2 (H(x) + bound) / d) /
(2 pi e)``, where ``H(x)`` is the differential entropy of the image in nats summed over its d = C x H x W pixel
values (in [0, 1]): ``reproduce.figure3`` draws it.

H(x) is unknown. The record carries one data-derived value, ``h_x_gaussian``: the Gaussian maximum-entropy upper
bound ``1/2 log det(2 pi e (Cov + q I))`` of the dequantised training images (``x + u``, ``u`` uniform over one
grey level, variance ``q = 1 / (12 * 255^2)``, which makes the 8-bit images a continuous variable with a full-rank
covariance), from a class-balanced seed-0 subset of ``h_x_images`` images of the dataset's training split (the same
for every run of one dataset). It is an upper bound on H(x), so the floor drawn with it can sit above the true one.
The attacker's MSE against ``x + u`` is its MSE against ``x`` plus ``q`` (``u`` is independent and zero-mean).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import warnings
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from reproduce.rundir import RunDir, find_runs

VERSION = 1  # of the estimator: bump when what estimate() computes changes
MAX_IMAGES = 10_000
H_X_IMAGES = 10_000
DEQUANTISATION_VARIANCE = 1.0 / (12 * 255**2)  # uniform noise over one 8-bit grey level, pixels in [0, 1]
SEED = 0  # k-means++ starts and the subsets

__all__ = [
    "VERSION",
    "DEQUANTISATION_VARIANCE",
    "NoNoiseError",
    "attacker_sigma",
    "gaussian_entropy",
    "dataset_h_x",
    "estimate",
    "write",
    "main",
]


class NoNoiseError(ValueError):
    """The run adds no Gaussian noise to the features: Eq. 3's bound needs sigma > 0."""


def attacker_sigma(config: dict) -> float:
    """Std of the Gaussian noise on the features the server (and the attacker) receives, from ``config.json``."""
    from reproduce.attacks import defence_noise_sigma
    from reproduce.runs import build_run_defence

    return defence_noise_sigma(build_run_defence(config))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def gaussian_entropy(samples: torch.Tensor, extra_variance: float = 0.0, chunk_rows: int = 2048) -> dict:
    """The Gaussian maximum-entropy bound of ``samples [N, ...]`` (flattened to ``[N, d]``), in float64.

    Returns ``{"h": 1/2 log det(2 pi e (S + extra_variance I)) (nats, total over d), "h_per_dim": h / d,
    "mean_variance": tr(S) / d, "gaussian_bias", "d", "n"}`` with ``S`` the unbiased sample covariance.
    ``gaussian_bias`` (None unless n > d) is how far ``1/2 log det(2 pi e S)`` falls below the population's on
    average for Gaussian samples, ``1/2 (sum_{i=1..d} psi((n - i) / 2) + d log(2 / (n - 1)))`` (< 0): about
    ``-d (d + 1) / (4 n)`` when d << n. ValueError when the covariance is singular (n <= d and
    ``extra_variance`` 0).
    """
    if not isinstance(samples, torch.Tensor) or samples.dim() < 2:
        raise ValueError("samples must be a tensor [N, ...] with one row per sample")
    if not isinstance(extra_variance, (int, float)) or extra_variance < 0:
        raise ValueError(f"extra_variance must be a number >= 0, got {extra_variance!r}")
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"samples must hold at least 2 rows, got {n}")
    mu = x.mean(0)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, n, chunk_rows):
        xc = x[s : s + chunk_rows] - mu
        cov.addmm_(xc.T, xc)
    cov /= n - 1
    mean_variance = float(cov.diagonal().mean())
    cov.diagonal().add_(float(extra_variance))
    chol, info = torch.linalg.cholesky_ex(cov)
    logdet = 2.0 * float(chol.diagonal().log().sum()) if int(info) == 0 else math.nan
    if not math.isfinite(logdet):
        raise ValueError(
            f"the sample covariance of {n} samples in {d} dimensions is singular: pass extra_variance > 0 "
            "or more samples"
        )
    h = 0.5 * (d * math.log(2 * math.pi * math.e) + logdet)
    bias = None
    if n > d:
        i = torch.arange(1, d + 1, dtype=torch.float64)
        bias = 0.5 * (float(torch.special.digamma((n - i) / 2).sum()) + d * math.log(2 / (n - 1)))
    return {"h": h, "h_per_dim": h / d, "mean_variance": mean_variance, "gaussian_bias": bias, "d": d, "n": n}


def _images01(dataset, indices: Sequence[int]) -> torch.Tensor:
    """The images ``indices`` of ``dataset`` in [0, 1] on the 8-bit grid, float64 ``[n, C, H, W]``."""
    from reproduce.data import denormalize

    idx = torch.as_tensor(list(indices), dtype=torch.long)
    if getattr(dataset, "images", None) is not None:  # held as uint8: exact
        return dataset.images[idx].to(torch.float64) / 255.0
    rows = [denormalize(dataset[int(i)][0], dataset.info.name) for i in idx]
    return torch.round(torch.stack(rows).to(torch.float64) * 255.0) / 255.0


@lru_cache(maxsize=4)
def dataset_h_x(dataset: str, data_root: Optional[str], n_images: int = H_X_IMAGES) -> dict:
    """``h_x_gaussian`` of a dataset's training split (see the module docstring), computed once per process.

    Returns ``{"h_x_gaussian", "h_x_gaussian_per_dim", "h_x_gaussian_bias", "h_x_images",
    "pixel_variance_mean", "dequantisation_variance"}``; ``pixel_variance_mean`` (``tr(Cov) / d``) is the MSE of
    predicting the mean image, what an attacker who learns nothing from z achieves; ``h_x_gaussian_bias`` is
    ``gaussian_entropy``'s ``gaussian_bias`` (the value is not corrected for it).
    """
    from reproduce.data import load_dataset, subset

    _positive_int("n_images", n_images)
    data = load_dataset(dataset, "train", data_root=data_root, augment=False)
    indices = range(len(data)) if len(data) <= n_images else subset(data, n_images, seed=SEED).indices
    g = gaussian_entropy(_images01(data, indices), extra_variance=DEQUANTISATION_VARIANCE)
    return {
        "h_x_gaussian": g["h"],
        "h_x_gaussian_per_dim": g["h_per_dim"],
        "h_x_gaussian_bias": g["gaussian_bias"],
        "h_x_images": g["n"],
        "pixel_variance_mean": g["mean_variance"],
        "dequantisation_variance": DEQUANTISATION_VARIANCE,
    }


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


@torch.no_grad()
def _features(model, dataset, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import DataLoader

    model.eval()
    dtype = next(model.encoder.parameters()).dtype
    feats, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        feats.append(model.encoder(x.to(device, dtype)).flatten(1).to(torch.float64).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def estimate(
    run_dir,
    *,
    max_images: int = MAX_IMAGES,
    h_x_images: int = H_X_IMAGES,
    device: str = "cpu",
    data_root: Optional[str] = None,
) -> dict:
    """Eq. 3's bound of the finished run ``run_dir`` and what it used (the content of ``bound.json``).

    ``data_root`` overrides the run's stored data folder. Raises :class:`NoNoiseError` (a ValueError) when the
    run adds no Gaussian noise to its features.
    """
    from cem_fast import CEMLoss, __version__
    from reproduce.data import subset
    from reproduce.runs import load_run
    from reproduce.train_data import load_data

    _positive_int("max_images", max_images)
    _positive_int("h_x_images", h_x_images)
    rd = RunDir(run_dir).check_finished()
    config = rd.read_config()
    sigma = attacker_sigma(config)
    if sigma <= 0:
        raise NoNoiseError(
            f"{rd.path}: the run adds no Gaussian noise to the features (defence {config.get('defence')!r}, "
            f"noise_on {config.get('noise_on')}): Eq. 3's bound needs sigma > 0"
        )
    cfg = dict(config)
    if data_root is not None:
        cfg["data_root"] = str(data_root)
    loaded = load_run(rd.path, device=device)
    _, plain, _ = load_data(cfg)  # the run's own training subset, without augmentation
    train_size = len(plain)
    if train_size > max_images:
        plain = subset(plain, max_images, seed=SEED)
    feats, labels = _features(loaded.model, plain, int(cfg.get("eval_batch_size", 256)), device)

    cem = CEMLoss(
        int(cfg["num_classes"]),
        clusters_per_class=cfg.get("cem_clusters"),
        sigma=sigma,
        variant="paper",
        covariance="diag",
        dataset_size=len(feats),
        backend="torch",
        seed=SEED,
    ).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        cem.refit(feats, labels)
        bound = float(cem.entropy_bound())
    pi = cem.pi.reshape(-1).to(torch.float64)
    mixture_entropy = float(-(pi[pi > 0] * pi[pi > 0].log()).sum())
    sizes = (pi * len(feats)).round()[pi > 0]
    var = feats.var(0, unbiased=False)
    h_x = dataset_h_x(cfg["dataset"], cfg.get("data_root"), h_x_images)
    return {
        "bound": bound,
        "bound_units": "nats, summed over the feature dimensions: Eq. 3's lower bound on H(x|z) - H(x)",
        "mixture_entropy": mixture_entropy,
        "log_det_term": -bound - mixture_entropy,
        "sigma": sigma,
        "feature_dim": int(feats.shape[1]),
        "input_dim": int(cfg["in_channels"]) * int(cfg["image_size"]) ** 2,
        "num_classes": cem.num_classes,
        "clusters_per_class": cem.m,
        "clusters_used": int((pi > 0).sum()),
        # a cluster of one image has variance 0 and adds nothing to the log-det term: the bound needs many
        # images per cluster
        "cluster_size": {"min": int(sizes.min()), "median": float(sizes.median()), "max": int(sizes.max())},
        "n_images": int(len(feats)),
        "train_size": train_size,
        "feature_variance": {
            "mean": float(var.mean()),
            "min": float(var.min()),
            "median": float(var.median()),
            "max": float(var.max()),
        },
        "snr": float(var.mean()) / sigma**2,
        "kmeans_iterations": cem.last_refit_iterations,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        **h_x,
        "estimator": {
            "version": VERSION,
            "variant": "paper",
            "covariance": "diag",
            "backend": "torch",
            "dtype": "float64",
            "encoder_mode": "eval",
            "augment": False,
            "seed": SEED,
            "max_images": max_images,
        },
        "code": {"cem_fast": __version__, "git_commit": _git_commit(), "torch": torch.__version__},
        "computed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write(run_dir, **options) -> dict:
    """``estimate(run_dir, **options)`` stored as ``RUN/bound.json`` (replacing one there); returns the record."""
    record = estimate(run_dir, **options)
    RunDir(run_dir).write_bound(record)
    return record


def ensure(run_dir, *, log: Callable[[str], None] = print, **options) -> Optional[dict]:
    """The run's ``bound.json``, computed first when missing; None (and a log line) when the run adds no noise."""
    rd = RunDir(run_dir)
    stored = rd.read_bound()
    if stored is not None:
        return stored
    if attacker_sigma(rd.read_config()) <= 0:
        log(f"[bound] {rd.path}: no bound (the run adds no noise to its features)")
        return None
    log(f"[bound] {rd.path}")
    return write(rd.path, **options)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reproduce.bound", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished run directories, or folders holding them")
    p.add_argument("--force", action="store_true", help="recompute runs that have a bound.json")
    p.add_argument("--max-images", type=int, default=MAX_IMAGES, help=f"training images (default {MAX_IMAGES:,})")
    p.add_argument(
        "--h-x-images", type=int, default=H_X_IMAGES, help=f"images for h_x_gaussian (default {H_X_IMAGES:,})"
    )
    p.add_argument("--device", default="cpu", help="device of the encoder pass (default cpu)")
    p.add_argument("--data-root", default=None, help="folder with the datasets (default: the run's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    runs = []
    for p in map(Path, args.runs):
        found = list(find_runs(p))
        if not found:
            print(f"[bound] {p}: not a run directory and holds none", file=sys.stderr)
            return 2
        runs += found
    failed = 0
    options = dict(max_images=args.max_images, h_x_images=args.h_x_images, device=args.device)
    for rd in dict.fromkeys(runs):
        if not rd.finished:
            print(f"[bound] skipping {rd.path}: {rd.status()}", file=sys.stderr)
            continue
        if rd.bound_path.is_file() and not args.force:
            print(f"[bound] {rd.path}: has {rd.BOUND} (--force recomputes it)", file=sys.stderr)
            continue
        try:
            record = write(rd, data_root=args.data_root, **options)
        except NoNoiseError as err:
            print(f"[bound] skipping {err}", file=sys.stderr)
            continue
        except (OSError, ValueError) as err:
            print(f"[bound] {rd.path}: {err}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"[bound] {rd.path}: bound {record['bound']:.4g} nats ({record['n_images']} images, SNR {record['snr']:.3g})"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
