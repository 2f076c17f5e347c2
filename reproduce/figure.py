"""Paper figures from finished runs: ``python -m reproduce.figure --figure 3|4|5 --runs RUN... --out FILE.png``.

Figure 3 (attacker MSE against the conditional-entropy bound, with Theorem 1's floor) is
``reproduce.figure3``: it reads each run's ``bound.json`` (``python -m reproduce.bound``) and writes its
numbers beside the PNG (``--data-out``, default the PNG's name with ``.json``). Figure 4 (accuracy against
attacker MSE over a sigma / lambda sweep) is drawn by ``reproduce.figures_curves``.

Figure 5: a grid whose first row holds test images and every further row the
reconstructions an inversion attack made of them for one run (labelled with the
run's defence, lambda and the attack's test MSE). It reads the attack's samples and record
(``RunDir.attack_samples_path`` / ``attack_record_path``), written by ``python -m reproduce.attack``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from reproduce import figure3 as fig3
from reproduce import figures_curves
from reproduce.rundir import RunDir

FIGURES = (3, 4, 5)
ATTACKS = fig3.LADDER
SETTINGS = ("train_time", "infer_time")

__all__ = ["FIGURES", "run_label", "load_samples", "as_uint8", "figure5", "figure5_data", "build_parser", "main"]


def load_samples(run_dir: str | os.PathLike, attack: str = "decoder", setting: str = "train_time") -> dict:
    """``{"original": uint8 [n,C,H,W], "reconstruction": float [n,C,H,W], "header": dict, "metrics": dict}``."""
    rd = RunDir(run_dir)
    path = rd.attack_samples_path(attack)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m reproduce.attack --run {rd.path} --attack {attack}`")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if setting not in saved.get("settings", {}):
        raise ValueError(f"{path} has no {setting!r} samples (has {sorted(saved.get('settings', {}))})")
    metrics = rd.attack_entry(attack, setting).get("metrics", {})
    header = {k: v for k, v in saved.items() if k != "settings"}
    return {**saved["settings"][setting], "header": header, "metrics": metrics}


def run_label(header: dict, metrics: dict) -> str:
    """A short row label: defence, noise, CEM lambda and the attack's test MSE."""
    parts = [str(header.get("defence", "?"))]
    sigma = header.get("attack_noise_sigma")
    if sigma:
        parts.append(f"σ={sigma:g}")
    lam = header.get("cem_lambda")
    parts.append(f"λ={lam:g}" if isinstance(lam, (int, float)) else "λ=?")
    label = " ".join(parts)
    if "mse" in metrics:
        label += f"\nMSE {metrics['mse']:.4f}"
    return label


