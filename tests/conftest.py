"""Shared test setup: the repository on sys.path, one torch thread, deterministic seeds, and the markers.

Markers (registered in pyproject.toml): ``gpu`` for everything under ``tests/gpu/`` and ``slow`` for the tests
named in ``SLOW`` below (measured with ``pytest --durations=0``, warm extension cache, on the 2-core machine).
``make test`` runs all of them; ``make test-fast`` deselects both.
"""
import os
import sys
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One thread: the suite is many tiny ops, for which a second thread mostly adds synchronisation.
torch.set_num_threads(1)

# Tests that take more than a few seconds each: trainings, attacks, subprocesses, compiling kernels.
# A module name marks every test of the module; "module::test" marks one test (every parametrisation).
SLOW = {
}


def node_seed(nodeid: str) -> int:
    """A seed that depends only on the test's node id: the same in every run and every process."""
    return zlib.crc32(nodeid.encode())


def _is_slow(item) -> bool:
    module = item.path.stem
    name = getattr(item, "originalname", None) or item.name.split("[")[0]
    return module in SLOW or f"{module}::{name}" in SLOW


def pytest_collection_modifyitems(config, items):
    gpu_dir = os.path.join(ROOT, "tests", "gpu") + os.sep
    for item in items:
        if str(item.path).startswith(gpu_dir):
            item.add_marker(pytest.mark.gpu)
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's node id (``node_seed``): inputs differ between tests, repeat between
    runs, and a failing test's report names its seed."""
    seed = node_seed(request.node.nodeid)
    request.node.rng_seed = seed
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "rng_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("rng seed", f"rng fixture seed: {seed} (zlib.crc32 of {item.nodeid!r})"))
