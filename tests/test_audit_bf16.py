"""bf16 autocast of the decoder and adaptive attacks: scores like float32, keeps the posterior in float32,
stays out of the protocol at its default, and clear errors."""

import pytest
import torch
from torch import nn

from cem_fast.audit import AdaptiveConfig, DecoderConfig
from cem_fast.audit import decoder as decoder_mod
from cem_fast.audit.adaptive import AdaptiveInverter, ClusterDenoiser
from cem_fast.audit.decoder import DecoderAttack, bf16_autocast_available
from reproduce import attack as reproduce_attack
from tests.test_audit_ladder import _images, _one_thread, audit_under_noise  # noqa: F401  (autouse: 1 thread)

needs_bf16 = pytest.mark.skipif(not bf16_autocast_available("cpu"), reason="this CPU has no oneDNN bf16 kernels")


@needs_bf16
def test_bf16_decoder_and_adaptive_score_like_float32():
    data = _images(400, 0), _images(100, 1)
    (x, _), (xt, _) = data
    mean_mse = (xt - x.mean(0, keepdim=True)).pow(2).mean().item()
    reports = {
        bf16: audit_under_noise(data, **{"decoder.bf16_autocast": bf16, "adaptive.bf16_autocast": bf16})
        for bf16 in (False, True)
    }
    for name in ("decoder", "adaptive"):
        fp32, bf16 = reports[False].attacks[name]["mse"], reports[True].attacks[name]["mse"]
        assert bf16 < 0.8 * mean_mse, (name, bf16, mean_mse)
        assert abs(bf16 - fp32) <= 0.15 * fp32, (name, fp32, bf16)
        assert reports[True].attacks[name]["config"]["bf16_autocast"] is True
        assert "bf16_autocast" not in reports[False].attacks[name]["config"]  # the default stays out


def test_the_posterior_stays_float32_under_autocast():
    torch.manual_seed(0)
    k, d = 6, 32
    denoiser = ClusterDenoiser(torch.randn(k, d), torch.rand(k) + 0.1, torch.rand(k, d) + 0.05, noise_var=0.04)
    model = AdaptiveInverter(nn.Identity(), denoiser)
    with torch.no_grad():
        model.gate.fill_(0.7)
        z = torch.randn(16, 2, 4, 4)
        plain = model(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = model(z)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


def test_bf16_autocast_stays_out_of_the_protocol_at_its_default():
    assert "bf16_autocast" not in DecoderAttack(DecoderConfig()).protocol()  # older checkpoints still resume
    assert DecoderAttack(DecoderConfig(bf16_autocast=True)).protocol()["bf16_autocast"] is True


def test_bf16_autocast_errors(monkeypatch):
    with pytest.raises(TypeError, match="bf16_autocast must be a bool"):
        DecoderConfig(bf16_autocast=1)
    with pytest.raises(TypeError, match="bf16_autocast must be a bool"):
        AdaptiveConfig(bf16_autocast="yes")
    monkeypatch.setattr(decoder_mod, "bf16_autocast_available", lambda device: False)
    with pytest.raises(ValueError, match="bf16_autocast: this CPU has no bf16 kernels"):
        decoder_mod.prepare_for_bf16(nn.Conv2d(1, 1, 1), "cpu")
    preset = reproduce_attack.resolve_preset("cpu", "adaptive", "cifar10", {"bf16_autocast": True})
    assert preset.adaptive.bf16_autocast and not preset.decoder.bf16_autocast
    with pytest.raises(ValueError, match="bf16_autocast applies to the decoder and adaptive attacks, not 'gan'"):
        reproduce_attack.resolve_preset("cpu", "gan", "cifar10", {"bf16_autocast": True})
    with pytest.raises(SystemExit):
        reproduce_attack.main(["--run", "nowhere", "--attack", "whitebox", "--bf16-autocast"])


def test_a_recorded_bf16_decoder_is_retrained_in_float32_where_bf16_is_missing(monkeypatch, capsys):
    recorded = {"width": 64, "bf16_autocast": True}
    monkeypatch.setattr(reproduce_attack, "bf16_autocast_available", lambda device: True)
    assert reproduce_attack._runnable_here(recorded, "cpu") == recorded
    monkeypatch.setattr(reproduce_attack, "bf16_autocast_available", lambda device: False)
    assert reproduce_attack._runnable_here(recorded, "cpu") == {"width": 64, "bf16_autocast": False}
    assert "retraining it in float32" in capsys.readouterr().err
    assert reproduce_attack._runnable_here({"width": 64}, "cpu") == {"width": 64}
    assert reproduce_attack._runnable_here(None, "cpu") is None
