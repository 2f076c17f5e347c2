"""Zero added inference cost: split encoders trained with and without CEM, compared side by side.

    python bench/inference_overhead.py [--models vgg11-c4-32 resnet20-c5-32 resnet20-c5-64]
                                       [--train-steps 10] [--train-batch 64] [--rounds 3] [--min-run-time 0.5]
                                       [--runs RUN_NO_CEM RUN_CEM] [--threads N] [--quick] [--out FILE]

CEMLoss is a training-time loss only: it is a separate module that reads the encoder output ``z`` and
returns a scalar, so it adds no module, parameter, buffer or hook to the encoder the client deploys.
This script checks that on trained encoders. By default, for each model it trains two copies of the same
initial split model for ``--train-steps`` SGD steps on the same batches (the shipped CIFAR-10 sample,
resized for 64 px; random images if the sample is missing): one with cross-entropy only, one with
``CE + 16 * CEMLoss`` (variant paper, clusters refit on the initial encoder's features). ``--runs`` loads
two run directories of ``reproduce.train`` instead (``reproduce.runs.load_run``).

For both encoders (eval mode) it reports parameter and buffer counts, FLOPs at batch 1
(``torch.utils.flop_counter.FlopCounterMode``: convolutions and matmuls), latency (median over interleaved
``torch.utils.benchmark`` measurements, batch 1 and 128, CPU; CUDA too when available), and it exports both
with ``torch.export.export`` and compares the generated graph code, the aten op sequence and the
parameter shapes, plus how far the parameters differ (non-zero: the two encoders really were trained
differently).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python bench/inference_overhead.py`` from a checkout
    sys.path.insert(0, str(ROOT))

from bench.harness import machine  # noqa: E402
from cem_fast import CEMLoss  # noqa: E402
from reproduce.models import build_split_model  # noqa: E402

NUM_CLASSES = 10
SIGMA = 0.025
LAMBDA = 16.0
REFIT_SAMPLES = 512
# name -> (arch, cut, image size, label)
MODELS = {
    "vgg11-c4-32": ("vgg11_bn", 4, 32, "VGG11-BN cut 4, 32 px"),
    "resnet20-c5-32": ("resnet20", 5, 32, "ResNet-20 cut 5, 32 px"),
    "resnet20-c5-64": ("resnet20", 5, 64, "ResNet-20 cut 5, 64 px"),
}
LATENCY_BATCHES = (1, 128)


@dataclass
class Pair:
    label: str
    image_size: int
    plain: torch.nn.Module  # encoder trained without CEM
    cem: torch.nn.Module  # encoder trained with CEM
    source: str


# ----------------------------------------------------------------------------- building the two encoders


def training_images(image_size: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` normalised images ``[n,3,S,S]`` and labels: the shipped CIFAR-10 sample, else random images."""
    try:
        from reproduce.data import load_dataset

        ds = load_dataset("cifar10-sample", "train")
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
        x = torch.stack([ds[int(i)][0] for i in idx])
        y = ds.targets[idx].long()
        source = "cifar10-sample"
    except FileNotFoundError:
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        source = "random images"
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        source += f" resized to {image_size} px"
    return x, y, source


