"""Defences: perturbations, regularisers, simulated attackers, pruning, registry, checkpoints."""

import os

import pytest
import torch
from torch import nn

from reproduce.checkpoint import load_checkpoint, reshape_to_state_dict, save_atomic, write_json_atomic
from reproduce.defences import (
    DEFENCES,
    AdversarialReconstruction,
    Combined,
    FeatureDropout,
    GaussianNoise,
    NoPeek,
    Patrol,
    build_defence,
    default_bottleneck,
    distance_correlation,
    prune_channels,
    with_noise,
)
from reproduce.defences.patrol import count_params
from reproduce.models import build_split_model


class TinySplit(nn.Module):
    """A small stand-in for SplitModel: 3x16x16 images -> 4x4x4 smashed data in (0, 1)."""

    def __init__(self, extra=False):
        super().__init__()
        layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()] if extra else []
        c = 8 if extra else 3
        layers += [
            nn.Conv2d(c, 48, 3, padding=1),
            nn.BatchNorm2d(48),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(48, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 4, 3, padding=1),
            nn.Sigmoid(),
        ]
        self.encoder = nn.Sequential(*layers)
        self.server = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.smashed_shape = (4, 4, 4)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny ops: one thread avoids OpenMP wait stalls when the 2 cores are shared with other jobs.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 16, 16, generator=g), torch.randint(0, 10, (b,), generator=g)


# ------------------------------------------------------------------ noise / dropout


def test_noise_has_std_sigma_in_train_and_eval_and_passes_gradient():
    d = GaussianNoise(sigma=0.1)
    z = torch.full((64, 8, 8, 8), 0.5, requires_grad=True)
    for mode in (True, False):
        d.train(mode)
        out = d.perturb(z)
        assert abs(float((out - z).detach().std()) - 0.1) < 0.005
    out.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    d_off = GaussianNoise(sigma=0.1, active_in_eval=False).eval()
    assert torch.equal(d_off.perturb(z), z)
    with pytest.raises(ValueError, match="sigma"):
        GaussianNoise(sigma=0)


def test_dropout_zeroes_rate_without_rescaling_also_in_eval():
    d = FeatureDropout(rate=0.3).eval()
    z = torch.rand(32, 8, 8, 8) + 0.1
    out = d.perturb(z)
    dropped = out == 0
    assert abs(float(dropped.float().mean()) - 0.3) < 0.02
    assert torch.equal(out[~dropped], z[~dropped])  # survivors are not rescaled by 1/(1-rate)
    with pytest.raises(ValueError, match="rate"):
        FeatureDropout(rate=1.0)


# ------------------------------------------------------------------ NoPeek


def test_distance_correlation_range_and_dependence():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 3, 8, 8, generator=g)
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-4)
    assert float(distance_correlation(x, 2 * x + 1)) == pytest.approx(1.0, abs=1e-4)
    indep = float(distance_correlation(x, torch.rand(32, 16, generator=g)))
    dep = float(distance_correlation(x, x.flatten(1)[:, :16] ** 2))
    assert 0 <= indep < dep <= 1
    with pytest.raises(ValueError, match="batch"):
        distance_correlation(x, x[:5])


def test_nopeek_regularizer_is_differentiable_and_descent_lowers_it():
    x, y = _batch(16)
    z = (x.flatten(1)[:, :32] + 0.05 * torch.randn(16, 32)).requires_grad_(True)
    d = NoPeek(strength=2.0)
    loss = d.regularizer(x, z, y)
    assert loss.ndim == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    assert float(loss.detach()) == pytest.approx(2.0 * float(distance_correlation(x, z.detach())), rel=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with torch.no_grad():
        z2 = z - 0.5 * z.grad / z.grad.norm()
    assert float(d.regularizer(x, z2, y)) < float(loss.detach())


# ------------------------------------------------------------------ ResSFL


def _ressfl(**kw):
    model = TinySplit()
    d = AdversarialReconstruction(pretrain_epochs=1, decoder_blocks=1, decoder_width=16, **kw)
    d.setup(model, image_size=16, dataset="cifar10", total_epochs=4)
    return model, d


def test_ressfl_penalty_zero_below_threshold_positive_above_and_reaches_only_encoder():
    model, d = _ressfl(ssim_threshold=0.99)
    x, y = _batch()
    z = model.encoder(x)
    pen = d.regularizer(x, z, y, x_unit=x)
    assert float(pen.detach()) == 0.0  # an untrained decoder is far below SSIM 0.99
    model, d = _ressfl(ssim_threshold=0.0, strength=3.0)
    z = model.encoder(x)
    pen = d.regularizer(x, z, y, x_unit=x)
    assert torch.isfinite(pen) and float(pen.detach()) != 0
    pen.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad is None for p in d.decoder.parameters())
    assert all(p.requires_grad for p in d.decoder.parameters())
    assert default_ssim_threshold_of("facescrub") == 0.6 and default_ssim_threshold_of("cifar10") == 0.5


