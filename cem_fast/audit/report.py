"""The audit's report: per-attack results, the worst case over the ladder, and the theory beside it.

``AuditReport.write(DIR)`` writes ``report.json``, ``report.md`` and ``reconstructions.png`` (test images
above each attack's reconstructions of them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["AuditReport", "worst_case", "theory_section", "REPORT_FILES"]

REPORT_FILES = {"json": "report.json", "markdown": "report.md", "figure": "reconstructions.png"}


def worst_case(records: dict) -> dict:
    """The strongest attack on each metric: lowest MSE (and its PSNR), highest SSIM."""
    if not records:
        return {}
    by_mse = min(records, key=lambda a: records[a]["mse"])
    by_ssim = max(records, key=lambda a: records[a]["ssim"])
    return {
        "mse": records[by_mse]["mse"],
        "mse_attack": by_mse,
        "psnr": records[by_mse]["psnr"],
        "ssim": records[by_ssim]["ssim"],
        "ssim_attack": by_ssim,
    }


def theory_section(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    sigma: Optional[float],
    *,
    d: int,
    h_x: Optional[float],
    clusters_per_class: int,
    fit: Callable,
) -> dict:
    """Eq. 3's bound (from a CEM state fitted on the clean features) and Theorem 1's floor for the stated H(x)."""
    from cem_fast import mse_lower_bound

    if sigma is None or sigma <= 0:
        why = "the perturbation is not Gaussian noise of a stated sigma" if sigma is None else "sigma is 0"
        return {"eq3_bound_nats": None, "note": f"Eq. 3 needs Gaussian noise with sigma > 0 ({why}): no bound"}
    cem = fit(features, labels, num_classes, clusters_per_class, sigma)
    bound = float(cem.entropy_bound())
    out = {
        "eq3_bound_nats": bound,
        "clusters_per_class": clusters_per_class,
        "n_fitted": int(features.shape[0]),
        "d": d,
        "note": (
            "Eq. 3: H(x | z~) >= H(x) + eq3_bound_nats, from CEM's per-class k-means of the clean "
            "features. Theorem 1 turns it into a floor on every attacker's per-pixel MSE, "
            "exp(2 (H(x) + bound) / d) / (2 pi e); H(x) of real images is unknown, so the floor "
            "depends entirely on the H(x) you state: it is not a measurement."
        ),
    }
    if h_x is not None:
        out["theorem1"] = {"h_x_nats": float(h_x), "mse_floor": mse_lower_bound(float(h_x) + bound, d)}
    out["theorem1_floor_by_h_x_per_dim"] = {f"{h:g}": mse_lower_bound(h * d + bound, d) for h in (-4.0, -3.0, -2.0)}
    return out


@dataclass
class AuditReport:
    """What :func:`cem_fast.audit.audit` returns. ``to_dict()`` is report.json's content."""

    results: dict
    requested: tuple
    setup: dict
    theory: dict
    accuracy: Optional[dict] = None
    display: dict = field(default_factory=dict)

    @property
    def attacks(self) -> dict:
        return {name: r.record() for name, r in self.results.items()}

    @property
    def worst(self) -> dict:
        return worst_case(self.attacks)

    def to_dict(self) -> dict:
        return {
            "attacks": self.attacks,
            "worst": self.worst,
            "task": self.accuracy,
            "theory": self.theory,
            "setup": self.setup,
        }

    def write(self, out_dir) -> dict:
        """Write report.json, report.md and reconstructions.png into ``out_dir``; return their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {key: out / name for key, name in REPORT_FILES.items()}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n")
        paths["markdown"].write_text(self.markdown())
        self.figure(paths["figure"])
        return paths

    def markdown(self) -> str:
        s, w = self.setup, self.worst
        lines = [
            "# Privacy audit",
            "",
            f"Preset `{s['preset']}`, noise sigma {s['sigma']}, {s['attacker_images']} attacker images, "
            f"{s['scored_images']} scored ({s['split']}), features {s['feature_shape']}, "
            f"images {s['image_shape']}, {s['wall_time_s']:.0f} s.",
            "",
        ]
        if w:
            lines += [
                f"**Worst case over the ladder: MSE {w['mse']:.4f} (PSNR {w['psnr']:.2f} dB, "
                f"`{w['mse_attack']}`), SSIM {w['ssim']:.3f} (`{w['ssim_attack']}`).** "
                "Lower MSE / higher SSIM = more leakage.",
                "",
            ]
        if self.accuracy:
            lines += [
                f"Task accuracy of the server head on the perturbed features: {self.accuracy['accuracy']:.2%} "
                f"(clean features: {self.accuracy['accuracy_clean_features']:.2%}). A private-looking encoder "
                f"at chance accuracy protects nothing worth having.",
                "",
            ]
        lines += [
            "| attack | MSE | PSNR (dB) | SSIM | scored | epochs (best) | wall (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in self.attacks.items():
            lines.append(
                f"| {name} | {r['mse']:.4f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['n_scored']} | "
                f"{r['epochs']} ({r['best_epoch']}) | {r['wall_time_s']:.1f} |"
            )
        lines += ["", "## Theory", ""]
        t = self.theory
        if t.get("eq3_bound_nats") is None:
            lines.append(t["note"])
        else:
            lines += [f"Eq. 3 bound: H(x | z~) >= H(x) + ({t['eq3_bound_nats']:.4g}) nats.", "", t["note"], ""]
            if "theorem1" in t:
                lines.append(
                    f"For the stated H(x) = {t['theorem1']['h_x_nats']:g} nats: MSE floor "
                    f"{t['theorem1']['mse_floor']:.4g}."
                )
            floors = ", ".join(f"H(x)/d = {h}: {v:.3g}" for h, v in t["theorem1_floor_by_h_x_per_dim"].items())
            lines.append(f"Floors for other H(x): {floors}.")
        return "\n".join(lines) + "\n"

    def figure(self, path) -> None:
        """Test images (top row) above each attack's reconstructions of them."""
        import matplotlib  # the `audit` extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [(name, imgs) for name, imgs in self.display.items() if len(imgs)]
        n = max(len(imgs) for _, imgs in rows)
        fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
        for r, (name, imgs) in enumerate(rows):
            for c in range(n):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(imgs):
                    img = imgs[c].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
                    gray = img.shape[-1] == 1
                    ax.imshow(img.squeeze(-1) if gray else img, cmap="gray" if gray else None)
                if c == 0:
                    ax.set_ylabel(name, fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
