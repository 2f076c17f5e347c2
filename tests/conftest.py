import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One thread: the suite is many tiny ops, for which a second thread mostly adds synchronisation.
torch.set_num_threads(1)


@pytest.fixture
def rng():
    """A fresh generator per test: inputs are random but the seed is printed on failure via the test id."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
