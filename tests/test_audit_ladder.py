"""cem_fast.audit.audit() on tiny stand-ins: every attack beats the mean image, adaptive >= decoder under
noise, stratified scoring of class-sorted data, any input form, and the report's files."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cem_fast.audit import audit

SIZE = 16
CLASSES = 10
# A small, quick ladder; whitebox starts from the mean image so that it is tested on its own.
FAST = {
    "max_train_images": 400,
    "max_test_images": 100,
    "decoder_loop.max_epochs": 6,
    "decoder.t_max": 6,
    "decoder_loop.patience": None,
    "adaptive_loop.max_epochs": 3,
    "adaptive.t_max": 3,
    "gan_loop.max_epochs": 1,
    "whitebox.start": "mean",
    "whitebox.steps": 150,
    "whitebox.lr": 0.05,
    "whitebox.n_images": 20,
    "whitebox.batch_size": 20,
    "bound_images": 400,
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n, seed):
    """Class-sorted smooth images in [0, 1]: a colour per class plus low-frequency detail."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(n // CLASSES)
    colour = torch.rand(CLASSES, 3, 1, 1, generator=torch.Generator().manual_seed(99))[labels]
    detail = nn.functional.interpolate(
        torch.rand(n, 3, 4, 4, generator=g), size=SIZE, mode="bilinear", align_corners=False
    )
    return (0.5 * colour + 0.5 * detail), labels


def _maps_encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))


def _flat_encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())


@pytest.fixture(scope="module")
def data():
    return _images(400, 0), _images(100, 1)


def _mean_image_mse(train_x, scored_x):
    return (scored_x - train_x.mean(0, keepdim=True)).pow(2).flatten(1).mean(1).mean().item()


@pytest.fixture(scope="module")
def undefended(data):
    (x, y), (xt, yt) = data
    torch.set_num_threads(1)
    return audit(
        _maps_encoder(),
        (x, y),
        test_data=(xt, yt),
        sigma=0.0,
        preset="smoke",
        overrides=FAST,
        attacks=("decoder", "whitebox", "adaptive", "gan"),
        progress=False,
    )


def test_every_attack_beats_the_mean_image_on_an_undefended_encoder(data, undefended):
    (x, _), (xt, _) = data
    records = undefended.attacks
    assert set(records) == {"decoder", "whitebox", "adaptive", "gan"}
    baseline = _mean_image_mse(x, xt)
    for name in ("decoder", "adaptive", "gan"):
        assert records[name]["n_scored"] == 100
        assert records[name]["mse"] < 0.3 * baseline, (name, records[name]["mse"], baseline)
    white = records["whitebox"]
    assert white["config"]["started_from"] == "mean" and white["n_scored"] == 20
    white_baseline = _mean_image_mse(x, xt[white["scored_indices"]])
    assert white["mse"] < 0.3 * white_baseline, (white["mse"], white_baseline)
    worst = undefended.worst
    assert worst["mse"] == min(r["mse"] for r in records.values())
    assert worst["ssim"] == max(r["ssim"] for r in records.values())
    assert records[worst["mse_attack"]]["mse"] == worst["mse"]


def test_records_carry_class_histograms_curves_and_times(undefended):
    for name, record in undefended.attacks.items():
        assert sum(record["scored_class_counts"]) == record["n_scored"]
        assert record["wall_time_s"] > 0 and record["learning_curve"]
        if name != "whitebox":
            assert sum(record["train_class_counts"]) == record["sizes"]["fit"]
            assert record["learning_curve"][0]["epoch"] == 0


def test_class_sorted_data_gets_balanced_scored_histograms(data):
    (x, y), _ = data  # class-sorted: 40 images of class 0, then 40 of class 1, ...
    report = audit(
        _maps_encoder(),
        (x, y),
        sigma=0.0,
        preset="smoke",
        attacks=("decoder", "whitebox"),
        overrides={**FAST, "decoder_loop.max_epochs": 1, "whitebox.steps": 2},
        progress=False,
    )
    assert report.setup["scored_class_counts"] == [4] * CLASSES  # 10% of 400, stratified
    assert report.attacks["decoder"]["scored_class_counts"] == [4] * CLASSES
    assert report.attacks["whitebox"]["scored_class_counts"] == [2] * CLASSES
    train_counts = report.attacks["decoder"]["train_class_counts"]
    assert max(train_counts) - min(train_counts) <= 1


