"""FeatureBank: every row kept under the quota (in arrival order), a uniform reservoir past it."""

import pytest
import torch

from cem_fast.feature_bank import FeatureBank


def test_keeps_the_whole_epoch_in_arrival_order_under_the_quota():
    gen = torch.Generator().manual_seed(0)
    bank = FeatureBank(num_classes=4, per_class=100)
    xs, ys = [], []
    for _ in range(7):
        x, y = torch.randn(13, 2, 3, generator=gen), torch.randint(0, 4, (13,), generator=gen)
        bank.add(x, y)
        xs.append(x.reshape(13, 6))
        ys.append(y)
    x, y = bank.features()
    assert torch.equal(x, torch.cat(xs)) and torch.equal(y, torch.cat(ys))
    assert bank.seen == 91 and len(bank) == 91
    assert bank.nbytes >= 91 * 6 * 4


def test_reservoir_is_bounded_and_uniform():
    per_class, n = 50, 2000
    hits = torch.zeros(n)
    for seed in range(40):
        bank = FeatureBank(num_classes=2, per_class=per_class, seed=seed)
        stream = torch.arange(n, dtype=torch.float32)[:, None]
        labels = torch.arange(n) % 2
        for s in range(0, n, 64):
            bank.add(stream[s : s + 64], labels[s : s + 64])
        x, y = bank.features()
        assert x.shape == (2 * per_class, 1) and bank.seen == n
        assert int((y == 0).sum()) == per_class
        assert torch.equal(y, labels[x[:, 0].long()])  # every kept row keeps its own label
        assert len(set(x[:, 0].tolist())) == 2 * per_class  # no row kept twice
        hits[x[:, 0].long()] += 1
    # each row is kept with probability per_class / (n / 2) = 0.05: first and second half alike
    first, second = hits[: n // 2].mean(), hits[n // 2 :].mean()
    assert abs(float(first) - 40 * 0.05) < 0.4 and abs(float(second) - 40 * 0.05) < 0.4


def test_clear_and_errors():
    bank = FeatureBank(num_classes=3, per_class=10)
    bank.add(torch.randn(4, 5), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="features per sample"):
        bank.add(torch.randn(4, 6), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="labels must lie in"):
        bank.add(torch.randn(2, 5), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="per_class"):
        FeatureBank(3, per_class=2.5)
    bank.clear()
    assert bank.seen == 0 and len(bank) == 0
    with pytest.raises(ValueError, match="empty"):
        bank.features()
