"""The attack loop skeleton, the decoder and GAN attacks on tiny stand-ins, and reproduce.attack on a smoke run."""

import json
import math

import pytest
import torch
from torch import nn

from cem_fast.audit import DecoderAttack, DecoderConfig, FeatureSet, GANAttack, GANConfig, LoopConfig, train_attack
from cem_fast.audit.data import Normalization, compute_features, gaussian_perturbation, stratified_split
from cem_fast.audit.decoder import load_decoder
from cem_fast.audit.gan import gradient_penalty
from cem_fast.audit.nets import build_decoder
from reproduce.attacks import make_perturbation
from reproduce.attacks.features import defence_noise_sigma

SIZE = 16
TINY_DECODER = dict(num_blocks=1, width=8)
NORM = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # [0, 1] <-> [-1, 1]


def _images(n, seed):
    """Smooth random images in [0, 1] (low-frequency, so a small decoder can fit them)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return nn.functional.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=False)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions: one thread is faster and does not stall when the machine is busy.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2), nn.Sigmoid())


@pytest.fixture(scope="module")
def data():
    enc = _encoder()
    train = compute_features(enc, _images(48, 0), torch.zeros(48, dtype=torch.long), NORM, batch_size=16)
    test = compute_features(enc, _images(12, 1), torch.zeros(12, dtype=torch.long), NORM, batch_size=16)
    return train, test


def _finite(metrics):
    return all(math.isfinite(v) for v in metrics.values())


def _loop(epochs, **kw):
    return LoopConfig(max_epochs=epochs, patience=None, **kw)


# ---------------------------------------------------------------- features, splits, noise


def test_compute_features_shapes_images_and_eval_mode():
    enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AvgPool2d(2))
    enc.train()
    x = _images(3, 3)
    fs = compute_features(enc, x, torch.tensor([0, 1, 2]), NORM, batch_size=2)
    assert enc.training, "the encoder's mode must be restored"
    assert fs.feature_shape == (4, 8, 8) and fs.image_shape == (3, SIZE, SIZE) and len(fs) == 3
    assert torch.equal(fs.images, x) and fs.labels.tolist() == [0, 1, 2]
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(fs.features, enc(x * 2 - 1), atol=1e-6), "the encoder sees normalised images"


def test_stratified_split_is_seeded_and_balanced_on_class_sorted_labels():
    labels = torch.arange(10).repeat_interleave(100)  # class-sorted, as rows 1,000-9,999 of the CIFAR test file
    rest, part = stratified_split(labels, 0.1, seed=3)
    assert len(part) == 100 and len(rest) == 900
    assert sorted(torch.cat([rest, part]).tolist()) == list(range(1000))
    assert torch.bincount(labels[part]).tolist() == [10] * 10
    assert torch.equal(stratified_split(labels, 0.1, seed=3)[1], part)
    assert not torch.equal(stratified_split(labels, 0.1, seed=4)[1], part)
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(labels, 1.5, seed=0)


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
    attack = DecoderAttack(DecoderConfig(batch_size=8, lr=1e-2, t_max=4, **TINY_DECODER))
    result = train_attack(
        attack, train, test, gaussian_perturbation(0.01), _loop(4, num_samples=3), state_dir=tmp_path, progress=False
    )
    losses = [h["train_loss"] for h in result.history[1:]]
    assert result.history[0]["epoch"] == 0, "the learning curve starts before training"
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    assert _finite(result.test_metrics) and result.test_metrics["n_images"] == len(test)
    assert result.sizes == {"fit": 43, "val": 5, "test": 12}
    assert result.train_class_counts == [43] and result.scored_class_counts == [12]
    best_val = min(h["val_mse"] for h in result.history[1:])
    assert result.history[result.best_epoch]["val_mse"] == best_val
    assert result.val_metrics["mse"] == pytest.approx(best_val, rel=1e-9), "selection is on the validation part"
    assert result.samples["original"].shape == (3, 3, SIZE, SIZE)
    assert result.samples["reconstruction"].shape == (3, 3, SIZE, SIZE)
    reloaded, saved = load_decoder(tmp_path)
    assert saved["best_epoch"] == result.best_epoch
    for a, b in zip(reloaded.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)


def test_patience_stops_when_held_out_mse_stops_improving(data):
    train, test = data
    # At lr 1e-12 the weights do not move: only BatchNorm's running statistics settle, and the held-out MSE
    # stops improving within a few epochs, so patience 2 ends the run long before the 50-epoch budget.
    attack = DecoderAttack(DecoderConfig(batch_size=48, lr=1e-12, t_max=50, **TINY_DECODER))
    result = train_attack(
        attack, train, test, gaussian_perturbation(0.0), LoopConfig(max_epochs=50, patience=2), progress=False
    )
    assert result.epochs < 50 and result.epochs - result.best_epoch == 2


def test_decoder_attack_resume_replays_exactly(data, tmp_path, monkeypatch):
    train, test = data
    attack = DecoderAttack(DecoderConfig(batch_size=16, t_max=3, **TINY_DECODER))
    loop = _loop(3, num_samples=2)
    perturb = gaussian_perturbation(0.05)
    straight = train_attack(attack, train, test, perturb, loop, state_dir=tmp_path / "a", progress=False)

    real_epoch = DecoderAttack.epoch
    calls = []

    def crash_at_epoch_2(self, state, fit, perturb, epoch, *args):
        calls.append(epoch)
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, state, fit, perturb, epoch, *args)

    monkeypatch.setattr(DecoderAttack, "epoch", crash_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_attack(attack, train, test, perturb, loop, state_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(
        DecoderAttack, "epoch", lambda self, s, f, p, e, *a: (calls.append(e), real_epoch(self, s, f, p, e, *a))[1]
    )
    resumed = train_attack(attack, train, test, perturb, loop, state_dir=tmp_path / "b", progress=False)

    assert calls == [1, 2, 2, 3], "the resumed run must start at the interrupted epoch"
    assert resumed.history == straight.history
    assert resumed.test_metrics == straight.test_metrics
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(a, b)

    with pytest.raises(ValueError, match="different attack protocol"):
        train_attack(attack, train, test, perturb, _loop(4), state_dir=tmp_path / "b", progress=False)


def test_decoder_attack_rejects_bad_input(data):
    train, test = data
    with pytest.raises(TypeError, match="config"):
        DecoderAttack({"epochs": 1})
    with pytest.raises(ValueError, match="max_epochs"):
        LoopConfig(max_epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        DecoderConfig(batch_size=0)
    other = FeatureSet(torch.zeros(4, 2, 8, 8), torch.zeros(4, 3, SIZE, SIZE), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="shapes"):
        train_attack(DecoderAttack(), train, other, gaussian_perturbation(0.0), _loop(1))


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
    generator = build_decoder(train.feature_shape, train.image_shape, **TINY_DECODER)
    attack = GANAttack(generator, GANConfig(batch_size=8, n_critic=2, lr_generator=5e-3))
    loop = _loop(3, num_samples=2)
    perturb = gaussian_perturbation(0.01)
    straight = train_attack(attack, train, test, perturb, loop, state_dir=tmp_path / "a", progress=False)
    epochs = straight.history[1:]
    assert straight.history[0]["epoch"] == 0 and straight.best_epoch >= 1
    assert epochs[-1]["generator_mse"] < epochs[0]["generator_mse"]
    assert epochs[0]["generator_steps"] == 3  # 6 critic steps per epoch, one generator step per 2
    assert _finite(straight.test_metrics) and all(math.isfinite(h["critic_loss"]) for h in epochs)
    assert straight.extra["critic_steps_total"] == 18

    real_epoch = GANAttack.epoch

    def crash_at_epoch_3(self, state, fit, perturb, epoch, *args):
        if epoch == 3:
            raise KeyboardInterrupt
        return real_epoch(self, state, fit, perturb, epoch, *args)

    monkeypatch.setattr(GANAttack, "epoch", crash_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_attack(attack, train, test, perturb, loop, state_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(GANAttack, "epoch", real_epoch)
    resumed = train_attack(attack, train, test, perturb, loop, state_dir=tmp_path / "b", progress=False)
    assert resumed.history == straight.history
    assert resumed.test_metrics == straight.test_metrics


def test_gan_never_ends_worse_than_the_decoder_it_starts_from(data):
    train, test = data
    perturb = gaussian_perturbation(0.01)
    decoder = train_attack(
        DecoderAttack(DecoderConfig(batch_size=8, lr=1e-2, t_max=4, **TINY_DECODER)),
        train,
        test,
        perturb,
        _loop(4),
        progress=False,
    )
    # A GAN step this large wrecks the generator: the selection must fall back on its starting weights.
    gan = train_attack(
        GANAttack(decoder.model, GANConfig(batch_size=8, n_critic=1, lr_generator=1.0)),
        train,
        test,
        perturb,
        _loop(2),
        progress=False,
    )
    assert gan.val_metrics["mse"] <= decoder.val_metrics["mse"] + 1e-12
    assert gan.history[0]["val_mse"] == pytest.approx(decoder.val_metrics["mse"], rel=1e-9)


# ---------------------------------------------------------------- reproduce.attack on a smoke run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A finished one-epoch noise-defence run from reproduce.train (24 train / 20 test images)."""
    from reproduce import train

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("runs") / "noise"
    try:
        assert (
            train.main(
                [
                    "--preset",
                    "smoke",
                    "--defense",
                    "noise",
                    "--sigma",
                    "0.05",
                    "--cem-lambda",
                    "0",
                    "--epochs",
                    "1",
                    "--train-subset",
                    "24",
                    "--test-subset",
                    "20",
                    "--batch-size",
                    "8",
                    "--no-progress",
                    "--threads",
                    "1",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
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
    assert _attack(smoke_run, "--attack", "decoder", "--setting", "both") == 0
    report = json.loads((smoke_run / "attack_decoder.json").read_text())
    assert report["attack"] == "decoder" and report["defence"] == "noise"
    assert report["attack_noise_sigma"] == 0.05
    assert set(report["settings"]) == {"train_time", "infer_time"}
    train_time, infer_time = report["settings"]["train_time"], report["settings"]["infer_time"]
    assert train_time["sizes"] == {"fit": 22, "val": 2, "test": 20}
    assert infer_time["sizes"] == {"fit": 16, "val": 2, "test": 2}
    # The run's 20 test images are 2 per class: the inference-time split scores 2 different classes and
    # trains on all ten (the authors' last-10% split of a class-sorted file would not).
    assert sum(infer_time["scored_class_counts"]) == 2 and max(infer_time["scored_class_counts"]) == 1
    assert min(c for c in infer_time["train_class_counts"]) >= 1
    assert train_time["scored_class_counts"] == [2] * 10
    for entry in (train_time, infer_time):
        assert set(entry["metrics"]) == {"mse", "psnr", "ssim", "psnr_per_batch_authors", "n_images"}
        assert entry["mse"] == entry["metrics"]["mse"] and entry["n_scored"] == entry["metrics"]["n_images"]
        assert _finite(entry["metrics"]) and entry["epochs"] == 2 and len(entry["learning_curve"]) == 1 + 2
    samples = torch.load(smoke_run / "attack_decoder_samples.pt", weights_only=True)
    rec = samples["settings"]["train_time"]["reconstruction"]
    assert rec.shape == (16, 3, 32, 32) and 0 <= rec.min() and rec.max() <= 1
    assert samples["settings"]["train_time"]["original"].dtype == torch.uint8

    # A rerun resumes the finished state: no training, the same numbers.
    assert _attack(smoke_run, "--attack", "decoder", "--setting", "train_time") == 0
    again = json.loads((smoke_run / "attack_decoder.json").read_text())["settings"]["train_time"]
    assert again["metrics"] == train_time["metrics"] and again["learning_curve"] == train_time["learning_curve"]

    assert _attack(smoke_run, "--attack", "gan") == 0
    gan = json.loads((smoke_run / "attack_gan.json").read_text())
    entry = gan["settings"]["train_time"]
    assert _finite(entry["metrics"]) and entry["generator_steps_total"] >= 1
    assert entry["generator_init"]["decoder_best_epoch"] == train_time["best_epoch"]
    assert entry["val_metrics"]["mse"] <= train_time["val_metrics"]["mse"] + 1e-9


def test_run_attack_whitebox_and_adaptive_return_the_entry_they_write(smoke_run):
    from reproduce.attack import run_attack

    threads = torch.get_num_threads()
    try:
        for name in ("whitebox", "adaptive"):
            entry = run_attack(
                smoke_run, name, setting="train-time", preset="smoke", overrides={"progress": False, "epochs": 1}
            )
            written = json.loads((smoke_run / f"attack_{name}.json").read_text())
            assert written["settings"]["train_time"] == json.loads(json.dumps(entry))
            assert _finite(entry["metrics"]) and sum(entry["scored_class_counts"]) == entry["n_scored"]
    finally:
        torch.set_num_threads(threads)
    assert entry["init"]["decoder_best_epoch"] >= 1, "adaptive starts from the run's decoder attack"


def test_cli_refuses_missing_or_unfinished_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _attack(tmp_path / "nope", "--attack", "decoder")
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        _attack(tmp_path, "--attack", "decoder")
    assert "has not finished training (no final.pt)" in capsys.readouterr().err
