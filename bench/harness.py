"""What every benchmark here shares: the backends to time, the machine's description, one timer, the
bytes a kernel must move, and CSV writing.

Nothing here needs more than torch (and Triton's ``do_bench`` on CUDA), so the GPU check can import it on a
machine without the experiment extras.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as ``python bench/<script>.py`` from a checkout
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cem_fast import backends  # noqa: E402
from reproduce.machine import cpu_model  # noqa: E402,F401  (re-exported: the benchmarks name the CPU)

SLOW_S = 0.05  # a call slower than this is timed by single runs, not blocked_autorange


# --------------------------------------------------------------------------- backends, device and machine


def available_backends(device: torch.device, only: Optional[Iterable[str]] = None) -> list:
    """``torch`` plus every other backend that resolves to itself on ``device`` (builds a compiled one if
    needed), in ``backends.BACKENDS`` order; ``only`` restricts the candidates."""
    wanted = list(backends.BACKENDS) if only is None else [b for b in backends.BACKENDS if b in set(only)]
    names = []
    for name in wanted:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "torch" or backends.resolve(name, device) == name:
                names.append(name)
    return names


def device_arg(parser, text: str) -> torch.device:
    """``--device`` for the bench scripts: ``cpu`` or ``cuda`` (then a CUDA device must exist); a parser error
    otherwise."""
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return device


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine(device: Optional[torch.device] = None) -> str:
    """One line: date, CPU model and cores, GPU, Python, torch and Triton versions, load average."""
    parts = [time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), f"CPU {cpu_model()} ({os.cpu_count()} cores)"]
    if device is not None and torch.device(device).type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    try:
        import triton

        tri = triton.__version__
    except ImportError:
        tri = "absent"
    parts += [
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"triton {tri}",
        f"load average {loadavg()}",
    ]
    return ", ".join(parts)


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    median: float  # seconds (do_bench with the L2 flushed, on CUDA)
    minimum: float
    runs: int
    noflush: Optional[float] = None  # CUDA only: tight-loop median, warm L2, launches overlapping


class _NoProgress:
    def set_postfix_str(self, *_):
        pass

    def update(self, *_):
        pass


class Clock:
    """Medians of interleaved measurements.

    CPU: every statement is timed in each of ``rounds`` rounds (round-robin, so all see the same share of a
    busy machine) by ``torch.utils.benchmark`` ``blocked_autorange(min_run_time)``, the blocks of all rounds
    pooled; a call slower than ``SLOW_S`` gets ``slow_runs`` single runs instead. CUDA: ``do_bench`` medians
    (L2 flushed between calls) and a tight loop of back-to-back calls timed with CUDA events (warm L2).
    """

    def __init__(
        self,
        device: torch.device,
        threads: int = 1,
        min_run_time: float = 0.05,
        rounds: int = 3,
        slow_runs: int = 3,
        cuda_rep_ms: int = 100,
    ):
        self.device = torch.device(device)
        self.threads = threads
        self.min_run_time = min_run_time
        self.rounds = rounds
        self.slow_runs = slow_runs
        self.cuda_rep_ms = cuda_rep_ms

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def single_runs(self, stmts: Dict[Tuple, Callable], runs: int) -> Dict[Tuple, Timing]:
        """``runs`` single runs of each statement (for slow ones, like the float64 reference)."""
        out = {}
        for key, fn in stmts.items():
            t = [self.once(fn) for _ in range(runs)]
            out[key] = Timing(statistics.median(t), min(t), runs)
        return out

    def measure(self, stmts: Dict[Tuple, Callable], progress=None) -> Dict[Tuple, Timing]:
        from torch.utils.benchmark import Timer

        progress = progress or _NoProgress()
        for fn in stmts.values():
            fn()  # warm-up: allocations, lazy builds
        first = {key: self.once(fn) for key, fn in stmts.items()}  # slow-call detection
        if self.device.type == "cuda":
            return {key: self.cuda(fn, first[key], progress, key) for key, fn in stmts.items()}
        fast = {
            key: Timer("fn()", globals={"fn": fn}, num_threads=self.threads)
            for key, fn in stmts.items()
            if first[key] < SLOW_S
        }
        pooled = {key: [] for key in stmts}
        for r in range(self.rounds):
            for key, timer in fast.items():
                progress.set_postfix_str(f"round {r + 1}/{self.rounds} {' '.join(map(str, key))}")
                pooled[key] += timer.blocked_autorange(min_run_time=self.min_run_time).times
        for key, fn in stmts.items():
            if key not in fast:
                progress.set_postfix_str(f"slow {' '.join(map(str, key))}")
                pooled[key] = [first[key]] + [self.once(fn) for _ in range(self.slow_runs - 1)]
        return {key: Timing(statistics.median(t), min(t), len(t)) for key, t in pooled.items()}

    def cuda(self, fn: Callable, first_s: float, progress=None, key=()) -> Timing:
        from triton.testing import do_bench

        (progress or _NoProgress()).set_postfix_str(" ".join(map(str, key)))
        rep = max(self.cuda_rep_ms, int(3e3 * first_s))  # at least a few calls for slow ones
        flushed = do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median") * 1e-3
        return Timing(flushed, flushed, 1, tight_loop(fn, first_s, max(3, self.rounds)))


def tight_loop(fn: Callable, first_s: float, repeats: int = 5) -> float:
    """CUDA: median over ``repeats`` of the mean time of back-to-back calls (CUDA events; warm L2)."""
    per_loop = max(1, min(200, int(0.02 / max(first_s, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    loops = []
    for _ in range(repeats):
        start.record()
        for _ in range(per_loop):
            fn()
        end.record()
        end.synchronize()
        loops.append(start.elapsed_time(end) * 1e-3 / per_loop)
    return statistics.median(loops)


def statements(loss_fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> dict:
    """Forward, backward on a retained graph, and forward+backward of ``loss_fn(z)``."""
    z = z.detach().clone().requires_grad_(True)
    loss = loss_fn(z)
    return {
        "fwd": lambda: loss_fn(z),
        "bwd": lambda: torch.autograd.grad(loss, z, retain_graph=True),
        "fwdbwd": lambda: torch.autograd.grad(loss_fn(z), z),
    }


# --------------------------------------------------------------------------- bytes that must move


def loss_bytes(B: int, D: int, K: int, z_size: int, state_size: int) -> Dict[str, int]:
    """Forward reads z, labels and the cluster state; backward reads z, labels and the centroids and writes
    dz; forward+backward reads each input once and writes dz once."""
    z, lab, cent = B * D * z_size, 8 * B, K * D * 4
    return {"fwd": z + lab + state_size, "bwd": 2 * z + lab + cent, "fwdbwd": 2 * z + lab + state_size}


def state_bytes(variant: str, K: int, D: int) -> int:
    """float32 cluster state a variant's forward reads: centroids, plus weights and variances."""
    extra = {"official": 0, "official-trained": 2 * K, "paper": K + K * D}[variant]
    return 4 * (K * D + extra)


def kernel_bytes(B: int, D: int, K: int, z_size: int, acc_size: int = 4) -> Dict[str, int]:
    """assign_stats reads z, labels, centroids and writes assign, counts, sqdev; scatter_grad reads z,
    assign, centroids, coef and writes dz; both (fused minimum): every input read once, every output written once."""
    z, lab, kd = B * D * z_size, 8 * B, K * D * acc_size
    fwd = z + lab + kd + 8 * B + K * acc_size + kd
    bwd = z + 8 * B + 2 * kd + z
    both = z + lab + 2 * kd + 8 * B + K * acc_size + kd + z
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": both}


# --------------------------------------------------------------------------- output


def write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Write ``header`` and ``rows`` to ``path`` atomically (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


if __name__ == "__main__":  # the GPU check's first step: what this machine is
    cuda = torch.cuda.is_available()
    print("# device", machine("cuda" if cuda else None), f"| CUDA {torch.version.cuda}", flush=True)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        print(
            f"# device {props.name}: {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
            f"L2 {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB",
            flush=True,
        )
        try:
            print(
                subprocess.run(
                    [
                        "nvidia-smi",
                        "--query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem",
                        "--format=csv",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=20,
                ).stdout,
                flush=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"nvidia-smi: {exc}")
