"""CEMLoss against the authors' own ``compute_class_means`` (GMM and PP), loaded from a checkout at run time.

Runs only when the environment variable ``CEM_OFFICIAL_REPO`` names a checkout of xiasong0501/CEM (CI has
no network, so it cannot fetch one; the always-on parity tests are ``test_loss.py`` against
``cem_fast.reference``). Float64 inputs; loss and gradient with respect to ``z`` must agree to 1e-6.
"""
import os
import warnings

import pytest
import torch

from bench.official import PARITY_SPECS, load_official, parity
from cem_fast import backends

REPO = os.environ.get("CEM_OFFICIAL_REPO")
pytestmark = pytest.mark.skipif(
    not REPO, reason="CEM_OFFICIAL_REPO is not set: point it at a checkout of github.com/xiasong0501/CEM "
                     "to compare against the authors' compute_class_means")
TOL = 1e-6


def _cpu_backends():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [b for b in ("torch", "cpp") if backends.resolve(b, torch.device("cpu")) == b]


@pytest.fixture(scope="module")
def official():
    return load_official(REPO)   # a path that is not a checkout fails here (OfficialRepoError), it does not skip


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("spec", PARITY_SPECS, ids=lambda s: s.name.replace(" ", "_"))
def test_matches_authors(official, spec, backend):
    r = parity(official, spec, backend=backend)
    assert r["loss_rel_err"] < TOL, r
    assert r["grad_rel_err"] < TOL, r
    if spec.tight:   # the case exists to have the hinge both on and off
        assert 0.0 < r["zero_grad_rows"] < 1.0, r


def test_index_bug_matters(official):
    """The corrected default reads each class's own pi and variance, so it departs from the authors' value."""
    r = parity(official, next(s for s in PARITY_SPECS if s.variant == "official-trained" and s.log_entropy == 1))
    assert r["corrected_vs_theirs_loss"] > 1e-3, r
