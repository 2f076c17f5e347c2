"""Decoder and GAN inversion attacks on tiny stand-ins (a small conv encoder, 16 px images)."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import reproduce.attacks.decoder as decoder_module
import reproduce.attacks.gan as gan_module
from reproduce.attacks import (
    DecoderAttackConfig,
    FeatureSet,
    GANAttackConfig,
    build_inversion_decoder,
    compute_features,
    gaussian_perturbation,
    gradient_penalty,
    load_best_decoder,
    make_perturbation,
    run_decoder_attack,
    run_gan_attack,
    split_infer_time,
    split_train_val,
)
from reproduce.attacks.features import defence_noise_sigma

SIZE = 16
TINY_DECODER = dict(num_blocks=1, width=8)


class _Images(Dataset):
    """Smooth random images (low-frequency, so a small decoder can fit them), normalised to [-1, 1]."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, 4, 4, generator=g)
        self.x = nn.functional.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=False) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions: one thread is faster and does not stall when the machine is busy.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _denormalize(x):
    return (x + 1) / 2


def _encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2), nn.Sigmoid())


@pytest.fixture(scope="module")
def data():
    enc = _encoder()
    train = compute_features(enc, _Images(48, 0), _denormalize, batch_size=16, progress=False)
    test = compute_features(enc, _Images(12, 1), _denormalize, batch_size=16, progress=False)
    return train, test


def _finite(metrics):
    return all(math.isfinite(v) for v in metrics.values())


# ---------------------------------------------------------------- features, splits, noise

def test_compute_features_shapes_images_and_eval_mode():
    enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AvgPool2d(2))
    enc.train()
    ds = _Images(10, 3)
    fs = compute_features(enc, ds, _denormalize, batch_size=4, indices=[1, 3, 5], progress=False)
    assert enc.training, "the encoder's mode must be restored"
    assert fs.smashed_shape == (4, 8, 8) and fs.image_shape == (3, SIZE, SIZE) and len(fs) == 3
    expected = (_denormalize(ds.x[[1, 3, 5]]) * 255).round().to(torch.uint8)
    assert torch.equal(fs.images, expected)
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(fs.features, enc(ds.x[[1, 3, 5]]), atol=1e-6)


def test_splits():
    fit, val = split_train_val(100, 0.1, seed=3)
    assert len(val) == 10 and len(fit) == 90
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(100))
    assert torch.equal(split_train_val(100, 0.1, seed=3)[1], val)
    first, last = split_infer_time(10_000)
    assert first[-1] == 8999 and last[0] == 9000 and len(last) == 1000
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(10, 1.5, seed=0)


def test_perturbations():
    z = torch.zeros(2000, 8)
    noisy = gaussian_perturbation(0.1)(z)
    assert abs(noisy.std().item() - 0.1) < 0.005
    assert gaussian_perturbation(0.0)(z) is z
    assert not torch.equal(gaussian_perturbation(0.1)(z), gaussian_perturbation(0.1)(z)), "fresh noise per call"

    class Dropper:
        def perturb(self, z):
            return z * 0

    assert torch.equal(make_perturbation(Dropper(), noise_aware=True)(z + 1), z)
    assert make_perturbation(Dropper())(z) is z, "no noise part: the default attack sees clean features"
    with pytest.raises(ValueError, match="noise_aware"):
        make_perturbation(None, noise_aware=True)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_perturbation(-1.0)


def test_noise_sigma_of_real_defences():
    from reproduce.defences import build_defence, with_noise

    assert defence_noise_sigma(build_defence("noise", sigma=0.05)) == 0.05
    assert defence_noise_sigma(build_defence("nopeek")) == 0.0
    assert defence_noise_sigma(with_noise(build_defence("dropout"), 0.1)) == 0.1
    assert defence_noise_sigma(build_defence("noise_nopeek", sigma=0.01)) == 0.01
    assert defence_noise_sigma(None) == 0.0


# ---------------------------------------------------------------- decoder attack