def _to_image(t: torch.Tensor):
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    t = t.clamp(0, 1)
    if t.shape[0] == 1:
        return t[0].numpy(), "gray"
    return t.permute(1, 2, 0).numpy(), None


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images on [0, 1] (or uint8 already) as uint8, the form records keep."""
    if images.dtype == torch.uint8:
        return images
    return images.float().clamp(0, 1).mul(255).round().to(torch.uint8)


def _figure5_rows(runs, attack, setting, num_images, labels) -> tuple[list[str], list[torch.Tensor]]:
    """Row labels and images (originals first, then one row per run) of Figure 5."""
    if not runs:
        raise ValueError("runs must name at least one run directory")
    if not isinstance(num_images, int) or num_images <= 0:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"labels has {len(labels)} entries for {len(runs)} runs")
    loaded = [load_samples(r, attack, setting) for r in runs]
    originals = loaded[0]["original"]
    n = min(num_images, *(len(s["reconstruction"]) for s in loaded))
    for run, s in zip(runs, loaded):
        if not torch.equal(s["original"][:n], originals[:n]):
            raise ValueError(
                f"{run} was attacked on other test images than {runs[0]}; attack both with the same data settings"
            )
    row_labels = ["original"] + [
        labels[i] if labels is not None else run_label(s["header"], s["metrics"]) for i, s in enumerate(loaded)
    ]
    return row_labels, [originals[:n]] + [s["reconstruction"][:n] for s in loaded]


def figure5_data(
    runs: Sequence[str | os.PathLike],
    *,
    attack: str = "decoder",
    setting: str = "train_time",
    num_images: int = 8,
    labels: Optional[Sequence[str]] = None,
    names: Optional[Sequence[str]] = None,
) -> dict:
    """What Figure 5 shows, JSON-ready: per row its label, run (``names`` or the paths), the attack's test MSE,
    and the SHA-256 of each image as uint8 (the images themselves stay in the runs' samples files)."""
    row_labels, rows = _figure5_rows(runs, attack, setting, num_images, labels)
    names = [str(r) for r in runs] if names is None else list(names)
    if len(names) != len(runs):
        raise ValueError(f"names has {len(names)} entries for {len(runs)} runs")
    mses = [RunDir(r).attack_metric(attack, setting, "mse") for r in runs]
    return {
        "figure": 5,
        "attack": attack,
        "setting": setting,
        "num_images": len(rows[0]),
        "rows": [
            {
                "run": run,
                "label": label,
                "mse": mse,
                "images_sha256": [hashlib.sha256(as_uint8(im).numpy().tobytes()).hexdigest() for im in images],
            }
            for run, label, mse, images in zip([None, *names], row_labels, [None, *mses], rows)
        ],
    }


def figure5(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    attack: str = "decoder",
    setting: str = "train_time",
    num_images: int = 8,
    labels: Optional[Sequence[str]] = None,
) -> Path:
    """Write the Figure 5 grid (originals, then one row of reconstructions per run) to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_labels, rows = _figure5_rows(runs, attack, setting, num_images, labels)
    n = len(rows[0])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n + 1.6, 1.25 * len(rows)), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        for c in range(n):
            ax = axes[r][c]
            image, cmap = _to_image(images[c])
            ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{attack} inversion ({setting.replace('_', ' ')})", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The one parser of ``python -m reproduce.figure``: every figure, every option (each says which figure)."""
    parser = argparse.ArgumentParser(prog="python -m reproduce.figure", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--figure",
        type=int,
        required=True,
        choices=FIGURES,
        help="3: attacker MSE vs the entropy bound; 4: accuracy vs attacker MSE; 5: originals and reconstructions",
    )
    parser.add_argument(
        "--runs", nargs="+", required=True, help="run directories (5: one row each; 3, 4: or folders holding them)"
    )
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument(
        "--attack",
        choices=fig3.ATTACK_CHOICES,
        default="decoder",
        help="the attack whose MSE is drawn (3 also takes worst: per run, the lowest MSE of its attacks)",
    )
    parser.add_argument("--setting", choices=SETTINGS, default="train_time")
    g5 = parser.add_argument_group("figure 5")
    g5.add_argument("--num-images", type=int, default=8, help="images per row (default 8)")
    g5.add_argument("--labels", nargs="+", default=None, help="row labels, one per run")
    g3 = parser.add_argument_group("figure 3")
    g3.add_argument(
        "--h-x",
        type=float,
        nargs="+",
        default=[],
        help="stated H(x) values (nats, summed over the input dimensions), one floor each",
    )
    g3.add_argument(
        "--no-derived-h-x",
        action="store_true",
        help="do not draw the floor for the runs' h_x_gaussian (the Gaussian upper bound on H(x))",
    )
    g3.add_argument("--data-out", default=None, help="the figure's numbers (JSON; default: --out with .json)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.attack == "worst" and args.figure != 3:
        parser.error("--attack worst applies to figure 3 only")
    try:
        if args.figure == 3:
            data = fig3.figure3_data(
                args.runs,
                attack=args.attack,
                setting=args.setting,
                h_x=args.h_x,
                derived_h_x=not args.no_derived_h_x,
            )
            out = fig3.figure3_plot(data, args.out)
            data_out = Path(args.data_out) if args.data_out else Path(out).with_suffix(".json")
            data_out.parent.mkdir(parents=True, exist_ok=True)
            data_out.write_text(json.dumps(data, indent=1) + "\n")
            print(fig3.caption(data))
            print(f"wrote {data_out}")
        elif args.figure == 4:
            out = figures_curves.figure4(args.runs, args.out, attack=args.attack, setting=args.setting)
        else:
            out = figure5(
                args.runs,
                args.out,
                attack=args.attack,
                setting=args.setting,
                num_images=args.num_images,
                labels=args.labels,
            )
    except (OSError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
