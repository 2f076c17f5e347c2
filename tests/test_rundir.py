"""reproduce.rundir: the run directory's names and status checks."""

import json
import stat

import pytest

from reproduce.rundir import RunDir, find_runs, setting_key


def test_status_follows_the_files(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert rd.status() == "not run" and not rd.started and not rd.occupied and not rd.resumable
    rd.write_config({"preset": "smoke"})
    assert stat.S_IMODE(rd.config_path.stat().st_mode) == 0o644
    assert rd.status() == "training unfinished" and rd.resumable and rd.occupied
    assert rd.final_accuracy() is None
    rd.write_metrics([{"epoch": 1, "test_acc": 0.25}])
    rd.append_metrics({"epoch": 2, "test_acc": 0.5})
    assert [r["epoch"] for r in rd.metrics()] == [1, 2]
    with pytest.raises(ValueError, match="--resume"):
        rd.check_finished()
    rd.final_path.write_bytes(b"")
    assert rd.status() == "trained" and rd.finished and not rd.resumable
    assert rd.final_accuracy() == 0.5 and rd.check_finished() is rd
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RunDir(tmp_path / "nothing").check_finished()


def test_attack_records(tmp_path):
    rd = RunDir(tmp_path)
    assert not rd.attacked("decoder") and rd.attack_record("decoder") == {}
    rd.attack_record_path("decoder").write_text(
        json.dumps({"settings": {"train_time": {"metrics": {"mse": 0.01}}, "infer_time": {"epochs": 3}}})
    )
    assert rd.attacked("decoder", "train_time") and rd.attacked("decoder", "train-time")
    assert not rd.attacked("decoder", "infer_time")  # started, no metrics yet
    assert rd.missing_settings("decoder", ("train_time", "infer_time")) == ["infer_time"]
    assert rd.attack_metric("decoder", "train_time", "mse") == 0.01
    assert rd.attack_metric("gan", "train_time", "mse") is None
    assert rd.attack_state_dir("gan", "infer-time") == tmp_path / "attack_gan" / "infer_time"
    assert rd.attack_samples_path("gan").name.startswith("attack_gan")
    assert setting_key("train-time") == "train_time"
    with pytest.raises(TypeError, match="setting"):
        setting_key(1)
    with pytest.raises(ValueError, match="which"):
        rd.weights_path("best")


def test_find_runs_and_labels(tmp_path):
    for name in ("a/seed1", "a/seed2", "b"):
        RunDir(tmp_path / name).write_config({})
    (tmp_path / "not_a_run").mkdir()
    RunDir(tmp_path / "a" / ".seed3.tmp").write_config({})  # hidden: e.g. a record being written
    found = list(find_runs(tmp_path))
    assert [rd.label for rd in found] == ["a/seed1", "a/seed2", "b"]
    assert list(find_runs(tmp_path / "b")) == [RunDir(tmp_path / "b")]
    assert list(find_runs(tmp_path / "missing")) == []
    with pytest.raises(TypeError, match="path"):
        RunDir(3)


def test_a_record_reads_as_finished_but_is_not_live(tmp_path):
    rd = RunDir(tmp_path / "rec")
    rd.write_config({"preset": "cpu"})
    rd.write_metrics([{"epoch": 1, "test_acc": 0.4}])
    assert not rd.finished and not rd.is_record
    rd.record_path.write_text("{}")
    assert rd.is_record and rd.finished and not rd.resumable and rd.status() == "record"
    assert rd.final_accuracy() == 0.4 and rd.check_finished() is rd
    with pytest.raises(ValueError, match="committed record.*not attacked"):
        rd.check_attackable()
    with pytest.raises(ValueError, match="not resumed"):
        rd.check_live("resumed")
    assert RunDir(tmp_path / "live").check_live("resumed").path == tmp_path / "live"
