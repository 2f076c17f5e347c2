"""Shared builders for the tests: random cluster states, the reference call, and where the real data is."""

import os
from pathlib import Path

import pytest
import torch

from cem_fast.reference import reference_loss


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def random_state(variant, C, m, D, *, covariance="diag", gen=None, dtype=torch.float64):
    cent = torch.rand(C, m, D, generator=gen, dtype=torch.float64)
    if variant == "paper":
        pi = torch.rand(C, m, generator=gen, dtype=torch.float64) + 0.05
        pi = pi / pi.sum()
        if covariance == "full":
            a = torch.randn(C, m, D, D, generator=gen, dtype=torch.float64) * 0.05
            var = a @ a.transpose(-1, -2) + 0.01 * torch.eye(D, dtype=torch.float64)
        else:
            var = torch.rand(C, m, D, generator=gen, dtype=torch.float64) * 0.05
    elif variant == "official-trained":
        pi = torch.rand(C, m, generator=gen, dtype=torch.float64) + 0.05
        pi = pi / pi.sum(1, keepdim=True)
        var = torch.rand(C, m, generator=gen, dtype=torch.float64) * 0.05
    else:
        pi, var = None, None
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(cent), cast(pi), cast(var)


def run_reference(z, y, cent, pi, var, variant, **kw):
    z64 = z.detach().double().reshape(z.shape[0], -1).requires_grad_(True)
    loss, new_pi, new_var = reference_loss(
        z64,
        y,
        cent.double(),
        variant=variant,
        pi=None if pi is None else pi.double(),
        variance=None if var is None else var.double(),
        **kw,
    )
    (g,) = torch.autograd.grad(loss, z64) if loss.requires_grad else (torch.zeros_like(z64),)
    return loss.detach(), g, new_pi, new_var


def shared_data_dir() -> Path:
    """The project's real data: ``$CEM_FAST_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("CEM_FAST_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared" / "data"


SHARED_DATA = shared_data_dir()
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "cifar10_test.npz").exists(), reason=f"the real data is not in {SHARED_DATA} (set CEM_FAST_DATA)"
)


# Tiny training runs: 8 training images in 2 batches, 4 test images, 1 thread, the torch CEM backend.
TINY_TRAIN = [
    "--preset",
    "smoke",
    "--train-subset",
    "8",
    "--test-subset",
    "4",
    "--batch-size",
    "4",
    "--no-progress",
    "--threads",
    "1",
    "--cem-backend",
    "torch",
]


def tiny_run(tmp_path, *extra, name="run", base=TINY_TRAIN):
    """Train ``python -m reproduce.train base + extra`` into ``tmp_path / name``; returns that folder."""
    from reproduce import train

    out = tmp_path / name
    assert train.main([*base, "--out", str(out), *extra]) == 0
    return out


def run_metrics(out) -> list:
    """A run's ``metrics.jsonl`` rows."""
    import json

    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def restore_threads():
    """Put torch's thread count back after a test that sets it (``--threads``); autouse it with
    ``pytestmark = pytest.mark.usefixtures("restore_threads")`` after importing it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
