"""How much faster the decoder attack trains under bf16 autocast on this CPU.

    python bench/attack_speed.py [--threads 2] [--batch 64] [--cycles 20] [--warmup 3] [--out FILE]

One training step of the inversion decoder of the ``cpu`` attack preset (``cem_fast.audit``'s ResDecoder, 8
blocks of 64 channels, features 8x8x8 -> 32x32 RGB images, Adam, MSE): one call of
``train_decoder_epoch`` (``cem_fast.audit.decoder``) over one fixed batch, without noise. Rows: ``fp32`` (the default) and ``bf16``
(``DecoderConfig(bf16_autocast=True)``: autocast, channels_last weights). The rows' steps interleave, the
order alternating each cycle, so a change of load hits both alike. Reported per row: the median wall time of
a step, and the median over cycles of ``fp32 step / bf16 step`` (the speed-up, paired). Whether the faster
decoder attacks as well is a separate question: ``docs/audit.md`` says how that was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.harness import machine  # noqa: E402
from cem_fast.audit.data import FeatureSet  # noqa: E402
from cem_fast.audit.decoder import (  # noqa: E402
    DecoderConfig,
    bf16_autocast_available,
    prepare_for_bf16,
    train_decoder_epoch,
)
from cem_fast.audit.nets import build_decoder  # noqa: E402


def _row(bf16: bool, batch: int):
    """A function that runs one training step (``train_decoder_epoch`` over one batch) and returns its seconds."""
    c = DecoderConfig()
    torch.manual_seed(0)
    model = build_decoder((8, 8, 8), (3, 32, 32), c.num_blocks, c.width)
    if bf16:
        model = prepare_for_bf16(model, "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    batch_set = FeatureSet(
        torch.rand(batch, 8, 8, 8), torch.rand(batch, 3, 32, 32), torch.zeros(batch, dtype=torch.long)
    )

    def step() -> float:
        start = time.perf_counter()
        train_decoder_epoch(model, opt, batch_set, lambda z: z, batch, "cpu", "step", False, bf16=bf16)
        return time.perf_counter() - start

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="JSON file for every step time")
    args = p.parse_args(argv)
    for name in ("threads", "batch", "cycles"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not bf16_autocast_available("cpu"):
        p.error("this CPU has no oneDNN bf16 kernels (AVX-512 BF16 or AMX): there is no bf16 row to time")
    torch.set_num_threads(args.threads)
    steps = {"fp32": _row(False, args.batch), "bf16": _row(True, args.batch)}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for cycle in range(args.cycles):
        for name in list(steps)[:: 1 if cycle % 2 == 0 else -1]:
            times[name].append(steps[name]())
    ratios = [a / b for a, b in zip(times["fp32"], times["bf16"])]
    print(f"# decoder attack step, batch {args.batch}, {args.threads} threads; {machine()}")
    print("| row | median step (ms) | speed-up vs fp32 (median of paired cycles) |\n|---|---|---|")
    print(f"| fp32 | {1e3 * statistics.median(times['fp32']):.1f} | 1.00 |")
    print(f"| bf16 | {1e3 * statistics.median(times['bf16']):.1f} | {statistics.median(ratios):.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "times_s": times}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
