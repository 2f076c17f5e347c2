"""What CEM adds to one full split-training step (split VGG11-BN, cut 4, noRELU_C8S1, sigmoid, CIFAR 32 px).

    python bench/train_step.py [--device auto|cpu|cuda] [--batch 128] [--steps 10] [--rounds 3] [--warmup 2]
                               [--threads N] [--official-repo PATH] [--quick] [--out FILE]

One step = encoder -> z, server on z + N(0, sigma^2) (sigma 0.025), cross-entropy, then

* ``no CEM``: backward of the cross-entropy;
* ``one backward``: backward of ``CE + lambda * CEMLoss(z, y)`` (lambda 16), for every backend available
  on the device (CPU: torch, cpp; CUDA: torch, cuda, triton; ``--backends`` picks others), and once more
  with the auto backend and ``validate=False`` (no label-range or NaN check, so no host sync);
* ``authors' application``: the gradient scheme of the authors' training step, restated from
  their training script: ``cem.backward(retain_graph=True)``, clone every encoder grad, zero both
  optimisers, ``CE.backward()``, ``grad += lambda * saved`` on the encoder; the loss is our CEMLoss
  (auto backend), so only the application differs;
* with ``--compile``: ``torch.compile`` of the ``one backward`` step (auto backend, ``validate=False``); the
  first call's time, compilation included, is reported beside the table;
* with ``--official-repo`` (a checkout of xiasong0501/CEM) also the authors' own loss function for
  official-trained (``model_training_paral_pruning.compute_class_means`` via ``bench/official.py``),
  applied their way;

and a step of the client and the server SGD optimisers. The clusters are fitted once (``refit`` on the
features of 1024 random images) before timing; refits happen once per epoch and are not part of a step.
Each row trains its own copy of the same initial model on the same fixed batch. Timing interleaves the
rows step by step (one step of each row per cycle, order rotated every cycle; ``--rounds x --steps``
cycles) so that load changes on a shared machine hit all rows alike; the table gives the median step
time, the 25-75 % range, and the overhead against ``no CEM`` measured in the same run, both as the ratio
of the medians and as the median of the per-cycle ratios (paired, more robust to load drift).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python bench/train_step.py`` from a checkout
    sys.path.insert(0, str(ROOT))

from bench.harness import available_backends, machine  # noqa: E402
from cem_fast import CEMLoss, backends  # noqa: E402
from reproduce.models import build_split_model  # noqa: E402

NUM_CLASSES = 10
SIGMA = 0.025
LAMBDA = 16.0
BATCHES_PER_EPOCH = 391  # CIFAR-10 at batch 128: official-trained's epoch size is 391 * batch
REFIT_SAMPLES = 1024  # images whose features the clusters are fitted on (256 with --quick)
DEVICE_BACKENDS = {"cpu": ("torch", "cpp"), "cuda": ("torch", "cuda", "triton")}
TARGET_OVERHEAD = {"cpu": 10.0, "cuda": 5.0}  # percent, with the fastest backend at B=128
VARIANTS = ("paper", "official-trained")


@dataclass
class Row:
    """One timed configuration: its own model copy, optimisers and CEMLoss, and a step function."""

    variant: str  # "-" for no CEM
    backend: str  # "-" for no CEM
    application: str
    step: Callable[[], None]
    times: list = field(default_factory=list)

    @property
    def label(self) -> tuple:
        return (self.variant, self.backend, self.application)


class Trainee:
    """A split model with the two SGD optimisers of the authors (client = encoder, server)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.encoder, self.server = model.encoder, model.server
        kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.opts = (torch.optim.SGD(self.encoder.parameters(), **kw), torch.optim.SGD(self.server.parameters(), **kw))

    def forward(self, x, y):
        z = self.encoder(x)
        logits = self.server(z + SIGMA * torch.randn_like(z))
        return z, F.cross_entropy(logits, y)

    def zero_grad(self):
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)

    def step(self):
        for opt in self.opts:
            opt.step()


def one_backward_step(t: Trainee, x, y, cem: Optional[CEMLoss]):
    """``no CEM`` (cem is None) or ``CE + lambda * cem(z, y)`` with a single backward."""
    z, loss = t.forward(x, y)
    if cem is not None:
        loss = loss + LAMBDA * cem(z, y)
    t.zero_grad()
    loss.backward()
    t.step()


def authors_step(t: Trainee, x, y, cem_fn: Callable):
    """The authors' gradient application (their training script): a separate CEM backward, saved and added to the encoder."""
    z, ce = t.forward(x, y)
    cem_value = cem_fn(z, y)
    t.zero_grad()
    cem_value.backward(retain_graph=True)
    saved = {name: p.grad.clone() for name, p in t.encoder.named_parameters() if p.grad is not None}
    t.zero_grad()
    ce.backward()
    for name, p in t.encoder.named_parameters():
        if name in saved:
            p.grad += LAMBDA * saved[name]
    t.step()