def default_ssim_threshold_of(name):
    from reproduce.defences import default_ssim_threshold

    return default_ssim_threshold(name)


def test_ressfl_adversary_step_trains_decoder_only_and_raises_ssim():
    model, d = _ressfl(steps=2)
    x, _ = _batch(8)
    z = model.encoder(x)
    enc_before = [p.clone() for p in model.encoder.parameters()]
    dec_before = [p.clone() for p in d.decoder.parameters()]
    first = float(d.adversary_step(x, z.detach())["adv_ssim"])
    for _ in range(15):
        last = float(d.adversary_step(x, z.detach())["adv_ssim"])
    assert last > first
    assert all(torch.equal(a, b) for a, b in zip(enc_before, model.encoder.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(dec_before, d.decoder.parameters()))
    # the decoder optimiser's state travels with the defence's state_dict
    model2, d2 = _ressfl(steps=2)
    d2.load_state_dict(d.state_dict())
    assert d2.optimizer.state_dict()["state"].keys() == d.optimizer.state_dict()["state"].keys()


def test_ressfl_pretrain_lowers_mse_and_runs_once():
    model, d = _ressfl()
    d.pretrain_epochs = 10
    x, y = _batch(16)
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]

    def mse():  # decoder in train mode (batch statistics), as during pretraining
        with torch.no_grad():
            return float(nn.functional.mse_loss(d.decoder.train()(model.encoder.eval()(x)), x))

    before = mse()
    logs = d.pretrain(model.encoder, loader, denormalize=lambda t: t, device="cpu")
    assert mse() < 0.8 * before and logs["pretrain_mse"] < before
    assert d.pretrain(model.encoder, loader, denormalize=lambda t: t, device="cpu") == {}


def test_noise_arl_adversary_sees_clean_features_by_default_and_noisy_on_request():
    d = build_defence("noise_arl", sigma=0.5, decoder_blocks=1, decoder_width=8)
    assert isinstance(d, Combined) and d.adds_noise and d.needs_unit_images
    adv = d.parts[1]
    z = torch.full((4, 4, 4, 4), 0.5)
    assert adv.adversary_sees == "clean"  # the authors': decoder step and penalty on the clean z
    assert torch.equal(adv._adversary_input(z), z)
    adv.adversary_sees = "perturbed"
    assert not torch.equal(adv._adversary_input(z), z)
    noisy = build_defence("noise_arl", sigma=0.5, adversary_sees="perturbed", decoder_blocks=1, decoder_width=8)
    assert not torch.equal(noisy.parts[1]._adversary_input(z), z)


def test_ressfl_bf16_autocast_runs_the_decoder_in_bf16_and_keeps_weights_penalty_and_grads_float32():
    torch.manual_seed(0)
    model, fp32 = _ressfl(ssim_threshold=0.0)
    bf16 = AdversarialReconstruction(pretrain_epochs=1, decoder_blocks=1, decoder_width=16, ssim_threshold=0.0)
    bf16.setup(model, image_size=16, dataset="cifar10", total_epochs=4, bf16_autocast=True)
    bf16.decoder.load_state_dict(fp32.decoder.state_dict())
    assert (fp32.describe()["bf16_autocast"], bf16.describe()["bf16_autocast"]) == (False, True)
    x, y = _batch()
    z = model.encoder(x).detach().requires_grad_(True)
    convs = []
    hook = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: convs.append(o.dtype) if isinstance(m, nn.Conv2d) else None
    )
    try:
        out = bf16._decode(z)
    finally:
        hook.remove()
    assert convs and set(convs) == {torch.bfloat16} and out.dtype == torch.float32
    assert torch.allclose(out, fp32._decode(z), atol=3e-2)  # bf16 rounding of the same decoder
    pen_bf16, pen_fp32 = bf16.regularizer(x, z, y, x_unit=x), fp32.regularizer(x, z, y, x_unit=x)
    assert pen_bf16.dtype == torch.float32 and abs(float(pen_bf16.detach()) - float(pen_fp32.detach())) < 0.05 * float(
        pen_fp32.detach()
    )
    (grad,) = torch.autograd.grad(pen_bf16, z)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    before = [p.detach().clone() for p in bf16.decoder.parameters()]
    bf16.adversary_step(x, z.detach())
    assert all(p.dtype == torch.float32 for p in bf16.decoder.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, bf16.decoder.parameters()))


