"""bench/launch_count.py: its counter, and at most four kernels per forward+backward on the fused triton path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from launch_count import LaunchCounter  # noqa: E402


def test_counter_counts_a_known_op_sequence():
    x = torch.randn(4, 3)
    with LaunchCounter() as c:
        y = x + 1  # a kernel
        y.view(3, 4)  # a view: none
        torch.empty(5)  # the allocator: none
        s = y.sum()  # a kernel
        torch.zeros(3)  # a fill kernel
        s.item()  # a host sync, not a kernel
    assert c.total == 3, c.describe()
    assert c.aten["add"] == 1 and c.aten["sum"] == 1 and sum(c.syncs.values()) == 1, c.describe()
    assert not c.triton


_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "bench")
from launch_count import LaunchCounter, count
from cem_fast.backends import triton_backend as tb
z, cen, coef = torch.randn(6, 5), torch.randn(4, 5), torch.ones(4, 1)
a = torch.tensor([0, 1, 2, 3, 0, 1])
with LaunchCounter() as c:
    tb.scatter_grad(z, a, cen, coef)
out = {"hook": [c.total, dict(c.triton), dict(c.aten)]}
for variant in ("paper", "official", "official-trained"):
    for path in ("direct", "cemloss"):
        r = count(variant, "diag", path)
        out[f"{variant}/{path}"] = [r.total, sum(r.syncs.values()), r.describe()]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def counts():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_counter_counts_triton_launches(counts):
    total, triton_kernels, aten = counts["hook"]
    assert total == 1 and triton_kernels == {"_scatter_grad_kernel": 1} and aten == {}, counts["hook"]


@pytest.mark.parametrize("variant", ["paper", "official", "official-trained"])
def test_fused_forward_backward_is_at_most_four_kernels_and_never_syncs(counts, variant):
    total, syncs, what = counts[f"{variant}/direct"]
    assert total <= 4 and syncs == 0, what


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_cemloss_forward_backward_is_at_most_four_kernels(counts, variant):
    total, syncs, what = counts[f"{variant}/cemloss"]
    assert total <= 4 and syncs == 0, what
