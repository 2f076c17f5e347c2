"""CEMLoss against the authors' own ``compute_class_means`` (GMM and PP), loaded from a checkout at run time.

The parity tests run only when the environment variable ``CEM_OFFICIAL_REPO`` names a checkout of xiasong0501/CEM (CI has
no network, so it cannot fetch one; the always-on parity tests are ``test_loss.py`` against
``cem_fast.reference``). Float64 inputs; loss and gradient with respect to ``z`` must agree to 1e-6.
The loader's own tests (fake checkouts in a temporary directory) always run.
"""

import os
import warnings

import pytest
import torch

from bench.official import GMM_FILE, PARITY_SPECS, PP_FILE, OfficialRepoError, load_official, parity
from cem_fast import backends

REPO = os.environ.get("CEM_OFFICIAL_REPO")
needs_repo = pytest.mark.skipif(
    not REPO,
    reason="CEM_OFFICIAL_REPO is not set: point it at a checkout of github.com/xiasong0501/CEM "
    "to compare against the authors' compute_class_means",
)
TOL = 1e-6


def _cpu_backends():
    if not REPO:  # the parity tests skip anyway; do not build the C++ extension at collection for nothing
        return ["torch"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [b for b in ("torch", "cpp") if backends.resolve(b, torch.device("cpu")) == b]


@pytest.fixture(scope="module")
def official():
    return load_official(REPO)  # a path that is not a checkout fails here (OfficialRepoError), it does not skip


@needs_repo
@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("spec", PARITY_SPECS, ids=lambda s: s.name.replace(" ", "_"))
def test_matches_authors(official, spec, backend):
    r = parity(official, spec, backend=backend)
    assert r["loss_rel_err"] < TOL, r
    assert r["grad_rel_err"] < TOL, r
    if spec.tight:  # the case exists to have the hinge both on and off
        assert 0.0 < r["zero_grad_rows"] < 1.0, r


@needs_repo
def test_index_bug_matters(official):
    """The corrected default reads each class's own pi and variance, so it departs from the authors' value."""
    r = parity(official, next(s for s in PARITY_SPECS if s.variant == "official-trained" and s.log_entropy == 1))
    assert r["corrected_vs_theirs_loss"] > 1e-3, r


# --------------------------------------------------------------------------- the loader, on fake checkouts

FAKE_GMM = """
raise RuntimeError("the module body must not run")
class GMMLike:
    def compute_class_means(self, features, labels, unique_labels, centroids_list):
        x = features.cuda()
        return (x * self.regularization_strength).sum() + len(unique_labels), None
"""
FAKE_PP = """
import os
os.remove("/")
class PPLike:
    def compute_class_means(self, features, labels, unique_labels, centroids_list, weights_list, variances_list):
        return 0.0, None
    def compute_class_means(self, features, labels, unique_labels, centroids_list, weights_list, variances_list):
        n = len(self.client_dataloader[0]) * self.batch_size
        return torch.tensor(float(n + self.num_class + self.log_entropy)) + F.relu(features).sum() * 0, None
"""


def _fake_repo(tmp_path, gmm=FAKE_GMM, pp=FAKE_PP):
    (tmp_path / GMM_FILE).write_text(gmm)
    (tmp_path / PP_FILE).write_text(pp)
    return tmp_path


def test_loader_runs_only_the_method(tmp_path):
    official = load_official(_fake_repo(tmp_path))
    z = torch.ones(4, 2, 1, 1)
    labels = torch.tensor([0, 1, 1, 3])
    assert float(official.gmm_loss(z, labels, [], sigma=0.5)) == 8 * 0.5 + 3  # .cuda() ran as the identity
    assert torch.Tensor.cuda is not None and torch.Tensor.cuda.__name__ == "cuda"  # the patch was undone
    pp = official.pp_loss(z, labels, [], [], [], num_classes=10, batches_per_epoch=7, batch_size=16, log_entropy=0)
    assert float(pp) == 7 * 16 + 10 + 0  # the last definition in the class wins, as in Python


def test_loader_rejects_non_checkouts(tmp_path):
    with pytest.raises(OfficialRepoError, match="not a directory"):
        load_official(tmp_path / "missing")
    (tmp_path / GMM_FILE).write_text(FAKE_GMM)
    with pytest.raises(OfficialRepoError, match=PP_FILE):
        load_official(tmp_path)
    with pytest.raises(TypeError, match="official_repo"):
        load_official(3)


def test_loader_rejects_unknown_globals(tmp_path):
    bad = FAKE_GMM.replace("features.cuda()", "helper(features)")
    with pytest.raises(OfficialRepoError, match="helper"):
        load_official(_fake_repo(tmp_path, gmm=bad))
