"""Presets, the short-run LR schedule and the named augmentations."""

import pickle

import pytest
import torch

from reproduce import train
from reproduce.data.augment import build_augmentation, check_augmentation, crop_flip_batch, set_augmentation
from reproduce.presets import PRESETS, preset
from reproduce.schedules import LRFactor, default_warmup


def _cfg(*argv):
    return train.resolve_config(train.build_parser().parse_args(["--out", "x", *argv]))


def test_cpu_presets_use_the_short_run_schedule_and_crop_flip(tmp_path):
    cpu = preset("cpu")
    assert (cpu["epochs"], cpu["train_subset"], cpu["test_subset"]) == (15, 10_000, 2_000)
    assert (cpu["lr_schedule"], cpu["augment"], cpu["lr"]) == ("warmup-cosine", "flip", 0.05)
    full = _cfg("--preset", "cpu-full", "--data-root", str(tmp_path), "--cem-lambda", "0", "--defense", "noise")
    assert (full["train_subset"], full["test_subset"], full["dataset"]) == (None, None, "cifar10")
    assert (full["arch"], full["cut"], full["bottleneck"], full["epochs"]) == ("vgg11_bn", 4, "noRELU_C8S1", 25)
    assert full["lr_schedule"] == "warmup-cosine" and full["augment"] == "crop-flip"
    paper = preset("paper")
    assert (paper["lr_schedule"], paper["augment"]) == ("paper", True)  # the paper's schedule stays
    assert _cfg("--preset", "cpu", "--augment", "authors")["augment"] == "authors"
    assert _cfg("--preset", "cpu", "--no-augment")["augment"] is False
    assert set(PRESETS) == {"smoke", "cpu", "cpu-full", "paper"}


def test_warmup_cosine_factors():
    f = LRFactor("warmup-cosine", 15)
    values = [f(e) for e in range(15)]
    assert f.warmup == 1 and values[0] == pytest.approx(0.5) and values[1] == 1.0
    assert all(a > b for a, b in zip(values[1:], values[2:]))  # decreasing after the warm-up
    assert 0 < values[-1] < 0.02
    assert default_warmup(25) == 2 and default_warmup(1) == 0 and default_warmup(240) == 24
    g = LRFactor("warmup-cosine", 25)
    assert [round(g(e), 4) for e in range(3)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0]
    with pytest.raises(ValueError, match="warmup"):
        LRFactor("warmup-cosine", 10, warmup=10)
    with pytest.raises(ValueError, match="warmup"):
        LRFactor("paper", 10, warmup=2)
    assert LRFactor("paper", 10).warmup == 0
    # the scheduler state (with its factor) travels in a checkpoint
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * f(3))
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, LRFactor("warmup-cosine", 15))
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 3


def test_named_augmentations():
    assert check_augmentation(True) == "authors" and check_augmentation(False) == "none"
    with pytest.raises(ValueError, match="augment"):
        check_augmentation("rotate")
    names = [type(t).__name__ for t in build_augmentation("crop-flip", "cifar10", 32).transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip"]
    assert "RandomRotation" in [type(t).__name__ for t in build_augmentation("authors", "cifar10", 32).transforms]
    assert build_augmentation("none", "cifar10", 32) is None
    assert type(build_augmentation("flip", "cifar10", 32)).__name__ == "RandomHorizontalFlip"

    from reproduce.data import load_dataset

    ds = load_dataset("cifar10-sample", "train", augment=True)
    set_augmentation(torch.utils.data.Subset(ds, range(10)), "crop-flip")
    assert [type(t).__name__ for t in ds.transform.augment.transforms] == names
    set_augmentation(ds, "none")
    plain = load_dataset("cifar10-sample", "train", augment=False)
    assert torch.equal(ds[3][0], plain[3][0])
    with pytest.raises(TypeError, match="load_dataset"):
        set_augmentation(torch.utils.data.TensorDataset(torch.zeros(2)), "none")


def _window(img, dy, dx, flip):
    w = img[:, dy : dy + 8, dx : dx + 8]
    return w.flip(2) if flip else w


def test_crop_flip_batch_gives_shifted_and_flipped_windows():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=g)
    out = crop_flip_batch(images, padding=2, generator=g)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for img, res in zip(padded, out):
        windows = {
            (dy, dx, f)
            for dy in range(5)
            for dx in range(5)
            for f in (False, True)
            if torch.equal(_window(img, dy, dx, f), res)
        }
        assert windows, "every output is a crop (optionally flipped) of the padded image"
        flips += all(f for *_, f in windows)
    assert 0 < flips < 32
    same = crop_flip_batch(images, padding=0, generator=g)
    assert all(torch.equal(a, b) or torch.equal(a.flip(2), b) for a, b in zip(images, same))
    with pytest.raises(ValueError, match="padding"):
        crop_flip_batch(images, padding=-1)
    with pytest.raises(ValueError, match="images"):
        crop_flip_batch(images[0])
