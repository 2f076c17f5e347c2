"""Reconstruction metrics against hand-computed values."""

import math

import pytest
import torch

from reproduce.metrics import (
    ReconstructionMeter,
    accuracy,
    mse_per_image,
    psnr_from_mse,
    psnr_per_image,
    ssim_per_image,
)


def _images(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_identical_images_mse_zero_ssim_one():
    x = _images()
    assert torch.equal(mse_per_image(x, x), torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(ssim_per_image(x, x), torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert torch.isinf(psnr_per_image(x, x)).all()


def test_constant_offset_mse_and_psnr_exact():
    x = torch.full((2, 3, 16, 16), 0.25)
    y = x + torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)
    assert torch.allclose(mse_per_image(y, x), torch.tensor([0.01, 0.04], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(
        psnr_per_image(y, x), torch.tensor([20.0, -10 * math.log10(0.04)], dtype=torch.float64), atol=1e-4
    )
    assert psnr_from_mse(0.001).item() == pytest.approx(30.0)


def test_ssim_lower_for_noisier_images_and_matches_torchmetrics_mean():
    from torchmetrics.functional.image import structural_similarity_index_measure

    x = _images(n=3, size=32)
    noise = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    slightly = (x + 0.02 * noise).clamp(0, 1)
    badly = (x + 0.3 * noise).clamp(0, 1)
    s1, s2 = ssim_per_image(slightly, x), ssim_per_image(badly, x)
    assert (s1 > s2).all() and (s1 < 1).all()
    expected = structural_similarity_index_measure(slightly, x, data_range=1.0)
    assert s1.mean().item() == pytest.approx(expected.item(), abs=1e-6)


def test_meter_per_image_vs_authors_per_batch_psnr():
    target = torch.zeros(2, 3, 8, 8)
    # Batch 1: one image at MSE 0.01 (20 dB) and one at MSE 0.0001 (40 dB).
    recon = torch.stack([torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), 0.01)])
    meter = ReconstructionMeter()
    meter.update(recon, target)
    # Batch 2: a single image at MSE 0.0001 (40 dB).
    meter.update(torch.full((1, 3, 8, 8), 0.01), torch.zeros(1, 3, 8, 8))
    out = meter.compute()
    assert out["n_images"] == 3
    assert out["mse"] == pytest.approx((0.01 + 0.0001 + 0.0001) / 3)
    assert out["psnr"] == pytest.approx((20 + 40 + 40) / 3, abs=1e-4)
    batch1 = -10 * math.log10((0.01 + 0.0001) / 2)
    assert out["psnr_per_batch_authors"] == pytest.approx((batch1 + 40) / 2, abs=1e-4)
    assert abs(out["psnr"] - out["psnr_per_batch_authors"]) > 1.5


def test_meter_sums_batches_like_one_big_batch():
    x, y = _images(n=6, seed=2), _images(n=6, seed=3)
    whole, split = ReconstructionMeter(), ReconstructionMeter()
    whole.update(x, y)
    for a, b in ((x[:1], y[:1]), (x[1:4], y[1:4]), (x[4:], y[4:])):
        split.update(a, b)
    w, s = whole.compute(), split.compute()
    for key in ("mse", "psnr", "ssim"):
        assert s[key] == pytest.approx(w[key], rel=1e-9)


def test_meter_errors():
    meter = ReconstructionMeter()
    with pytest.raises(ValueError, match="before any update"):
        meter.compute()
    with pytest.raises(ValueError, match="shape"):
        meter.update(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 9))
    with pytest.raises(TypeError, match="reconstruction"):
        meter.update([0.0], torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="target"):
        meter.update(torch.zeros(2, 3, 8, 8), torch.zeros(3, 8, 8))


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 0])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, torch.tensor([0, 1]))
