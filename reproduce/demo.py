"""`make demo`: CEM against the decoder inversion attack on the shipped real CIFAR-10 sample.

Two arms of split VGG11-BN (cut 4, noRELU_C8S1 bottleneck, Sigmoid at the cut; cosine LR, which suits a
run of a few epochs), both with Gaussian noise sigma 0.025 before the server: without CEM (lambda 0) and
with CEM (paper variant, lambda 16, clusters refit every epoch). Then the decoder inversion attack (8
residual blocks, 64 channels) on each, in the training-time and inference-time settings. Prints the
comparison table, writes it as ``OUT/results.md`` and a PNG grid of originals and reconstructions
(``OUT/reconstructions.png``). Rerunning resumes: finished runs and attacks are reused.

It is a small run (minutes on 2 CPU cores), not the paper's protocol: reproduce/RESULTS.md has
the recorded larger runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from reproduce import pipeline
from reproduce.machine import default_device
from reproduce.rundir import RunDir

ARMS = (("noise", 0.0), ("noise+CEM", 16.0))
SETTINGS = ("train_time", "infer_time")


def _train(run: Path, lam: float, args) -> RunDir:
    rd = RunDir(run)
    if rd.finished:
        print(f"[demo] {run.name}: finished run found, reusing it")
        return rd
    settings = {
        "dataset": "cifar10-sample",
        "defence": "noise",
        "sigma": 0.025,
        "cem_lambda": lam,
        "epochs": args.epochs,
        "train_subset": args.train_images,
        "test_subset": args.test_images,
        "seed": args.seed,
        "cem_backend": args.cem_backend,
        "lr_schedule": "cosine",
    }
    return pipeline.ensure_trained(rd, preset="cpu", overrides=settings, device=args.device)


def _attack(rd: RunDir, args) -> dict:
    if not rd.missing_settings("decoder", SETTINGS):
        print(f"[demo] {rd.path.name}: decoder attack found, reusing it")
    overrides = {
        "epochs": args.attack_epochs,
        "max_train_images": args.attack_images,
        "batch_size": args.attack_batch_size,
        "seed": args.seed,
    }
    return pipeline.ensure_attacked(
        rd, "decoder", SETTINGS, preset="cpu", device=args.device or default_device(), overrides=overrides
    )


def table(rows: list[dict]) -> str:
    head = (
        "| arm | CEM lambda | test acc (%) | train-time MSE | PSNR | SSIM | inference-time MSE | PSNR | SSIM |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        tt, it = r["train_time"], r["infer_time"]
        lines.append(
            f"| {r['arm']} | {r['lambda']:g} | {100 * r['acc']:.2f} | {tt['mse']:.4f} | {tt['psnr']:.2f} | "
            f"{tt['ssim']:.3f} | {it['mse']:.4f} | {it['psnr']:.2f} | {it['ssim']:.3f} |"
        )
    if len(rows) == 2:
        a, b = rows
        lines.append("")
        lines.append(
            f"CEM / no-CEM attacker MSE: train-time x{b['train_time']['mse'] / a['train_time']['mse']:.2f}, "
            f"inference-time x{b['infer_time']['mse'] / a['infer_time']['mse']:.2f}; "
            f"accuracy change {100 * (b['acc'] - a['acc']):+.2f} points (one seed, small scale: "
            f"reproduce/RESULTS.md has the recorded --preset cpu runs)."
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reproduce.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs per arm (default 6)")
    p.add_argument("--train-images", type=int, default=3000, help="training images (default 3000 of the sample's 5000)")
    p.add_argument("--test-images", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--attack-epochs", type=int, default=6, help="decoder attack epochs (default 6)")
    p.add_argument("--attack-images", type=int, default=2000, help="attacker's training images (default 2000)")
    p.add_argument(
        "--attack-batch-size",
        type=int,
        default=32,
        help="decoder attack batch (default 32: small data needs many steps; the paper uses 256)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cem-backend",
        default="torch",
        help="cem_fast backend (default torch: the loss is a negligible share of a VGG step, and the "
        "demo then needs no compiler; 'auto' picks the C++ kernels)",
    )
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    args = p.parse_args(argv)
    for flag in ("epochs", "train_images", "test_images", "attack_epochs", "attack_images", "attack_batch_size"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows = []
    for arm, lam in ARMS:
        run = out / ("noise_lambda0" if lam == 0 else f"noise_cem_lambda{lam:g}")
        print(f"[demo] === {arm}: training (lambda {lam:g}) ===", flush=True)
        rd = _train(run, lam, args)
        print(f"[demo] === {arm}: decoder inversion attack ===", flush=True)
        entries = _attack(rd, args)
        rows.append(
            {
                "arm": arm,
                "lambda": lam,
                "acc": rd.final_accuracy(),
                "run": str(run),
                **{s: entries[s]["metrics"] for s in SETTINGS},
            }
        )
    text = table(rows)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    from reproduce import figure

    figure.main(
        [
            "--figure",
            "5",
            "--runs",
            *[r["run"] for r in rows],
            "--out",
            str(out / "reconstructions.png"),
            "--setting",
            "infer_time",
        ]
    )
    print("\n" + text)
    print(
        f"\n[demo] table: {out / 'results.md'}  grid: {out / 'reconstructions.png'}  "
        f"({time.time() - start:.0f} s in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