def test_setup_defence_hands_the_runs_bf16_autocast_to_the_simulated_attacker():
    from reproduce.runs import setup_defence

    for flag in (False, True):
        d = build_defence("noise_arl", sigma=0.025, decoder_blocks=1, decoder_width=8)
        config = {
            "extra_client_layer": False,
            "image_size": 16,
            "in_channels": 3,
            "dataset": "cifar10",
            "epochs": 2,
            "bf16_autocast": flag,
        }
        setup_defence(d, TinySplit(), config, "cpu")
        assert d.parts[1].bf16_autocast is flag and d.describe()["parts"][1]["bf16_autocast"] is flag


def test_defaults_are_the_authors_shipped_strengths_and_settings():
    # run_exp.sh: AT_regularization_strength=0.3 (NoPeek's alpha1, ResSFL's alpha2), ssim_threshold=0.5
    assert NoPeek().strength == 0.3
    assert build_defence("noise_nopeek", sigma=0.025).parts[1].strength == 0.3
    arl = AdversarialReconstruction()
    assert (arl.strength, arl.steps, arl.pretrain_epochs, arl.adversary_sees) == (0.3, 1, 30, "clean")
    assert arl.pretrain_split == "train"  # deliberate: the authors' test-split pretraining leaks (docs/presets.md)
    _, d = _ressfl()
    assert d.ssim_threshold == 0.5
    # PATROL: 3 decoder steps, pruning ratio 0.05 with Taylor importance, convs <= 32 channels kept
    p = Patrol()
    assert (p.steps, p.strength, p.authors_pruning, p.pruning_ratio, p.importance) == (3, 0.3, True, 0.05, "taylor")
    own = Patrol(pruning_ratio="match")
    assert (own.authors_pruning, own.pruning_ratio, own.importance, own.steps) == (False, "match", "l1", 3)
    assert Patrol(importance="taylor").pruning_ratio == "match" and Patrol(steps=1).steps == 1


def test_train_cli_builds_the_authors_defaults():
    from reproduce.runs import build_run_defence
    from reproduce.train import build_parser, resolve_config

    def built(*argv):  # lambda 0: no CEM, so no noise is put in front of the defence
        argv = ["--out", "unused", "--cem-lambda", "0", *argv]
        return build_run_defence(resolve_config(build_parser().parse_args(argv)))

    assert built("--defense", "nopeek").strength == 0.3
    assert built("--defense", "nopeek", "--defence-strength", "0.5").strength == 0.5
    arl = built("--defense", "noise_arl").parts[1]
    assert arl.adversary_sees == "clean" and arl.strength == 0.3
    assert built("--defense", "noise_arl", "--adversary-sees", "perturbed").parts[1].adversary_sees == "perturbed"
    assert built("--defense", "patrol").authors_pruning
    assert built("--defense", "patrol", "--pruning-ratio", "match").pruning_ratio == "match"


def test_bottleneck_with_cem_is_a_named_noise_arm():
    from reproduce.runs import build_run_defence
    from reproduce.train import build_parser, resolve_config

    cfg = resolve_config(build_parser().parse_args(["--out", "unused", "--defense", "bottleneck"]))
    d = build_run_defence(cfg)  # the cpu preset's lambda 16: CEM on, so Algorithm 1's noise is added
    assert cfg["noise_on"] and d.adds_noise and d.describe()["name"] == "noise+bottleneck"
    control = resolve_config(
        build_parser().parse_args(["--out", "unused", "--defense", "bottleneck", "--noise", "on", "--cem-lambda", "0"])
    )
    assert build_run_defence(control).describe() == d.describe()  # the same arm without CEM
    plain = resolve_config(
        build_parser().parse_args(["--out", "unused", "--defense", "bottleneck", "--cem-lambda", "0"])
    )
    assert not plain["noise_on"] and build_run_defence(plain).describe()["name"] == "bottleneck"


