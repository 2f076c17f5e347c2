"""What makes a CPU training epoch of split VGG11-BN (cut 4, noRELU_C8S1, Sigmoid) faster.

    python bench/epoch_speed.py [--steps 20] [--warmup 3] [--batch 128] [--threads 2] [--rows a,b,...]
                                [--data-root DIR] [--out FILE]

Compute rows (one training step = encoder -> z (fp32) -> z + N(0, 0.025^2) -> server -> cross-entropy
-> backward -> SGD step of both halves, on one fixed batch):

* ``fp32``: the trainer's step today (NCHW, float32);
* ``channels_last``: model and batch in ``torch.channels_last``;
* ``bf16``: ``torch.autocast("cpu", bfloat16)`` around the encoder's conv stack and the server; the
  bottleneck conv + Sigmoid that make ``z``, the noise and the loss stay float32;
* ``channels_last+bf16``: both;
* ``compile``: ``torch.compile`` of the encoder and the server (inductor; compile time reported apart).

Each row trains its own copy of the same initial model. Timing interleaves the rows step by step
(order rotated every cycle) so that load changes on the shared machine hit all rows alike; the table
gives the median step time, the median of the per-cycle ratios to ``fp32`` (paired), and the projected
epoch at 50,000 images (391 steps) without evaluation.

Data rows (time to produce one normalised, augmented batch of 128 from uint8 images): ``per-image``
(the trainer's ``DataLoader`` over ``load_dataset``'s per-image PIL transform, crop + flip) and
``batched`` (``reproduce.data.augment.crop_flip_batch`` on a uint8 batch, then one fused normalisation).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from reproduce.models import build_split_model  # noqa: E402

SIGMA = 0.025
STEPS_PER_EPOCH_FULL = 391  # 50,000 / 128, rounded up
ROWS = ("fp32", "channels_last", "bf16", "channels_last+bf16", "compile")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


class Row:
    """One way of running the training step, with its own model copy and optimiser."""

    def __init__(self, name: str, model, x: torch.Tensor, y: torch.Tensor):
        self.name = name
        self.model = copy.deepcopy(model).train()
        self.cl = "channels_last" in name
        self.bf16 = "bf16" in name
        if self.cl:
            self.model = self.model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.x, self.y = x, y
        enc = self.model.encoder
        self.body, self.tail = enc.layers, torch.nn.Sequential(enc.bottleneck, enc.head)
        self.server = self.model.server
        self.compile_s = 0.0
        if name == "compile":
            self.body, self.tail, self.server = (torch.compile(m) for m in (self.body, self.tail, self.server))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.times: list[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            h = self.body(self.x)
        z = self.tail(h.float())  # z in float32 in every row
        zn = z + SIGMA * torch.randn_like(z)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.server(zn)
        loss = F.cross_entropy(logits.float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def time_compute(rows: list[str], steps: int, warmup: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = build_split_model("vgg11_bn", 10, 4, 32, bottleneck="noRELU_C8S1", sigmoid=True)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    built = [Row(r, model, x, y) for r in rows]
    for row in built:
        t0 = time.perf_counter()
        for _ in range(warmup):
            row.step()
        row.compile_s = time.perf_counter() - t0  # warm-up wall time (includes compilation for ``compile``)
    for cycle in range(steps):
        k = cycle % len(built)
        for row in built[k:] + built[:k]:
            row.times.append(row.step())
    base = built[0].times
    out = {}
    for row in built:
        med = statistics.median(row.times)
        paired = statistics.median(b / t for b, t in zip(base, row.times))
        out[row.name] = {
            "median_step_s": med,
            "speedup_vs_first_paired": paired,
            "epoch_full_s": med * STEPS_PER_EPOCH_FULL,
            "warmup_s": row.compile_s,
            "steps": len(row.times),
        }
    return out


def time_data(data_root, batch: int, batches: int) -> dict:
    from torch.utils.data import DataLoader, Subset

    from reproduce.data import load_dataset
    from reproduce.data.augment import crop_flip_batch, set_augmentation

    try:
        ds = load_dataset("cifar10", "train", data_root=data_root, augment=True)
        source = "cifar10"
    except (FileNotFoundError, OSError):
        ds = load_dataset("cifar10-sample", "train", augment=True)
        source = "cifar10-sample"
    set_augmentation(ds, "crop-flip")
    n = batch * batches
    loader = DataLoader(Subset(ds, range(n)), batch_size=batch, shuffle=True, num_workers=0)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    per_image = (time.perf_counter() - t0) / batches
    images, info = ds.images[:n], ds.info
    scale = (1.0 / (255.0 * torch.tensor(info.std))).view(1, -1, 1, 1)
    shift = (torch.tensor(info.mean) / torch.tensor(info.std)).view(1, -1, 1, 1)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in torch.randperm(n, generator=g).split(batch):
        xb = crop_flip_batch(images[i], 4, generator=g)
        torch.addcmul(-shift, xb.float(), scale)
    batched = (time.perf_counter() - t0) / batches
    return {
        "source": source,
        "per_image_batch_s": per_image,
        "batched_batch_s": batched,
        "per_image_epoch_full_s": per_image * STEPS_PER_EPOCH_FULL,
        "batched_epoch_full_s": batched * STEPS_PER_EPOCH_FULL,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (interleaved)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}, fp32 first")
    p.add_argument("--data-root", default=None, help="folder with cifar10_train_jpeg.npz (else the sample)")
    p.add_argument("--data-batches", type=int, default=20)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    rows = a.rows.split(",")
    bad = [r for r in rows if r not in ROWS]
    if bad or rows[0] != "fp32":
        p.error(f"--rows must start with fp32 and name rows of {ROWS}, got {a.rows!r}")
    torch.set_num_threads(a.threads)
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "threads": a.threads,
        "torch": torch.__version__,
        "batch": a.batch,
        "compute": time_compute(rows, a.steps, a.warmup, a.batch),
        "data": time_data(a.data_root, a.batch, a.data_batches),
    }
    print(f"{res['date']}  {res['cpu']}  threads {a.threads}  torch {res['torch']}  batch {a.batch}")
    print(f"{'row':22s} {'median step s':>14s} {'speed-up (paired)':>18s} {'epoch 50k s':>12s} {'warm-up s':>10s}")
    for name, r in res["compute"].items():
        print(
            f"{name:22s} {r['median_step_s']:14.3f} {r['speedup_vs_first_paired']:18.2f} "
            f"{r['epoch_full_s']:12.0f} {r['warmup_s']:10.1f}"
        )
    d = res["data"]
    print(
        f"data ({d['source']}): per-image {d['per_image_batch_s'] * 1e3:.1f} ms/batch "
        f"({d['per_image_epoch_full_s']:.0f} s/epoch), batched {d['batched_batch_s'] * 1e3:.1f} ms/batch "
        f"({d['batched_epoch_full_s']:.1f} s/epoch)"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