def train(model, x, y, steps: int, batch: int, seed: int, cem: Optional[CEMLoss]) -> None:
    """SGD steps (client and server optimisers, noise sigma before the server), the same batches for every call."""
    opts = [
        torch.optim.SGD(part.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        for part in (model.encoder, model.server)
    ]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the same noise draws for both arms
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        z = model.encoder(x[idx])
        loss = F.cross_entropy(model.server(z + SIGMA * torch.randn_like(z)), y[idx])
        if cem is not None:
            loss = loss + LAMBDA * cem(z, y[idx])
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
    model.eval()


def trained_pair(name: str, steps: int, batch: int, seed: int) -> Pair:
    arch, cut, size, label = MODELS[name]
    torch.manual_seed(seed)
    base = build_split_model(arch, NUM_CLASSES, cut=cut, image_size=size, bottleneck="noRELU_C8S1", sigmoid=True)
    x, y, source = training_images(size, max(REFIT_SAMPLES, 4 * batch), seed)
    plain, with_cem = copy.deepcopy(base), copy.deepcopy(base)
    cem = CEMLoss(NUM_CLASSES, sigma=SIGMA, variant="paper", dataset_size=x.shape[0])
    with torch.no_grad():
        with_cem.encoder.eval()
        cem.refit(with_cem.encoder(x[:REFIT_SAMPLES]), y[:REFIT_SAMPLES])
    train(plain, x, y, steps, batch, seed, cem=None)
    train(with_cem, x, y, steps, batch, seed, cem=cem)
    return Pair(
        label,
        size,
        plain.encoder,
        with_cem.encoder,
        f"{steps} SGD steps of batch {batch} from the same init on {source}; CEM: paper, lambda {LAMBDA:g}",
    )


def loaded_pair(run_plain: str, run_cem: str) -> Pair:
    from reproduce.runs import load_run

    a, b = load_run(run_plain), load_run(run_cem)
    keys = ("arch", "cut", "image_size", "bottleneck", "sigmoid", "in_channels")
    if any(a.config[k] != b.config[k] for k in keys):
        raise ValueError(
            f"--runs: the two runs have different models: "
            f"{ {k: a.config[k] for k in keys} } vs { {k: b.config[k] for k in keys} }"
        )
    if a.config.get("in_channels", 3) != 3:
        raise ValueError("--runs: only 3-channel models are supported")
    cfg = a.config
    label = f"{cfg['arch']} cut {cfg['cut']}, {cfg['image_size']} px"
    source = (
        f"runs {run_plain} (cem_lambda {a.config.get('cem_lambda')}) and {run_cem} "
        f"(cem_lambda {b.config.get('cem_lambda')})"
    )
    return Pair(label, cfg["image_size"], a.model.encoder.eval(), b.model.encoder.eval(), source)


# ----------------------------------------------------------------------------- measurements


def count(tensors) -> int:
    return sum(t.numel() for t in tensors)


def flops(encoder, size: int) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        encoder(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def _infer(encoder, x):
    with torch.inference_mode():
        return encoder(x)


def latencies(pair: Pair, device: torch.device, batch: int, rounds: int, min_run_time: float) -> tuple[float, float]:
    """Median seconds per forward of (plain, cem), measured in alternation over ``rounds`` rounds."""
    x = torch.randn(batch, 3, pair.image_size, pair.image_size, device=device)
    encoders = (copy.deepcopy(pair.plain).to(device).eval(), copy.deepcopy(pair.cem).to(device).eval())
    times = ([], [])
    for _ in range(rounds):
        for i, enc in enumerate(encoders):
            timer = Timer(
                "infer(enc, x)", globals={"infer": _infer, "enc": enc, "x": x}, num_threads=torch.get_num_threads()
            )
            times[i].extend(timer.blocked_autorange(min_run_time=min_run_time).times)
    return statistics.median(times[0]), statistics.median(times[1])


@dataclass
class Exported:
    code: str
    ops: list
    param_shapes: dict

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.code.encode()).hexdigest()[:12]


def export(encoder, size: int) -> Exported:
    ep = torch.export.export(copy.deepcopy(encoder).eval(), (torch.zeros(1, 3, size, size),))
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    shapes = {k: tuple(v.shape) for k, v in ep.state_dict.items()}
    return Exported(ep.graph_module.code, ops, shapes)


def structure(encoder) -> list:
    """Module tree as (name, type) plus any hooks: what a deployed encoder consists of."""
    hooks = [
        name for name, m in encoder.named_modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
    ]
    return [(name, type(m).__name__) for name, m in encoder.named_modules()] + [("hooks", tuple(hooks))]


def weight_difference(a, b) -> tuple[float, float]:
    """Largest absolute and relative L2 difference ``||b - a|| / ||a||`` over the parameters."""
    pairs = [(p.detach(), q.detach()) for p, q in zip(a.parameters(), b.parameters())]
    largest = max(float((p - q).abs().max()) for p, q in pairs)
    num = sum(float(((p - q) ** 2).sum()) for p, q in pairs)
    den = sum(float((p**2).sum()) for p, _ in pairs)
    return largest, (num / den) ** 0.5 if den else float("inf")


# ----------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> str:
    return f"{b / a:.3f}" if a else ("1.000" if a == b else "inf")


def compare(pair: Pair, devices: list, rounds: int, min_run_time: float) -> tuple[list, dict]:
    """Markdown rows for one pair, and the identity checks."""
    a, b = pair.plain.eval(), pair.cem.eval()
    rows = []
    started = time.perf_counter()

    def progress(stage: str) -> None:  # where the time goes (the first GPU run ran past its limit unseen)
        print(f"  [{pair.label}] {stage} ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)

    def row(quantity, va, vb, r):
        rows.append(f"| {pair.label} | {quantity} | {va} | {vb} | {r} |")

    pa, pb = count(a.parameters()), count(b.parameters())
    row("parameters", f"{pa:,}", f"{pb:,}", ratio(pa, pb))
    ba, bb = count(a.buffers()), count(b.buffers())
    row("buffer elements (BN statistics)", f"{ba:,}", f"{bb:,}", ratio(ba, bb))
    fa, fb = flops(a, pair.image_size), flops(b, pair.image_size)
    row("FLOPs per image (conv + matmul)", f"{fa / 1e6:,.2f} M", f"{fb / 1e6:,.2f} M", ratio(fa, fb))
    progress("counted parameters and FLOPs")
    for device in devices:
        for batch in LATENCY_BATCHES:
            ta, tb = latencies(pair, torch.device(device), batch, rounds, min_run_time)
            progress(f"{device} latency at batch {batch}")
            row(
                f"{device.upper()} latency, batch {batch} (median)",
                f"{ta * 1e3:.3f} ms",
                f"{tb * 1e3:.3f} ms",
                ratio(ta, tb),
            )
    ea, eb = export(a, pair.image_size), export(b, pair.image_size)
    progress("exported both encoders")
    checks = {
        "module tree": structure(a) == structure(b),
        "exported graph code": ea.code == eb.code,
        "aten op sequence": ea.ops == eb.ops,
        "parameter shapes": ea.param_shapes == eb.param_shapes,
    }
    row(
        "torch.export graph",
        f"{len(ea.ops)} aten ops, code sha256 {ea.digest}",
        f"{len(eb.ops)} aten ops, code sha256 {eb.digest}",
        "identical" if checks["exported graph code"] else "DIFFERENT",
    )
    row(
        "exported parameter shapes",
        f"{len(ea.param_shapes)} tensors",
        f"{len(eb.param_shapes)} tensors",
        "identical" if checks["parameter shapes"] else "DIFFERENT",
    )
    largest, rel = weight_difference(a, b)
    checks["weights differ"] = largest > 0
    row(
        "parameter difference (max abs; relative L2)",
        "-",
        f"{largest:.3g}; {rel:.3g}",
        "trained apart" if largest > 0 else "SAME WEIGHTS",
    )
    return rows, checks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument(
        "--runs",
        nargs=2,
        metavar=("RUN_NO_CEM", "RUN_CEM"),
        default=None,
        help="compare the encoders of two reproduce.train run directories instead of training",
    )
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="alternating latency measurements per encoder")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per torch.utils.benchmark measurement")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where latency is measured: auto = CPU, and CUDA when available; cuda = CUDA only",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 training steps of 8, 1 short latency round")
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.train_batch, args.rounds, args.min_run_time = 2, 8, 1, 0.01
    for name in ("train_steps", "train_batch", "rounds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.min_run_time <= 0:
        p.error(f"--min-run-time must be > 0, got {args.min_run_time}")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: CUDA is not available")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"]}.get(args.device) or (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    if args.runs:
        pairs = [loaded_pair(*args.runs)]
    else:
        pairs = []
        for name in args.models:
            start = time.perf_counter()
            pairs.append(trained_pair(name, args.train_steps, args.train_batch, args.seed))
            print(f"  [{name}] trained both copies ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    lines = [
        "| encoder | quantity | trained without CEM | trained with CEM | with / without |",
        "|---|---|---:|---:|---:|",
    ]
    notes, all_ok = [], True
    for pair in pairs:
        rows, checks = compare(pair, devices, args.rounds, args.min_run_time)
        lines += rows
        all_ok &= all(checks.values())
        notes.append(
            f"- {pair.label}: {pair.source}; identical: "
            + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items() if k != "weights differ")
        )
    header = (
        f"{machine('cuda' if 'cuda' in devices else None)} (at the end), {torch.get_num_threads()} CPU "
        f"threads; latency: median of "
        f"{args.rounds} alternating torch.utils.benchmark measurements of >= {args.min_run_time:g} s each, "
        f"eval mode, inference_mode."
    )
    fact = (
        "Structural fact: CEMLoss is a training-time loss only. It is a separate nn.Module holding its "
        "cluster state in its own buffers; it reads the encoder output z and returns a scalar, so the "
        "deployed encoder gains no module, parameter, buffer or hook. "
        + (
            "Every check above agrees: same module tree, identical exported graph and parameter shapes, "
            "only the weight values differ."
            if all_ok
            else "WARNING: a check above failed."
        )
    )
    text = "\n".join([header, "", *lines, "", *notes, "", fact])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