# ------------------------------------------------------------------ PATROL


def test_patrol_pruning_matches_baseline_size_and_keeps_output_shape():
    base, model = TinySplit(), TinySplit(extra=True)
    target = count_params(base.encoder)
    d = Patrol(pretrain_epochs=0, decoder_blocks=1, decoder_width=8, pruning_ratio="match")
    d.setup(model, image_size=16, total_epochs=4, baseline_encoder_params=target)
    assert d.prune_epoch == 3 and d.extra_client_layer
    x, _ = _batch()
    before = count_params(model.encoder)
    assert before > target
    assert d.on_epoch_start(2, model, {}) is False
    assert d.on_epoch_start(3, model, {}) is True
    assert d.pruned and 0 < d.applied_ratio < 0.9
    assert count_params(model.encoder) <= target
    assert model.encoder(x).shape == (6, 4, 4, 4)
    assert d.on_epoch_start(3, model, {}) is False  # prunes once
    # a fresh model takes the pruned state after reshaping
    fresh = TinySplit(extra=True)
    resized = reshape_to_state_dict(fresh, model.state_dict())
    assert resized
    fresh.load_state_dict(model.state_dict())
    fresh.eval(), model.eval()
    assert torch.equal(fresh.encoder(x), model.encoder(x))


def test_patrol_authors_pruning_keeps_narrow_convs_and_prunes_five_percent():
    model = TinySplit(extra=True)
    d = Patrol(pretrain_epochs=0, decoder_blocks=1, decoder_width=8)
    d.setup(model, image_size=16, total_epochs=4)
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    widths = [c.out_channels for c in convs]
    assert widths == [8, 48, 64, 4]
    assert d.on_epoch_start(3, model, {}) is True and d.applied_ratio == 0.05
    after = [m.out_channels for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert after[0] == 8 and after[-1] == 4  # <= 32 channels and the output conv are left alone
    assert 0 < widths[1] - after[1] <= 3 and 0 < widths[2] - after[2] <= 4  # about 5 % of 48 and 64


def test_prune_channels_on_the_real_models():
    for arch, cut in (("vgg11_bn", 4), ("resnet20", 5)):
        m = build_split_model(arch, 10, cut, 32, extra_client_layer=True)
        n = count_params(m.encoder)
        prune_channels(m.encoder, torch.zeros(1, 3, 32, 32), 0.25)
        assert count_params(m.encoder) < n
        z = m.encoder(torch.rand(2, 3, 32, 32))
        assert tuple(z.shape[1:]) == m.smashed_shape
        assert m.server(z).shape == (2, 10)


# ------------------------------------------------------------------ registry


def test_registry_builds_every_defence_and_rejects_bad_input():
    for name in DEFENCES:
        d = build_defence(name)
        assert d.name == name
    assert default_bottleneck("none") == "none" and default_bottleneck("nopeek") == "noRELU_C8S1"
    assert build_defence("distcorr").name == "nopeek"
    nn_ = build_defence("noise_nopeek", sigma=0.3, strength=0.7)
    assert nn_.parts[0].sigma == 0.3 and nn_.parts[1].strength == 0.7
    with pytest.raises(ValueError, match="unknown defence"):
        build_defence("magic")
    with pytest.raises(TypeError, match="rate"):
        build_defence("noise", rate=0.3)
    with pytest.raises(ValueError, match="strength"):
        build_defence("nopeek", strength=-1)
    wrapped = with_noise(build_defence("dropout"), 0.05)
    assert wrapped.adds_noise and [type(p) for p in wrapped.parts] == [GaussianNoise, FeatureDropout]
    assert isinstance(with_noise(build_defence("bottleneck"), 0.05), GaussianNoise)
    assert with_noise(build_defence("bottleneck"), 0.05).describe()["name"] == "noise+bottleneck"


# ------------------------------------------------------------------ checkpoint files


def test_atomic_save_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic({"a": torch.arange(3)}, path)
    save_atomic({"a": torch.arange(5)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(5))
    write_json_atomic({"x": 1}, tmp_path / "c.json")
    assert sorted(os.listdir(tmp_path)) == ["c.json", "c.pt"]

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"bad": Boom()}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(5))  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["c.json", "c.pt"]
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(tmp_path / "nope.pt")
