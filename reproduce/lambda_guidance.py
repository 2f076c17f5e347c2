"""Accuracy and the audit's worst-case attacker MSE across the CEM weight, on the shipped CIFAR-10 sample.

    python -m reproduce.lambda_guidance [--out reproduce/results/lambda_guidance.json]

A user's loop as in docs/training-loop.md: a small encoder (Conv-BN-ReLU-Pool-Conv-Sigmoid, 8 x 16 x 16
features), 2,000 training images of the sample, 4 epochs of SGD (lr 0.05, momentum 0.9, batch 64), Gaussian
noise sigma 0.025, `CEMLoss(weight=lambda, feature_bank=5000)` + `end_epoch()`, for the `paper` and
`official-trained` variants, then `cem_fast.audit` (decoder, whitebox, adaptive at the smoke preset) on 500 test
images. One seed: a guide to the order of magnitude, not a result. The SNR column is the last refit's.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cem_fast import CEMLoss
from cem_fast.audit import audit
from reproduce.data import SAMPLE_PATH

LAMBDAS = (0.0, 1.0, 4.0, 16.0, 64.0)
VARIANTS = ("paper", "official-trained")


def load_sample(split: str, n: int):
    from PIL import Image

    d = np.load(SAMPLE_PATH)
    data, off = d["train_jpeg_bytes" if split == "train" else "test_png_bytes"], d[f"{split}_offsets"]
    x = np.stack(
        [np.asarray(Image.open(io.BytesIO(data[off[i] : off[i + 1]].tobytes())).convert("RGB")) for i in range(n)]
    )
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(d[f"{split}_y"][:n])


def models(seed: int):
    torch.manual_seed(seed)
    enc = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 8, 3, padding=1),
        nn.Sigmoid(),
    )
    head = nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10)
    )
    return enc, head


def one_run(variant: str, lam: float, train, test, epochs: int = 4, seed: int = 0) -> dict:
    (x, y), (xt, yt) = train, test
    enc, head = models(seed)
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    cem = CEMLoss(10, variant=variant, weight=lam, feature_bank=5000) if lam > 0 else None
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for s in range(0, x.shape[0], 64):
            i = perm[s : s + 64]
            z = enc(x[i])
            loss = F.cross_entropy(head(z + 0.025 * torch.randn(z.shape, generator=gen)), y[i])
            if cem is not None:
                loss = loss + cem(z, y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if cem is not None:
            cem.end_epoch()
    train_s = time.perf_counter() - started
    enc.eval(), head.eval()
    report = audit(enc, (x, y), test_data=(xt, yt), sigma=0.025, head=head, preset="smoke", seed=seed)
    worst = report.worst
    return {
        "variant": variant,
        "lambda": lam,
        "test_acc": report.accuracy["accuracy"],
        "worst_mse": worst["mse"],
        "worst_attack": worst["mse_attack"],
        "worst_ssim": worst["ssim"],
        "decoder_mse": report.attacks["decoder"]["mse"],
        "snr": None if cem is None else cem.last_snr,
        "train_s": train_s,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reproduce/results/lambda_guidance.json")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = load_sample("train", 2000), load_sample("test", 500)
    rows = []
    for variant in VARIANTS:
        for lam in LAMBDAS:
            if lam == 0 and variant != VARIANTS[0]:
                continue  # lambda 0 builds no CEM: one baseline for both variants
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                rows.append(one_run(variant, lam, train, test))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"protocol": __doc__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
