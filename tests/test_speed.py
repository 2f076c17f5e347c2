"""The trainer's speed options (channels_last, bf16 autocast, torch.compile) and the batched data pipeline."""

import json
import math

import pytest
import torch
from helpers import TINY_TRAIN, restore_threads, run_metrics, tiny_run  # noqa: F401 (a fixture)

from reproduce import speed, train
from reproduce.data import load_dataset
from reproduce.data.augment import set_augmentation
from reproduce.data.batched import BatchedImages
from reproduce.data.datasets import ImageTensorDataset, dataset_info
from reproduce.ddp import Dist
from reproduce.models import build_split_model
from reproduce.train_data import train_loader

TINY = [
    "--preset",
    "smoke",
    "--arch",  # cpu-full's model, the one the speed options are measured and turned on for (smoke's is ResNet-20)
    "vgg11_bn",
    *TINY_TRAIN[2:],
]
NEEDS_BF16 = pytest.mark.skipif(not speed.bf16_supported(), reason="this CPU has no oneDNN bf16 kernels")


pytestmark = pytest.mark.usefixtures("restore_threads")


def _run(tmp_path, *extra, name="run"):
    return tiny_run(tmp_path, *extra, name=name, base=TINY)


_metrics = run_metrics


def _cfg(*argv):
    return train.resolve_config(train.build_parser().parse_args(["--out", "x", *argv]))


_OPTIONS = {
    "channels_last": ["--channels-last"],
    "bf16_autocast": ["--bf16-autocast"],
    "data_pipeline": ["--data-pipeline", "batched", "--augment", "crop-flip"],
}


@pytest.mark.parametrize("option", list(_OPTIONS))
def test_each_option_trains_with_a_finite_loss_and_is_recorded(tmp_path, option):
    if option == "bf16_autocast" and not speed.bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 kernels")
    out = _run(tmp_path, "--defense", "noise_nopeek", "--cem-lambda", "16", "--epochs", "2", *_OPTIONS[option])
    rows = _metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["ce"]) for r in rows)
    assert rows[1]["cem"] > 0  # CEM ran on the option's z
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[option] == ("batched" if option == "data_pipeline" else True)
    others = {"channels_last": False, "bf16_autocast": False, "compile": False, "data_pipeline": "per-image"}
    assert {k: cfg[k] for k in others if k != option} == {k: v for k, v in others.items() if k != option}
    assert cfg["machine"]["cpu"] and cfg["machine"]["cores"] >= 1


def _speed_settings(c):
    return c["channels_last"], c["bf16_autocast"], c["compile"], c["data_pipeline"]


def test_the_options_are_off_outside_cpu_full(tmp_path, monkeypatch):
    for name in ("smoke", "cpu", "paper"):
        assert _speed_settings(_cfg("--preset", name)) == (False, False, False, "per-image")
    full = ["--preset", "cpu-full", "--data-root", str(tmp_path), "--device", "cpu"]
    for supported in (True, False):  # cpu-full: bf16 where the CPU has the kernels, recorded as a bool
        monkeypatch.setattr(speed, "bf16_supported", lambda *_: supported)
        assert _speed_settings(_cfg(*full)) == (True, supported, False, "batched")
    off = _cfg(*full, "--no-channels-last", "--no-bf16-autocast", "--data-pipeline", "per-image")
    assert _speed_settings(off) == (False, False, False, "per-image")
    with pytest.raises(ValueError, match="data-pipeline batched"):  # the preset's pipeline cannot rotate
        _cfg(*full, "--augment", "authors")


