"""reproduce.pipeline: ensure_trained / ensure_attacked are idempotent plain calls."""

import pytest
import torch

from reproduce import attack, pipeline, train
from reproduce.rundir import RunDir

TINY = {
    "train_subset": 8,
    "test_subset": 4,
    "batch_size": 4,
    "epochs": 2,
    "cem_backend": "torch",
    "defence": "noise",
    "cem_lambda": 0.0,
    "threads": 1,
}
TINY_ATTACK = {"epochs": 1, "max_train_images": 16, "max_test_images": 20}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _quiet(_):
    pass


def test_ensure_trained_then_attacked_and_both_are_idempotent(tmp_path, monkeypatch):
    rd = pipeline.ensure_trained(tmp_path / "run", preset="smoke", overrides=TINY, log=_quiet)
    assert rd.finished and [r["epoch"] for r in rd.metrics()] == [1, 2]
    cfg = rd.read_config()
    assert cfg["preset"] == "smoke" and cfg["train_subset"] == 8 and cfg["defence"] == "noise"
    entries = pipeline.ensure_attacked(
        rd, "decoder", ("train_time", "infer-time"), preset="smoke", overrides=TINY_ATTACK, log=_quiet
    )
    assert set(entries) == {"train_time", "infer_time"}
    assert all(e["epochs"] == 1 and "mse" in e["metrics"] for e in entries.values())

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(attack, "run_attack", lambda *a, **k: pytest.fail("a finished attack ran again"))
    assert pipeline.ensure_trained(rd.path, preset="smoke", overrides=TINY) == rd
    assert pipeline.ensure_attacked(rd, "decoder", ("train_time", "infer_time"), preset="smoke") == entries


def test_ensure_trained_resumes_a_stopped_run(tmp_path):
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--out", str(out), "--stop-after-epoch", "1", "--no-progress"]
    for key, value in TINY.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    argv[argv.index("--defence")] = "--defense"
    assert train.main(argv) == 0 and RunDir(out).resumable
    rd = pipeline.ensure_trained(out, preset="smoke", overrides=TINY, log=_quiet)
    assert rd.finished and [r["epoch"] for r in rd.metrics()] == [1, 2]
    other = RunDir(tmp_path / "other")
    other.write_config({"preset": "smoke"})
    with pytest.raises(ValueError, match="preset 'smoke'"):
        pipeline.ensure_trained(other, preset="cpu", overrides=TINY, log=_quiet)


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="'epoch'"):
        pipeline.ensure_trained(tmp_path / "x", preset="smoke", overrides={"epoch": 3})
    with pytest.raises(ValueError, match="'out'"):
        pipeline.ensure_trained(tmp_path / "x", preset="smoke", overrides={"out": "y"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline.ensure_attacked(tmp_path / "x", "decoder")
    assert pipeline.train_overrides("--epochs 3 --no-augment") == {"epochs": 3, "augment": False}
    with pytest.raises(ValueError, match="resume"):
        pipeline.train_overrides("--resume")


def test_auto_bf16_resumes_a_begun_attack_as_it_began_and_else_asks_the_cpu(tmp_path, monkeypatch, capsys):
    from cem_fast.audit import DecoderConfig
    from cem_fast.audit.decoder import DecoderAttack
    from cem_fast.audit.loop import BEST_NAME, CHECKPOINT_NAME

    def cpu_has_bf16(yes):
        monkeypatch.setattr(attack, "bf16_autocast_available", lambda device: yes)

    def save(name, bf16):
        torch.save({"protocol": {"attack": DecoderAttack(DecoderConfig(bf16_autocast=bf16)).protocol()}}, folder / name)

    def choice(name="decoder", setting="train_time"):
        return attack.bf16_choice(tmp_path, name, setting, "cpu")

    for yes in (True, False):  # a new attack: as the CPU allows; the attacks without bf16 get float32
        cpu_has_bf16(yes)
        assert choice() == choice("adaptive", "train-time") == {"bf16_autocast": yes}
        assert choice("whitebox") == choice("gan") == {"bf16_autocast": False}
    folder = RunDir(tmp_path).attack_state_dir("decoder", "train_time")
    folder.mkdir(parents=True)
    save(CHECKPOINT_NAME, False)
    cpu_has_bf16(True)  # a float32 attack resumes in float32 on a bf16 machine
    assert choice() == {"bf16_autocast": False}
    assert choice("decoder", "infer_time") == {"bf16_autocast": True}  # another setting: its own state
    (folder / CHECKPOINT_NAME).unlink()
    save(BEST_NAME, True)
    assert choice() == {"bf16_autocast": True}
    assert capsys.readouterr().err == ""
    cpu_has_bf16(False)  # a bf16 attack on a machine without bf16 kernels restarts in float32
    assert choice() == {"bf16_autocast": False, "fresh": True}
    assert "restarting in float32" in capsys.readouterr().err
    with pytest.raises(TypeError, match="bf16_autocast must be a bool"):
        attack.resolve_preset("cpu", "decoder", "cifar10", {"bf16_autocast": "auto"})
    with pytest.raises(ValueError, match="setting must be one of"):
        choice("decoder", "test_time")


def test_attack_cli_takes_auto_bf16():
    parse = attack.build_parser().parse_args
    base = ["--run", "r", "--attack", "decoder"]
    assert parse(base).bf16_autocast == "off"
    assert parse([*base, "--bf16-autocast"]).bf16_autocast == "on"
    assert parse([*base, "--bf16-autocast", "auto"]).bf16_autocast == "auto"
    with pytest.raises(SystemExit):
        parse([*base, "--bf16-autocast", "yes"])


def test_ensure_attacked_resolves_auto_bf16_per_setting(tmp_path, monkeypatch):
    from cem_fast.audit.decoder import bf16_autocast_available

    rd = pipeline.ensure_trained(tmp_path / "run", preset="smoke", overrides=TINY, log=_quiet)
    auto = {**TINY_ATTACK, "bf16_autocast": "auto"}
    entries = pipeline.ensure_attacked(rd, "decoder", ("train_time",), preset="smoke", overrides=auto, log=_quiet)
    # the record says which: bf16 where this CPU has the kernels (the field is absent at its float32 default)
    assert entries["train_time"]["config"].get("bf16_autocast", False) is bf16_autocast_available("cpu")
