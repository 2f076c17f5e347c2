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
