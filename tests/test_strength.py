"""CEM strength in the paper's units (reproduce.strength)."""

import pytest
import torch

from reproduce.strength import config_paper_units, from_paper_units, paper_units


def test_paper_variant_scales_with_the_training_set_size():
    assert paper_units(16, "paper", 50_000) == pytest.approx(16)
    assert paper_units(16, "paper", 10_000) == pytest.approx(80)
    assert paper_units(16, "paper", 3_000) == pytest.approx(266.667, rel=1e-4)  # the demo
    assert from_paper_units(80, "paper", 10_000) == pytest.approx(16)
    assert from_paper_units(80, "paper", 50_000) == pytest.approx(80)
    assert paper_units(16, "official", 10_000) == 16  # per-batch variances: no N in the loss


def test_official_schedule_reports_the_lr_tied_weight():
    assert paper_units(16, "official-trained", 50_000, lr=0.05, schedule="official") == pytest.approx(0.32)
    assert paper_units(16, "official-trained", 10_000, lr=0.05, schedule="official") == pytest.approx(1.6)
    assert paper_units(16, "paper", 50_000, lr=1e-4, schedule="official") == pytest.approx(16)  # LR < 4.1e-4
    with pytest.raises(ValueError, match="lr"):
        paper_units(16, "paper", 50_000, schedule="official")


def test_bad_input_names_the_argument():
    for kwargs, name in (
        ({"lam": -1}, "lam"),
        ({"variant": "x"}, "variant"),
        ({"n_train": 0}, "n_train"),
        ({"schedule": "cosine"}, "schedule"),
        ({"batch_size": 0}, "batch_size"),
    ):
        args = {"lam": 16, "variant": "paper", "n_train": 10_000, **kwargs}
        with pytest.raises(ValueError, match=name):
            paper_units(**args)
    with pytest.raises(ValueError, match="capped"):
        paper_units(16, "official-trained", 1_000)


def test_paper_variant_gradient_per_sample_is_inverse_in_n():
    """The premise of the units, checked on the loss itself: same batch, same clusters, N x 5 -> gradient / 5."""
    from cem_fast import CEMLoss

    g = torch.Generator().manual_seed(0)
    z = torch.rand(64, 16, generator=g, dtype=torch.float64)
    y = torch.arange(64) % 4
    grads = []
    for n in (10_000, 50_000):
        cem = CEMLoss(
            num_classes=4, clusters_per_class=1, sigma=0.025, variant="paper", dataset_size=n, backend="torch"
        )
        cem.refit(z, y)
        zz = z.clone().requires_grad_(True)
        cem(zz, y).backward()
        grads.append(zz.grad.abs().sum())
    ratio = float(grads[0] / grads[1])
    assert ratio == pytest.approx(paper_units(1, "paper", 10_000), rel=0.02)


def test_config_paper_units_reads_a_run_config():
    from reproduce import train

    cfg = train.resolve_config(train.build_parser().parse_args(["--out", "x", "--preset", "cpu"]))
    assert config_paper_units(cfg, cfg["train_subset"]) == pytest.approx(80)  # lambda 16 at 10,000 images
    cfg = train.resolve_config(
        train.build_parser().parse_args(
            ["--out", "x", "--preset", "cpu-full", "--cem-variant", "official-trained", "--cem-schedule", "official"]
        )
    )
    assert config_paper_units(cfg, 50_000) == pytest.approx(0.32)


def test_figure4_labels_carry_the_paper_units():
    from reproduce.figures_curves import _paper_units

    cfg = {"cem_lambda": 16.0, "cem_variant": "paper", "train_size": 10_000, "lr": 0.05, "batch_size": 128}
    assert _paper_units([cfg, dict(cfg)]) == [80.0]  # lambda 16 at N = 10,000 pushes like 80 at 50,000
    assert _paper_units([{**cfg, "cem_lambda": 0.0}]) == []
    assert _paper_units([cfg, {**cfg, "train_size": 50_000}]) == [16.0, 80.0]


def test_run_paper_units_reads_a_runs_config():
    from reproduce.strength import config_paper_units, run_paper_units

    cfg = {"cem_lambda": 16.0, "cem_variant": "paper", "lr": 0.05, "batch_size": 128, "train_size": 10_000}
    assert run_paper_units(cfg) == config_paper_units(cfg, 10_000) == pytest.approx(80.0)
    assert run_paper_units({**cfg, "cem_lambda": 0}) is None
    assert run_paper_units({k: v for k, v in cfg.items() if k != "train_size"}) is None