def test_decoder_attack_learns_and_reports_finite_metrics(data, tmp_path):
    train, test = data
    config = DecoderAttackConfig(epochs=4, batch_size=8, lr=1e-2, num_samples=3, **TINY_DECODER)
    result = run_decoder_attack(train, test, gaussian_perturbation(0.01), config, state_dir=tmp_path,
                                progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    assert _finite(result.test_metrics) and result.test_metrics["n_images"] == len(test)
    assert result.sizes == {"fit": 43, "val": 5, "test": 12}
    best_val = min(h["val_mse"] for h in result.history)
    assert result.history[result.best_epoch - 1]["val_mse"] == best_val
    assert result.val_metrics["mse"] == pytest.approx(best_val, rel=1e-9), "selection is on the validation part"
    assert result.samples["original"].shape == (3, 3, SIZE, SIZE)
    assert result.samples["reconstruction"].shape == (3, 3, SIZE, SIZE)
    reloaded, saved = load_best_decoder(tmp_path)
    assert saved["best_epoch"] == result.best_epoch
    for a, b in zip(reloaded.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)


def test_decoder_attack_resume_replays_exactly(data, tmp_path, monkeypatch):
    train, test = data
    config = DecoderAttackConfig(epochs=3, batch_size=16, num_samples=2, **TINY_DECODER)
    perturb = gaussian_perturbation(0.05)
    straight = run_decoder_attack(train, test, perturb, config, state_dir=tmp_path / "a", progress=False)

    real_epoch = decoder_module._train_one_epoch
    calls = []

    def crash_at_epoch_2(*args, **kwargs):
        epoch = args[6]
        calls.append(epoch)
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(decoder_module, "_train_one_epoch", crash_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_decoder_attack(train, test, perturb, config, state_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(decoder_module, "_train_one_epoch", lambda *a, **k: (calls.append(a[6]), real_epoch(*a, **k))[1])
    resumed = run_decoder_attack(train, test, perturb, config, state_dir=tmp_path / "b", progress=False)

    assert calls == [1, 2, 2, 3], "the resumed run must start at the interrupted epoch"
    assert resumed.history == straight.history
    assert resumed.test_metrics == straight.test_metrics
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(a, b)

    with pytest.raises(ValueError, match="different attack protocol"):
        run_decoder_attack(train, test, perturb, DecoderAttackConfig(epochs=4, batch_size=16, **TINY_DECODER),
                           state_dir=tmp_path / "b", progress=False)


def test_decoder_attack_rejects_bad_input(data):
    train, test = data
    with pytest.raises(TypeError, match="config"):
        run_decoder_attack(train, test, gaussian_perturbation(0.0), config={"epochs": 1})
    with pytest.raises(ValueError, match="epochs"):
        DecoderAttackConfig(epochs=0)
    other = FeatureSet(torch.zeros(4, 2, 8, 8), torch.zeros(4, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shapes"):
        run_decoder_attack(train, other, gaussian_perturbation(0.0), DecoderAttackConfig(epochs=1))


# ---------------------------------------------------------------- GAN attack

def test_gradient_penalty_zero_for_unit_gradient_critic():
    class Linear(nn.Module):  # D(x) = <w, x> with ||w|| = 1 has gradient norm 1 everywhere
        def __init__(self):
            super().__init__()
            w = torch.randn(3 * 4 * 4)
            self.w = nn.Parameter(w / w.norm())

        def forward(self, x):
            return x.flatten(1) @ self.w

    real, fake = torch.rand(5, 3, 4, 4), torch.rand(5, 3, 4, 4)
    critic = Linear()
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        critic.w.mul_(3.0)
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(4.0, rel=1e-5)


def test_gan_attack_learns_and_resumes(data, tmp_path, monkeypatch):
    train, test = data
    torch.manual_seed(0)
    generator = build_inversion_decoder(train.smashed_shape, train.image_shape, **TINY_DECODER)
    config = GANAttackConfig(epochs=3, batch_size=8, n_critic=2, lr_generator=5e-3, num_samples=2)
    perturb = gaussian_perturbation(0.01)
    straight = run_gan_attack(train, test, perturb, generator, config, state_dir=tmp_path / "a", progress=False)
    epochs = straight.history[1:]
    assert straight.history[0]["epoch"] == 0 and straight.best_epoch >= 1
    assert epochs[-1]["generator_mse"] < epochs[0]["generator_mse"]
    assert epochs[0]["generator_steps"] == 3  # 6 critic steps per epoch, one generator step per 2
    assert _finite(straight.test_metrics) and all(math.isfinite(h["critic_loss"]) for h in epochs)
    assert straight.extra["critic_steps_total"] == 18

    real_epoch = gan_module._train_one_epoch

    def crash_at_epoch_3(*args, **kwargs):
        if args[8] == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(gan_module, "_train_one_epoch", crash_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run_gan_attack(train, test, perturb, generator, config, state_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(gan_module, "_train_one_epoch", real_epoch)
    resumed = run_gan_attack(train, test, perturb, generator, config, state_dir=tmp_path / "b", progress=False)
    assert resumed.history == straight.history
    assert resumed.test_metrics == straight.test_metrics


# ---------------------------------------------------------------- CLI on a smoke run

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A finished one-epoch noise-defence run from reproduce.train (24 train / 20 test images)."""
    from reproduce import train

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("runs") / "noise"
    try:
        assert train.main(["--preset", "smoke", "--defense", "noise", "--sigma", "0.05", "--cem-lambda", "0",
                           "--epochs", "1", "--train-subset", "24", "--test-subset", "20", "--batch-size", "8",
                           "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _attack(run_dir, *extra):
    from reproduce import attack

    threads = torch.get_num_threads()
    try:
        return attack.main(["--run", str(run_dir), "--preset", "smoke", "--no-progress", "--threads", "1", *extra])
    finally:
        torch.set_num_threads(threads)


def test_cli_decoder_then_gan_on_a_smoke_run(smoke_run):
    import json

    assert _attack(smoke_run, "--attack", "decoder", "--setting", "both") == 0
    report = json.loads((smoke_run / "attack_decoder.json").read_text())
    assert report["attack"] == "decoder" and report["defence"] == "noise"
    assert report["attack_noise_sigma"] == 0.05
    assert set(report["settings"]) == {"train_time", "infer_time"}
    train_time, infer_time = report["settings"]["train_time"], report["settings"]["infer_time"]
    assert train_time["sizes"] == {"fit": 22, "val": 2, "test": 20}
    assert infer_time["sizes"] == {"fit": 16, "val": 2, "test": 2}
    for entry in (train_time, infer_time):
        assert set(entry["metrics"]) == {"mse", "psnr", "ssim", "psnr_per_batch_authors", "n_images"}
        assert _finite(entry["metrics"]) and entry["epochs"] == 2 and len(entry["history"]) == 2
    samples = torch.load(smoke_run / "attack_decoder_samples.pt", weights_only=True)
    rec = samples["settings"]["train_time"]["reconstruction"]
    assert rec.shape == (16, 3, 32, 32) and 0 <= rec.min() and rec.max() <= 1
    assert samples["settings"]["train_time"]["original"].dtype == torch.uint8

    # A rerun resumes the finished state: no training, the same numbers.
    assert _attack(smoke_run, "--attack", "decoder", "--setting", "train_time") == 0
    again = json.loads((smoke_run / "attack_decoder.json").read_text())["settings"]["train_time"]
    assert again["metrics"] == train_time["metrics"] and again["history"] == train_time["history"]

    assert _attack(smoke_run, "--attack", "gan") == 0
    gan = json.loads((smoke_run / "attack_gan.json").read_text())
    entry = gan["settings"]["train_time"]
    assert _finite(entry["metrics"]) and entry["generator_steps_total"] >= 1
    assert entry["generator_init"]["decoder_best_epoch"] == train_time["best_epoch"]


def test_cli_refuses_missing_or_unfinished_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _attack(tmp_path / "nope", "--attack", "decoder")
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        _attack(tmp_path, "--attack", "decoder")
    assert "has not finished training (no final.pt)" in capsys.readouterr().err