def make_base_model(device: torch.device, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_split_model("vgg11_bn", NUM_CLASSES, cut=4, image_size=32, bottleneck="noRELU_C8S1", sigmoid=True)
    return model.to(device).train()


def refit_features(encoder: torch.nn.Module, n: int, device: torch.device, seed: int):
    """The initial encoder's features (eval mode) of ``n`` random images, and balanced labels."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, 32, 32, generator=gen).to(device)
    y = (torch.arange(n) % NUM_CLASSES).to(device)
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        z = torch.cat([encoder(chunk) for chunk in x.split(256)])
    encoder.train(was_training)
    return z, y


def fitted_cem(
    variant: str, backend: str, features, batch: int, device: torch.device, validate: bool = True
) -> CEMLoss:
    """A CEMLoss whose clusters are refit on ``features = (z, y)``."""
    cem = CEMLoss(
        NUM_CLASSES,
        sigma=SIGMA,
        variant=variant,
        backend=backend,
        validate=validate,
        dataset_size=BATCHES_PER_EPOCH * batch,
    ).to(device)
    return cem.refit(*features)


def build_rows(
    device: torch.device,
    batch: int,
    seed: int,
    official_repo: Optional[str],
    refit_samples: int,
    only: Optional[list] = None,
    variants=VARIANTS,
) -> tuple[list, dict]:
    base = make_base_model(device, seed)
    features = refit_features(base.encoder, refit_samples, device, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = (torch.randperm(batch, generator=gen) % NUM_CLASSES).to(device)
    info = {
        "backends": available_backends(device, only or DEVICE_BACKENDS[device.type]),
        "auto": backends.resolve("auto", device),
        "x": x,
        "y": y,
        "base": base,
        "features": features,
    }

    def trainee():
        return Trainee(copy.deepcopy(base))

    rows = []
    t = trainee()
    rows.append(Row("-", "-", "no CEM", lambda t=t: one_backward_step(t, x, y, None)))
    for variant in variants:
        for backend in info["backends"]:
            t = trainee()
            cem = fitted_cem(variant, backend, features, batch, device)
            rows.append(Row(variant, backend, "one backward", lambda t=t, cem=cem: one_backward_step(t, x, y, cem)))
        t = trainee()
        cem = fitted_cem(variant, info["auto"], features, batch, device, validate=False)
        rows.append(
            Row(
                variant,
                info["auto"],
                "one backward, validate=False",
                lambda t=t, cem=cem: one_backward_step(t, x, y, cem),
            )
        )
        t = trainee()
        cem = fitted_cem(variant, info["auto"], features, batch, device)
        rows.append(Row(variant, info["auto"], "authors' application", lambda t=t, cem=cem: authors_step(t, x, y, cem)))
    if official_repo is not None:
        rows.append(official_loss_row(official_repo, trainee(), x, y, batch, device, features))
    return rows, info


def official_loss_row(repo: str, t: Trainee, x, y, batch: int, device: torch.device, features) -> Row:
    """The authors' official-trained loss function (loaded from their checkout), applied their way."""
    from bench.official import load_official

    official = load_official(repo)
    cem = fitted_cem("official-trained", "torch", features, batch, device)
    centroids = [c for c in cem.centroids]
    weights = [w for w in cem.pi]
    variances = [v for v in cem.variance]

    def their_loss(z, labels):
        return official.pp_loss(
            z,
            labels,
            centroids,
            weights,
            variances,
            sigma=SIGMA,
            num_classes=NUM_CLASSES,
            batches_per_epoch=BATCHES_PER_EPOCH,
            batch_size=batch,
        )

    return Row(
        "official-trained", "authors' loss fn", "authors' application", lambda: authors_step(t, x, y, their_loss)
    )


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(rows: list, device: torch.device, warmup: int, steps: int, rounds: int, progress: bool) -> None:
    """Time ``rounds x steps`` steps per row, one step of every row in turn (rotated each cycle), so that
    a load change on a shared machine hits all rows alike and each cycle gives a paired comparison."""
    for row in rows:
        for _ in range(warmup):
            row.step()
    sync(device)
    cycle = 0
    for r in range(rounds):
        for _ in range(steps):
            shift = cycle % len(rows)
            for row in rows[shift:] + rows[:shift]:
                sync(device)
                start = time.perf_counter()
                row.step()
                sync(device)
                row.times.append(time.perf_counter() - start)
            cycle += 1
        if progress:
            print(f"  [{device.type}] round {r + 1}/{rounds} done", file=sys.stderr, flush=True)


def overheads(row: Row, base: Row) -> tuple[float, float]:
    """Percent overhead against ``base``: ratio of the medians, and median of the per-cycle ratios."""
    of_medians = 100 * (statistics.median(row.times) / statistics.median(base.times) - 1)
    paired = 100 * (statistics.median(t / b for t, b in zip(row.times, base.times)) - 1)
    return of_medians, paired


def first_compile(info: dict, device: torch.device, batch: int, steps: int) -> str:
    """Seconds of the first call of ``torch.compile`` of the one-backward step (paper variant, auto backend,
    ``validate=False``; compilation included) and the median of ``steps`` later calls."""
    t = Trainee(copy.deepcopy(info["base"]))
    cem = fitted_cem("paper", info["auto"], info["features"], batch, device, validate=False)
    torch._dynamo.reset()
    step = torch.compile(lambda: one_backward_step(t, info["x"], info["y"], cem))
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - start
    later = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        later.append(time.perf_counter() - start)
    return (
        f"- {device.type}: torch.compile of the one-backward step (paper, {info['auto']}, validate=False): "
        f"first call {first:.1f} s (compilation included), then {1e3 * statistics.median(later):.1f} ms "
        f"per step (median of {steps}; each: {', '.join(f'{1e3 * t:.1f}' for t in later)} ms; a call far "
        f"above the median recompiled)"
    )


def quantile(values: list, q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def table(results: list) -> str:
    lines = [
        "| device | CEM variant | backend | gradient application | median step (ms) | p25-p75 (ms) | "
        "overhead vs no CEM (medians) | overhead, paired per cycle |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for device, rows in results:
        for row in rows:
            if row is rows[0]:
                over = "(baseline) | (baseline)"
            else:
                over = " | ".join(f"{v:+.1f} %" for v in overheads(row, rows[0]))
            lines.append(
                f"| {device} | {row.variant} | {row.backend} | {row.application} | "
                f"{1e3 * statistics.median(row.times):.1f} | "
                f"{1e3 * quantile(row.times, 0.25):.1f}-{1e3 * quantile(row.times, 0.75):.1f} | {over} |"
            )
    return "\n".join(lines)


def verdicts(results: list) -> list:
    """Per device and variant: the fastest one-backward backend's overhead against the target."""
    out = []
    for device, rows in results:
        for variant in VARIANTS:
            cands = [r for r in rows if r.variant == variant and r.application == "one backward"]
            if not cands:
                continue
            best = min(cands, key=lambda r: statistics.median(r.times))
            of_medians, paired = overheads(best, rows[0])
            worst = max(of_medians, paired)
            target = TARGET_OVERHEAD[device]
            out.append(
                f"- {device}, {variant}: fastest backend {best.backend}, overhead {of_medians:+.1f} % "
                f"(medians) / {paired:+.1f} % (paired); target <= {target:g} %: "
                f"{'met' if worst <= target else 'NOT met'} (judged on the larger of the two)"
            )
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = CPU, and CUDA too when available"
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed cycles per round (a cycle = one step of every row)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (only a progress unit)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--official-repo", default=None, help="checkout of xiasong0501/CEM: also time their loss function")
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        choices=("torch", "cpp", "cuda", "triton"),
        help="the backends of the one-backward rows (default: those of the device)",
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="CEM variants timed")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the first call of a torch.compile'd step (compilation included)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up step, 2 steps, 1 round")
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.rounds = 1, 2, 1
    args.refit_samples = 256 if args.quick else REFIT_SAMPLES
    for name in ("batch", "steps", "rounds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = (
        ["cpu", "cuda"]
        if args.device == "auto" and torch.cuda.is_available()
        else (["cpu"] if args.device == "auto" else [args.device])
    )
    results, infos = [], []
    for name in devices:
        device = torch.device(name)
        rows, info = build_rows(
            device, args.batch, args.seed, args.official_repo, args.refit_samples, args.backends, args.variants
        )
        time_rows(rows, device, args.warmup, args.steps, args.rounds, progress=not args.quick)
        results.append((name, rows))
        infos.append(f"- {name}: backends available {info['backends']}, auto -> {info['auto']}")
        if args.compile:
            infos.append(first_compile(info, device, args.batch, max(args.steps, 2)))
    header = (
        f"Split VGG11-BN cut 4 (noRELU_C8S1, sigmoid), batch [{args.batch},3,32,32], sigma {SIGMA}, "
        f"lambda {LAMBDA:g}, SGD client+server; {args.warmup} warm-up steps per row, then {args.rounds} x "
        f"{args.steps} timed cycles (one step of every row each); {torch.get_num_threads()} CPU threads; "
        f"{machine('cuda' if 'cuda' in devices else None)} (at the end)."
    )
    text = "\n".join([header, "", table(results), "", *verdicts(results), "", *infos])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
