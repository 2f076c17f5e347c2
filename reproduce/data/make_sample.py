"""Build the shipped CIFAR-10 sample: ``python -m reproduce.data.make_sample --data-root DIR``.

DIR must hold the offline copies ``cifar10_train_jpeg.npz`` and ``cifar10_test.npz``. The sample
keeps the first ``--per-class`` train images of every class in canonical order (as their
original JPEG bytes) and canonical test images ``0..--num-test-1`` (as lossless PNG bytes of the
pixels in cifar10_test.npz).
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import SAMPLE_PATH


def _concat(parts: list[bytes | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    arrays = [np.frombuffer(bytes(p), dtype=np.uint8) for p in parts]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    return np.concatenate(arrays), offsets


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def make_sample(data_root: Path, out: Path = SAMPLE_PATH, per_class: int = 500, num_test: int = 1000) -> Path:
    """Write the sample npz (atomically) and return its path."""
    with np.load(data_root / "cifar10_train_jpeg.npz") as train:
        y, off, buf = train["y"], train["offsets"], train["jpeg_bytes"]
        canonical, class_names = train["canonical_index"], train["class_names"]
        picked = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(len(class_names))]))
        train_bytes, train_offsets = _concat([buf[off[i] : off[i + 1]] for i in picked])
        train_y, train_canonical = y[picked], canonical[picked]
    with np.load(data_root / "cifar10_test.npz") as test:
        x, y_test, canonical_test = test["x"], test["y"], test["canonical_index"]  # each read decompresses
    known = np.flatnonzero(canonical_test >= 0)
    rows = known[np.argsort(canonical_test[known])][:num_test]
    if not np.array_equal(canonical_test[rows], np.arange(num_test)):
        raise ValueError(f"cifar10_test.npz does not hold canonical test images 0..{num_test - 1}")
    test_bytes, test_offsets = _concat([_png(x[i]) for i in rows])
    test_y = y_test[rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        class_names=class_names,
        train_jpeg_bytes=train_bytes,
        train_offsets=train_offsets,
        train_y=train_y,
        train_canonical_index=train_canonical,
        test_png_bytes=test_bytes,
        test_offsets=test_offsets,
        test_y=test_y,
        test_canonical_index=np.arange(num_test, dtype=np.int64),
    )
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="folder with the cifar10 npz copies")
    parser.add_argument("--out", type=Path, default=SAMPLE_PATH)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=1000)
    args = parser.parse_args(argv)
    out = make_sample(args.data_root, args.out, args.per_class, args.num_test)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