def test_channels_last_gives_the_default_loss_at_float32(tmp_path):
    """channels_last runs other fp32 conv algorithms (which ones depends on the ISA): the first epoch agrees
    with the default layout to rounding (3e-7 relative on an AVX2-only AMD EPYC). SGD then amplifies that
    rounding, by the second epoch to 3.4e-4 relative in the CE on that machine, so the second epoch and the
    weights (all together, in norm) get a looser bar (a layout bug moves them by O(1))."""
    args = ["--defense", "noise", "--cem-lambda", "16", "--epochs", "2"]
    base = _run(tmp_path, *args, name="base")
    cl = _run(tmp_path, *args, "--channels-last", name="cl")
    a, b = _metrics(base), _metrics(cl)
    for key in ("loss", "ce", "cem", "feature_var"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-5, abs=1e-7), key
        assert b[-1][key] == pytest.approx(a[-1][key], rel=2e-3, abs=1e-7), key
    sa = torch.load(base / "final.pt", weights_only=False)["model"]
    sb = torch.load(cl / "final.pt", weights_only=False)["model"]
    assert sa.keys() == sb.keys()
    assert all(sb[k].is_contiguous() for k in sb)  # the checkpoint is in the default layout
    floats = [k for k in sa if sa[k].is_floating_point()]
    diff = torch.cat([(sb[k] - sa[k]).flatten().double() for k in floats]).norm()
    # all weights together: single tensors near zero (the conv biases before BN, ~1e-8) drift by more
    assert diff <= 1e-3 * torch.cat([sa[k].flatten().double() for k in floats]).norm()


