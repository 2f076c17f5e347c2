"""Images to audit on, by name or path: the shipped CIFAR-10 sample, ``.npz`` files, image folders.

Every loader returns images in [0, 1]; decoding (PIL) is imported only here, from the ``audit`` extra.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import torch

from .data import Normalization

__all__ = ["CIFAR10_NORMALIZATION", "load_named"]

CIFAR10_NORMALIZATION = Normalization((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))


def _sample_path() -> Path:
    """The CIFAR-10 sample the project ships (package data of ``reproduce``), found without importing it."""
    here = Path(__file__).resolve().parents[2] / "reproduce" / "data" / "sample" / "cifar10_sample.npz"
    if here.is_file():
        return here
    spec = importlib.util.find_spec("reproduce")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "sample" / "cifar10_sample.npz"
        if path.is_file():
            return path
    raise FileNotFoundError("the CIFAR-10 sample (reproduce/data/sample/cifar10_sample.npz) is not installed")


def _decode(buf: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    from PIL import Image  # the `audit` extra

    raw = buf.tobytes()
    images = [
        np.asarray(Image.open(io.BytesIO(raw[offsets[i] : offsets[i + 1]])).convert("RGB"))
        for i in range(len(offsets) - 1)
    ]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)


def _as_images(array: np.ndarray, what: str) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(array))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"{what} must hold images [N, H, W, C] or [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _load_npz(path: Path) -> dict:
    with np.load(path) as d:
        keys = set(d.files)
        if {"train_offsets", "test_offsets"} <= keys:  # the shipped sample's layout
            return {
                "train": (_decode(d["train_jpeg_bytes"], d["train_offsets"]), torch.from_numpy(d["train_y"])),
                "test": (_decode(d["test_png_bytes"], d["test_offsets"]), torch.from_numpy(d["test_y"])),
            }
        out = {}
        for split in ("train", "test"):
            for xk, yk in ((f"{split}_x", f"{split}_y"), (f"x_{split}", f"y_{split}")):
                if xk in keys:
                    out[split] = (_as_images(d[xk], f"{path}:{xk}"), torch.from_numpy(d[yk]) if yk in keys else None)
        for xk, yk in (("x", "y"), ("images", "labels")):
            if not out and xk in keys:
                out["train"] = (_as_images(d[xk], f"{path}:{xk}"), torch.from_numpy(d[yk]) if yk in keys else None)
        for bk in ("jpeg_bytes", "png_bytes"):
            if not out and bk in keys and "offsets" in keys:
                out["train"] = (_decode(d[bk], d["offsets"]), torch.from_numpy(d["y"]) if "y" in keys else None)
        if not out:
            raise ValueError(
                f"{path} holds none of the arrays x/y, images/labels, train_x/test_x, "
                f"jpeg_bytes/offsets: {sorted(keys)}"
            )
        if "canonical_index" in keys and set(out) == {"train"}:  # files stored out of order: restore it
            order = torch.from_numpy(np.argsort(d["canonical_index"], kind="stable"))
            x, y = out["train"]
            out["train"] = (x[order], y[order] if y is not None else None)
        return out


def _load_folder(path: Path) -> dict:
    from PIL import Image  # the `audit` extra

    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    files = [(f, k) for k, c in enumerate(classes) for f in sorted(c.iterdir()) if f.suffix.lower() in suffixes]
    if not classes:
        files = [(f, 0) for f in sorted(path.iterdir()) if f.suffix.lower() in suffixes]
    if not files:
        raise ValueError(f"{path} holds no images (.png/.jpg), neither directly nor in class folders")
    images = [np.asarray(Image.open(f).convert("RGB")) for f, _ in files]
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"the images in {path} have different sizes; resize them to one size first")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return {"train": (x, torch.tensor([k for _, k in files]) if classes else None)}


def load_named(name: str) -> dict:
    """Images in [0, 1] of a dataset name (``cifar10-sample``) or an ``.npz`` file / image folder path.

    Returns ``{"train": (x, y), "test": (x, y)?, "normalization": Normalization | None}``; without a test
    split the audit splits ``train`` itself (stratified, seeded).
    """
    if name == "cifar10-sample":
        return {**_load_npz(_sample_path()), "normalization": CIFAR10_NORMALIZATION}
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"--data {name}: no such file or folder (dataset names: cifar10-sample)")
    out = _load_npz(path) if path.is_file() else _load_folder(path)
    return {**out, "normalization": None}
