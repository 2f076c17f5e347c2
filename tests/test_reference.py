"""The float64 reference itself: gradcheck of every variant, and hand-computed values."""

import math

import pytest
import torch
from helpers import random_state

from cem_fast.reference import reference_loss


@pytest.mark.parametrize(
    "variant,cov", [("paper", "diag"), ("paper", "full"), ("official", "diag"), ("official-trained", "diag")]
)
def test_gradcheck(variant, cov):
    gen = torch.Generator().manual_seed(7)
    C, m, D = 2, 2, 4
    cent, pi, var = random_state(variant, C, m, D, covariance=cov, gen=gen)
    z = torch.rand(6, D, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    kw = dict(variant=variant, pi=pi, variance=var, dataset_size=50, covariance=cov, var_threshold=0.001, log_entropy=1)
    assert torch.autograd.gradcheck(lambda t: reference_loss(t, y, cent, **kw)[0], (z,))


def test_official_by_hand():
    cent = torch.zeros(1, 1, 2, dtype=torch.float64)
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    loss, _, _ = reference_loss(z, y, cent, variant="official", sigma=0.1)
    v = torch.tensor([5.0, 0.0], dtype=torch.float64)  # mean of squares per dim
    assert float(loss) == pytest.approx(float(torch.log(v + 0.01 + 1e-6).mean()), rel=1e-14)


def test_paper_by_hand_single_cluster():
    cent = torch.zeros(1, 1, 1, dtype=torch.float64)
    z = torch.tensor([[0.2]], dtype=torch.float64)
    pi = torch.ones(1, 1, dtype=torch.float64)
    var = torch.tensor([[[0.5]]], dtype=torch.float64)
    loss, new_pi, new_var = reference_loss(
        z, torch.tensor([0]), cent, variant="paper", sigma=0.5, pi=pi, variance=var, dataset_size=4
    )
    # pi stays 1; alpha = 1/(1*4) = 0.25; Sigma = 0.75*0.5 + 0.25*0.04 = 0.385
    assert float(new_pi) == pytest.approx(1.0)
    assert float(new_var) == pytest.approx(0.385)
    assert float(loss) == pytest.approx(0.5 * math.log(0.385 + 0.25) - 0.5 * math.log(0.25))