def test_channels_last_model_hands_z_on_in_the_default_layout():
    torch.manual_seed(0)
    model = build_split_model("vgg11_bn", 10, 4, 32).train()
    keys = list(model.state_dict())
    speed.apply_speed_options(model, {"channels_last": True})
    assert list(model.state_dict()) == keys
    assert model.encoder.layers[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = speed.to_batch_format(torch.randn(4, 3, 32, 32), {"channels_last": True})
    assert x.is_contiguous(memory_format=torch.channels_last)
    z = model.encoder(x)
    assert z.is_contiguous() and z.dtype == torch.float32
    assert speed.to_batch_format(torch.randn(2, 3, 4, 4), {}).is_contiguous()


def test_bf16_autocast_follows_the_input_device_and_auto_asks_that_device(tmp_path, monkeypatch):
    """The autocast region is the batch's device type (a GPU run gets CUDA autocast, as its CPU-trained pair
    got CPU autocast), and the cpu-full preset's "auto" asks the run's device for bf16 kernels."""
    import contextlib

    seen = []

    def fake_autocast(device_type, dtype):
        seen.append((device_type, dtype))
        return contextlib.nullcontext()

    layers = speed._as(speed._Bf16Autocast, torch.nn.Sequential(torch.nn.Identity())).train()
    monkeypatch.setattr(speed.torch, "autocast", fake_autocast)
    layers(torch.zeros(2, 3))
    assert seen == [("cpu", torch.bfloat16)]
    asked = []
    monkeypatch.setattr(speed, "bf16_supported", lambda device_type="cpu": asked.append(device_type) or False)
    cfg = _cfg("--preset", "cpu-full", "--data-root", str(tmp_path), "--device", "cpu")
    assert cfg["bf16_autocast"] is False and asked[0] == "cpu"


@NEEDS_BF16
def test_bf16_autocast_runs_the_conv_stacks_in_bf16_and_keeps_z_fp32():
    torch.manual_seed(0)
    model = build_split_model("vgg11_bn", 10, 4, 32).train()
    keys = list(model.state_dict())
    speed.apply_speed_options(model, {"bf16_autocast": True})
    assert list(model.state_dict()) == keys
    seen = {}
    model.encoder.layers[0].register_forward_hook(lambda m, i, o: seen.__setitem__("enc", o.dtype))
    model.server.features.layers[0].register_forward_hook(lambda m, i, o: seen.__setitem__("srv", o.dtype))
    x = torch.randn(4, 3, 32, 32)
    z = model.encoder(x)
    logits = model.server(z + 0.025 * torch.randn_like(z))
    assert seen == {"enc": torch.bfloat16, "srv": torch.bfloat16}
    assert z.dtype == torch.float32 and logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    model.eval()  # evaluation in float32
    with torch.no_grad():
        model.server(model.encoder(x))
    assert seen == {"enc": torch.float32, "srv": torch.float32}


def test_bf16_autocast_is_refused_without_cpu_support(monkeypatch):
    monkeypatch.setattr(speed, "bf16_supported", lambda *_: False)
    with pytest.raises(ValueError, match="bf16-autocast.*no bf16 support"):
        _cfg("--preset", "smoke", "--bf16-autocast", "--device", "cpu")
    with pytest.raises(SystemExit):
        train.main([*TINY, "--out", "unused", "--bf16-autocast", "--device", "cpu"])
    monkeypatch.setattr(speed, "bf16_supported", lambda device_type="cpu": device_type == "cpu")
    with pytest.raises(ValueError, match="no CUDA GPU with bf16"):
        speed.check_speed_options({"bf16_autocast": True, "device": "cuda"})
    with pytest.raises(ValueError, match="CPU or a CUDA GPU"):
        speed.check_speed_options({"bf16_autocast": True, "device": "meta"})
    with pytest.raises(ValueError, match="float32"):
        speed.check_speed_options({"bf16_autocast": True, "device": "cpu", "dtype": "float64"})
    with pytest.raises(ValueError, match="patrol"):
        _cfg("--preset", "smoke", "--compile", "--defense", "patrol")


@NEEDS_BF16
def test_resume_with_the_options_gives_the_uninterrupted_run(tmp_path):
    args = ["--defense", "noise", "--cem-lambda", "16", "--epochs", "3", "--channels-last", "--bf16-autocast"]
    args += ["--data-pipeline", "batched", "--augment", "crop-flip"]
    full = _run(tmp_path, *args, name="full")
    part = _run(tmp_path, *args, "--stop-after-epoch", "1", name="part")
    state = torch.load(part / "checkpoint.pt", weights_only=False)
    assert all(v.is_contiguous() for v in state["model"].values())
    _run(tmp_path, *args, "--resume", name="part")
    a = torch.load(full / "final.pt", weights_only=False)["model"]
    b = torch.load(part / "final.pt", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in _metrics(full)] == [r["loss"] for r in _metrics(part)]
    with pytest.raises(SystemExit):  # the stored settings bind on resume
        train.main([*TINY, "--out", str(part), *args[:6], "--data-pipeline", "per-image", "--resume"])


def test_a_run_from_before_the_options_existed_resumes(tmp_path):
    args = ["--defense", "noise", "--cem-lambda", "0", "--epochs", "2"]
    out = _run(tmp_path, *args, "--stop-after-epoch", "1")
    config = json.loads((out / "config.json").read_text())
    for key in ("channels_last", "bf16_autocast", "compile", "data_pipeline", "machine"):
        config.pop(key)
    (out / "config.json").write_text(json.dumps(config))
    assert train.main([*TINY, "--out", str(out), *args, "--resume"]) == 0
    assert [r["epoch"] for r in _metrics(out)] == [1, 2]


# ----------------------------------------------------------------------------- the batched data pipeline


def test_batched_pipeline_normalises_exactly_as_the_per_image_transform():
    ds = load_dataset("cifar10-sample", "train", augment=False)
    sub = torch.utils.data.Subset(torch.utils.data.Subset(ds, range(100, 300)), [5, 7, 190])
    batched = BatchedImages(sub, "none")
    x, y = batched[[2, 0]]
    ref = torch.stack([sub[2][0], sub[0][0]])
    assert torch.equal(x, ref) and y.tolist() == [sub[2][1], sub[0][1]]
    assert len(batched) == 3
    with pytest.raises(ValueError, match="augment"):
        BatchedImages(ds, "authors")
    with pytest.raises(TypeError, match="in memory"):
        BatchedImages(torch.utils.data.TensorDataset(torch.zeros(2, 3, 4, 4)), "none")
    with pytest.raises(ValueError, match="data-pipeline batched"):
        _cfg("--preset", "smoke", "--data-pipeline", "batched", "--augment", "authors")


def test_without_augmentation_the_batched_pipeline_trains_the_per_image_run(tmp_path):
    args = ["--defense", "noise", "--cem-lambda", "16", "--epochs", "2", "--no-augment"]
    a = _run(tmp_path, *args, name="per_image")
    b = _run(tmp_path, *args, "--data-pipeline", "batched", name="batched")
    sa = torch.load(a / "final.pt", weights_only=False)["model"]
    sb = torch.load(b / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same batches, same normalisation, same noise draws
    assert [r["loss"] for r in _metrics(a)] == [r["loss"] for r in _metrics(b)]


def test_batched_loader_draws_the_per_image_loaders_batches():
    ds = load_dataset("cifar10-sample", "train", augment=True)
    set_augmentation(ds, "crop-flip")
    sub = torch.utils.data.Subset(ds, range(37))
    labels = {}
    for pipeline in ("per-image", "batched"):
        cfg = {"batch_size": 8, "workers": 0, "data_pipeline": pipeline, "augment": "crop-flip"}
        gen = torch.Generator().manual_seed(3)
        loader, sampler, per_epoch = train_loader(sub, cfg, Dist(torch.device("cpu")), torch.device("cpu"), gen)
        labels[pipeline] = [[y.tolist() for _, y in loader] for _ in range(2)]  # two epochs
        assert sampler is None and per_epoch == 37
        assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x, _ in loader)
    assert labels["per-image"] == labels["batched"]


def _marker_images(n: int) -> torch.Tensor:
    """32 px uint8 images whose channel 0 is row + 1 and channel 1 is column + 1 (so a crop's offset shows)."""
    r = torch.arange(1, 33, dtype=torch.uint8)
    img = torch.stack(
        [r.view(32, 1).expand(32, 32), r.view(1, 32).expand(32, 32), torch.full((32, 32), 200, dtype=torch.uint8)]
    )
    return img.to(torch.uint8).expand(n, 3, 32, 32).contiguous()


def _offsets(x: torch.Tensor, info) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flipped) of normalised crop + flip outputs of ``_marker_images`` (offsets 0..8 of the padded image)."""
    scale = 1.0 / (255.0 * torch.tensor(info.std)).view(1, -1, 1, 1)
    shift = (torch.tensor(info.mean) / torch.tensor(info.std)).view(1, -1, 1, 1)
    u = ((x + shift) / scale).round().long()
    flipped = u[:, 1, 16, 17] < u[:, 1, 16, 16]
    dy = u[:, 0, 16, 16] - 13
    dx = torch.where(flipped, u[:, 1, 16, 15], u[:, 1, 16, 16]) - 13
    return dy, dx, flipped


def _augmented_markers(kind: str, n: int, seed: int):
    """``n`` marker images augmented with ``kind`` per image and by the batched pipeline (batches of 128)."""
    info = dataset_info("cifar10")
    ds = ImageTensorDataset(_marker_images(n), torch.zeros(n, dtype=torch.long), info, True, ["c"] * 10, "markers")
    set_augmentation(ds, kind)
    torch.manual_seed(seed)
    per_image = torch.stack([ds[i][0] for i in range(n)])
    batched_ds = BatchedImages(ds, kind)
    batched = torch.cat([batched_ds[list(range(i, min(i + 128, n)))][0] for i in range(0, n, 128)])
    return per_image, batched, info


def test_batched_augmentation_has_the_per_image_distribution():
    n = 4500
    per_image, batched, info = _augmented_markers("crop-flip", n, seed=11)
    expected, sd = n / 9, math.sqrt(n * (1 / 9) * (8 / 9))
    for x in (per_image, batched):
        dy, dx, flipped = _offsets(x, info)
        for d in (dy, dx):
            counts = torch.bincount(d, minlength=9)
            assert len(counts) == 9 and d.min() >= 0  # offsets 0..8 only
            assert ((counts - expected).abs() < 5 * sd).all(), counts.tolist()
        assert abs(flipped.float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)
        assert abs(torch.corrcoef(torch.stack([dy.float(), dx.float()]))[0, 1].item()) < 0.1  # drawn apart
    assert not torch.equal(per_image, batched)  # the same distribution, not the same draws


def test_compile_trains_with_a_finite_loss(tmp_path):
    out = _run(tmp_path, "--defense", "noise_nopeek", "--cem-lambda", "16", "--epochs", "2", "--compile")
    rows = _metrics(out)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[1]["cem"] > 0
    assert json.loads((out / "config.json").read_text())["compile"] is True
    state = torch.load(out / "final.pt", weights_only=False)["model"]
    assert not any("_orig_mod" in k for k in state)  # the uncompiled model's keys


def test_batched_flip_only_flips_half_and_never_crops():
    n = 2000
    per_image, batched, info = _augmented_markers("flip", n, seed=12)
    for x in (per_image, batched):
        dy, dx, flipped = _offsets(x, info)
        assert (dy == 4).all() and (dx == 4).all()  # the centre crop: offset 4 of the 4-px-padded image
        assert abs(flipped.float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)
