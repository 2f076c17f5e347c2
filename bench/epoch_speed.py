"""What makes a CPU training epoch of split VGG11-BN (cut 4, noRELU_C8S1, Sigmoid) faster.

    python bench/epoch_speed.py [--rows fp32,channels_last,...] [--threads 1,2] [--cycles 6] [--warmup 2]
                                [--batch 128] [--defence noise] [--eval-batches 0] [--data-root DIR]
                                [--data-batches 30] [--no-data] [--out FILE]

Compute rows (one training step of the trainer: encoder -> z (float32) -> z + N(0, 0.025^2) -> server ->
cross-entropy -> backward -> SGD step of the client and the server optimisers, on one fixed batch). A row
is ``fp32`` (the trainer's default) or ``+``-joined options, each installed by the trainer's own code
(``reproduce.speed.apply_speed_options``): ``channels_last``, ``bf16`` (``--bf16-autocast``) and
``compile`` (``--compile``; its first steps, compilation included, are reported as warm-up). With
``--defence noise_arl`` (or another defence of ``reproduce.defences``) the step is the trainer's with that
defence at sigma 0.025: its ``adversary_step`` (Noise_ARL: a step of the simulated attacker's decoder), the
perturbation and its ``regularizer``, the defence set up with the row's ``bf16_autocast`` unless the row
names ``fp32-defence``. Every
row runs at every thread count of ``--threads``; each (row, threads) trains its own copy of the same
initial model.

Timing interleaves all (row, threads) pairs step by step, the order rotated every cycle, so load
changes on a shared machine hit every row alike. Per row: the median wall time of a step, the median
CPU time of the process during a step (at 1 thread the time the step computes: an estimate of the step
on an idle core; at 2 threads it includes OpenMP's spin-waiting), and the median of the per-cycle
ratios ``fp32 step / row step`` at the same thread count (the speed-up, paired). With ``--eval-batches N``
also N interleaved test-batch forwards (256 images, eval mode, as ``reproduce.train_loop.evaluate``; bf16
autocast is off in eval mode) per row, for the evaluation's share of an epoch.

Data rows (``--no-data`` skips them): the trainer's own training loader
(``reproduce.train_data.train_loader``) over CIFAR-10 (``--data-root``, else the shipped sample) with
the ``crop-flip`` augmentation, ``per-image`` (the dataset's transform per image, collated) and
``batched`` (``--data-pipeline batched``), batches interleaved the same way: wall and CPU time per
batch of ``--batch`` images. The one-time JPEG decoding of the dataset is reported apart.

The JSON (``--out``) holds every per-step time, the date, CPU model, torch version, git commit and the
load average before and after.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
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

from bench.harness import cpu_model, loadavg  # noqa: E402
from reproduce.data import denormalize  # noqa: E402
from reproduce.defences import DEFENCES  # noqa: E402
from reproduce.models import build_split_model  # noqa: E402
from reproduce.runs import build_run_defence  # noqa: E402
from reproduce.speed import apply_speed_options, to_batch_format  # noqa: E402

SIGMA = 0.025
STEPS_PER_EPOCH_FULL = 391  # 50,000 / 128, rounded up
EVAL_BATCH = 256  # the presets' eval batch; 10,000 test images = 40 batches
OPTIONS = {
    "channels_last": "channels_last",
    "bf16": "bf16_autocast",
    "compile": "compile",
    "fp32-defence": "fp32_defence",  # the defence's networks in float32 whatever bf16 says (the trainer before 2026-12-02)
}
DEFAULT_ROWS = ("fp32", "channels_last", "bf16", "channels_last+bf16")
PIPELINES = ("per-image", "batched")


def row_config(name: str) -> dict:
    """The trainer settings of row ``name`` (``fp32`` or ``+``-joined names of ``OPTIONS``)."""
    parts = [] if name == "fp32" else name.split("+")
    bad = [p for p in parts if p not in OPTIONS]
    if bad or not name:
        raise ValueError(f"row {name!r}: use fp32 or +-joined options of {tuple(OPTIONS)}")
    return {"device": "cpu", **{OPTIONS[p]: True for p in parts}}


class Row:
    """One way of running the training step at one thread count, with its own model and optimisers."""

    def __init__(self, name: str, threads: int, model, x: torch.Tensor, y: torch.Tensor, defence: str = "noise"):
        self.name, self.threads = name, threads
        self.cfg = row_config(name)
        self.model = apply_speed_options(copy.deepcopy(model).train(), self.cfg)
        self.x, self.y = to_batch_format(x, self.cfg), y
        torch.manual_seed(1)  # every row's defence starts from the same decoder
        self.defence = build_run_defence({"defence": defence, "defence_options": {}, "noise_on": True, "sigma": SIGMA})
        defence_bf16 = self.cfg.get("bf16_autocast", False) and not self.cfg.pop("fp32_defence", False)
        self.defence.setup(self.model, image_size=32, bf16_autocast=defence_bf16)
        self.x_unit = denormalize(x, "cifar10") if self.defence.needs_unit_images else None
        kw = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.opts = (
            torch.optim.SGD(self.model.encoder.parameters(), **kw),
            torch.optim.SGD(self.model.server.parameters(), **kw),
        )
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.eval_wall: list[float] = []
        self.warmup_s = 0.0

    def step(self) -> tuple[float, float]:
        torch.set_num_threads(self.threads)
        t0, c0 = time.perf_counter(), time.process_time()
        z = self.model.encoder(self.x)
        self.defence.adversary_step(self.x_unit, z.detach())
        loss = F.cross_entropy(self.model.server(self.defence.perturb(z)), self.y)
        reg = self.defence.regularizer(self.x, z, self.y, x_unit=self.x_unit)
        if reg is not None:
            loss = loss + reg
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.opts:
            opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor) -> float:
        """One test batch as ``reproduce.train_loop.evaluate`` runs it (eval mode: float32 convs)."""
        torch.set_num_threads(self.threads)
        self.model.eval()
        t0 = time.perf_counter()
        z = self.model.encoder(x)
        self.model.server(z + SIGMA * torch.randn_like(z)).argmax(1)
        dt = time.perf_counter() - t0
        self.model.train()
        return dt


def _interleave(items, cycles: int, run) -> None:
    for cycle in range(cycles):
        k = cycle % len(items)
        for item in items[k:] + items[:k]:
            run(item)


def _paired(base: list[float], other: list[float]) -> float:
    return statistics.median(b / t for b, t in zip(base, other))


def time_compute(
    rows: list[str], threads: list[int], cycles: int, warmup: int, batch: int, eval_batches: int, log, defence="noise"
) -> dict:
    torch.manual_seed(0)
    model = build_split_model("vgg11_bn", 10, 4, 32, bottleneck="noRELU_C8S1", sigmoid=True)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    built = [Row(r, t, model, x, y, defence) for t in threads for r in rows]
    for row in built:
        t0 = time.perf_counter()
        for _ in range(warmup):
            row.step()
        row.warmup_s = time.perf_counter() - t0  # includes the compilation for compile rows
        log(f"  warm-up {row.name} @ {row.threads} thread(s): {row.warmup_s:.1f} s")

    def run(row):
        w, c = row.step()
        row.wall.append(w)
        row.cpu.append(c)

    _interleave(built, cycles, run)
    x_eval = torch.randn(EVAL_BATCH, 3, 32, 32)
    if eval_batches:
        for row in built:  # compile rows compile their eval graph here
            row.eval_step(x_eval)
        _interleave(built, eval_batches, lambda row: row.eval_wall.append(row.eval_step(x_eval)))
    base = {r.threads: r for r in built if r.name == "fp32"}
    out = {}
    for row in built:
        b = base.get(row.threads)
        out[f"{row.name}@{row.threads}"] = {
            "row": row.name,
            "threads": row.threads,
            "median_step_s": statistics.median(row.wall),
            "median_cpu_s": statistics.median(row.cpu),
            "speedup_vs_fp32_paired": _paired(b.wall, row.wall) if b else None,
            "warmup_s": row.warmup_s,
            "median_eval_batch_s": statistics.median(row.eval_wall) if row.eval_wall else None,
            "wall_s": row.wall,
            "cpu_s": row.cpu,
        }
    return out


def time_data(data_root, threads: list[int], batch: int, batches: int, log) -> dict:
    from reproduce.data import load_dataset
    from reproduce.data.augment import set_augmentation
    from reproduce.ddp import Dist
    from reproduce.train_data import train_loader

    t0 = time.perf_counter()
    try:
        ds = load_dataset("cifar10", "train", data_root=data_root, augment=True)
        source = "cifar10"
    except (FileNotFoundError, OSError):
        ds = load_dataset("cifar10-sample", "train", augment=True)
        source = "cifar10-sample"
    decode_s = time.perf_counter() - t0
    log(f"  {source}: {len(ds)} images decoded in {decode_s:.1f} s (once per process)")
    set_augmentation(ds, "crop-flip")
    cpu = torch.device("cpu")
    iters = {}
    for t in threads:
        for p in PIPELINES:
            cfg = {"batch_size": batch, "workers": 0, "data_pipeline": p, "augment": "crop-flip"}
            loader, _, _ = train_loader(ds, cfg, Dist(cpu), cpu, torch.Generator().manual_seed(0))
            iters[(p, t)] = {"it": iter(loader), "wall": [], "cpu": []}

    def run(key):
        torch.set_num_threads(key[1])
        entry = iters[key]
        w0, c0 = time.perf_counter(), time.process_time()
        x, _ = next(entry["it"])
        entry["wall"].append(time.perf_counter() - w0)
        entry["cpu"].append(time.process_time() - c0)
        assert x.shape[0] == batch

    _interleave(list(iters), batches, run)
    out = {"source": source, "images": len(ds), "decode_once_s": decode_s}
    for (p, t), e in iters.items():
        out[f"{p}@{t}"] = {
            "pipeline": p,
            "threads": t,
            "median_batch_s": statistics.median(e["wall"]),
            "median_cpu_s": statistics.median(e["cpu"]),
            "wall_s": e["wall"],
            "cpu_s": e["cpu"],
        }
    return out


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--threads must be >= 1, got {text!r}")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated; fp32 first (the baseline)")
    p.add_argument("--threads", type=_ints, default=[1, 2], help="comma-separated thread counts (default 1,2)")
    p.add_argument("--cycles", type=int, default=6, help="timed steps per row (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (compile rows compile here)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--defence", default="noise", help="the defence in the step (default noise; e.g. noise_arl)")
    p.add_argument("--eval-batches", type=int, default=0, help=f"timed eval forwards of {EVAL_BATCH} per row")
    p.add_argument("--data-root", default=None, help="folder with cifar10_train_jpeg.npz (else the sample)")
    p.add_argument("--data-batches", type=int, default=30, help="timed batches per data row")
    p.add_argument("--no-data", action="store_true", help="skip the data rows")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    rows = a.rows.split(",")
    try:
        for r in rows:
            row_config(r)
    except ValueError as e:
        p.error(str(e))
    if a.defence not in DEFENCES:
        p.error(f"--defence must be one of {sorted(DEFENCES)}, got {a.defence!r}")
    if rows[0] != "fp32":
        p.error(f"--rows must start with fp32 (the baseline), got {a.rows!r}")
    if a.cycles < 1 or a.warmup < 0 or a.batch < 2 or a.data_batches < 1 or a.eval_batches < 0:
        p.error("--cycles and --data-batches must be >= 1, --warmup and --eval-batches >= 0, --batch >= 2")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "commit": _commit(),
        "batch": a.batch,
        "defence": a.defence,
        "threads": a.threads,
        "load_before": loadavg(),
    }
    log(f"{res['date']}  {res['cpu']} ({res['cpus']} CPUs)  load {res['load_before']}")
    res["compute"] = time_compute(rows, a.threads, a.cycles, a.warmup, a.batch, a.eval_batches, log, a.defence)
    res["load_mid"] = loadavg()
    if not a.no_data:
        res["data"] = time_data(a.data_root, a.threads, a.batch, a.data_batches, log)
    res["load_after"] = loadavg()

    print(
        f"{res['date']}  {res['cpu']} ({res['cpus']} CPUs)  torch {res['torch']}  commit {res['commit']}  "
        f"batch {a.batch}  defence {a.defence}  load {res['load_before']} -> {res['load_after']}"
    )
    print(
        f"{'row':28s} {'thr':>3s} {'step s':>8s} {'CPU s':>7s} {'speed-up':>9s} {'epoch 50k s':>12s} "
        f"{'warm-up s':>10s} {'eval batch s':>13s}"
    )
    for r in res["compute"].values():
        ev = "" if r["median_eval_batch_s"] is None else f"{r['median_eval_batch_s']:13.3f}"
        print(
            f"{r['row']:28s} {r['threads']:3d} {r['median_step_s']:8.3f} {r['median_cpu_s']:7.3f} "
            f"{r['speedup_vs_fp32_paired']:8.2f}x {r['median_step_s'] * STEPS_PER_EPOCH_FULL:12.0f} "
            f"{r['warmup_s']:10.1f} {ev}"
        )
    if "data" in res:
        d = res["data"]
        print(f"data ({d['source']}, {d['images']} images decoded once in {d['decode_once_s']:.1f} s), per batch:")
        for k, r in d.items():
            if isinstance(r, dict):
                print(
                    f"  {r['pipeline']:10s} {r['threads']} thread(s): {r['median_batch_s'] * 1e3:7.1f} ms "
                    f"(CPU {r['median_cpu_s'] * 1e3:.1f} ms), {r['median_batch_s'] * STEPS_PER_EPOCH_FULL:.1f} s "
                    "per 50k epoch"
                )
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