def audit_under_noise(data, **overrides):
    """The decoder and adaptive attacks on the maps encoder at sigma 0.2, with ``FAST`` plus ``overrides``."""
    (x, y), (xt, yt) = data
    return audit(
        _maps_encoder(),
        (x, y),
        test_data=(xt, yt),
        sigma=0.2,
        preset="smoke",
        attacks=("decoder", "adaptive"),
        overrides={**FAST, **overrides},
        progress=False,
    )


def test_adaptive_is_at_least_as_strong_as_decoder_under_noise(data):
    report = audit_under_noise(data)
    dec, ada = report.attacks["decoder"], report.attacks["adaptive"]
    assert ada["mse"] <= dec["mse"], (ada["mse"], dec["mse"])
    assert ada["val_metrics"]["mse"] <= dec["val_metrics"]["mse"]
    assert report.theory["eq3_bound_nats"] is not None and "depends" in report.theory["note"]


class _OnlyImages(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_flat_features_datasets_of_x_loaders_callables_and_a_head(data, tmp_path):
    (x, y), (xt, yt) = data
    norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    xn, xtn = (x - 0.5) / 0.25, (xt - 0.5) / 0.25
    test_loader = DataLoader(list(zip(xtn, yt, torch.zeros(len(yt)))), batch_size=32)  # yields (x, y, extra)
    head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, CLASSES))
    report = audit(
        _flat_encoder(),
        _OnlyImages(xn),
        test_data=test_loader,
        normalization=norm,
        sigma=lambda z: z + 0.05 * torch.randn_like(z),
        head=head,
        preset="smoke",
        attacks=("decoder", "whitebox", "adaptive"),
        overrides={**FAST, "decoder_loop.max_epochs": 2, "adaptive_loop.max_epochs": 1, "whitebox.steps": 5},
        h_x=-1000.0,
        progress=False,
    )
    assert report.setup["feature_shape"] == [128] and report.setup["sigma"] == "callable"
    assert 0.0 <= report.accuracy["accuracy"] <= 1.0 and report.accuracy["n"] == 100
    assert report.theory["eq3_bound_nats"] is None, "a callable perturbation has no stated sigma"
    paths = report.write(tmp_path / "out")
    written = json.loads(paths["json"].read_text())
    assert set(written["attacks"]) == {"decoder", "whitebox", "adaptive"}
    assert {"mse", "psnr", "ssim", "n_scored", "scored_class_counts"} <= set(written["attacks"]["decoder"])
    assert written["worst"]["mse_attack"] in written["attacks"] and written["task"]["accuracy"] >= 0
    assert paths["figure"].stat().st_size > 1000 and "Worst case" in paths["markdown"].read_text()


def test_bad_inputs_are_clear_errors(data):
    (x, y), _ = data
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        audit(_maps_encoder(), (x * 255, y), sigma=0.0, progress=False)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        audit(_maps_encoder(), (x, y), normalization=((0.5,) * 3, (2.0,) * 3), sigma=0.0, progress=False)
    with pytest.raises(ValueError, match="the encoder failed on images of shape"):
        audit(nn.Conv2d(1, 4, 3), (x, y), sigma=0.0, progress=False)
    with pytest.raises(ValueError, match="attacks"):
        audit(_maps_encoder(), (x, y), attacks=("decoder", "magic"), progress=False)
    with pytest.raises(ValueError, match="sigma"):
        audit(_maps_encoder(), (x, y), sigma=-0.1, progress=False)
    with pytest.raises(TypeError, match="encoder"):
        audit(lambda v: v, (x, y), progress=False)
    with pytest.raises(ValueError, match="preset"):
        audit(_maps_encoder(), (x, y), preset="huge", progress=False)
    with pytest.raises(ValueError, match="override"):
        audit(_maps_encoder(), (x, y), overrides={"decoder.nope": 1}, progress=False)
