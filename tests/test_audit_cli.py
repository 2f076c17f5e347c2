"""``python -m cem_fast.audit`` on encoders defined in files outside the project, on the shipped CIFAR-10 sample."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cem_fast.audit.__main__ import main

REPO = Path(__file__).resolve().parents[1]
ENCODERS = """
from torch import nn


def maps():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=3, padding=1))


def flat():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
"""


@pytest.fixture
def encoders(tmp_path):
    path = tmp_path / "user_encoders.py"
    path.write_text(ENCODERS)
    return path


def _main(*argv):
    threads = torch.get_num_threads()
    try:
        return main(["--threads", "1", "--no-progress", *map(str, argv)])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("callable_name,feature_shape", [("maps", [8, 11, 11]), ("flat", [128])])
def test_cli_audits_an_outside_encoder_on_the_cifar10_sample(encoders, tmp_path, callable_name, feature_shape):
    out = tmp_path / f"out_{callable_name}"
    assert (
        _main(
            "--encoder",
            f"{encoders}:{callable_name}",
            "--data",
            "cifar10-sample",
            "--sigma",
            "0.05",
            "--out",
            out,
            "--preset",
            "smoke",
            "--h-x",
            "-5000",
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert set(report["attacks"]) == {"decoder", "whitebox", "adaptive"}
    for record in report["attacks"].values():
        assert {"mse", "psnr", "ssim", "n_scored", "scored_class_counts", "wall_time_s"} <= set(record)
        assert 0 < record["mse"] < 0.1 and sum(record["scored_class_counts"]) == record["n_scored"]
    assert report["worst"]["mse"] == min(r["mse"] for r in report["attacks"].values())
    assert report["setup"]["feature_shape"] == feature_shape
    assert report["theory"]["theorem1"]["h_x_nats"] == -5000
    assert (out / "reconstructions.png").stat().st_size > 1000 and (out / "report.md").is_file()


def _error(capsys, *argv):
    assert _main(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_errors_are_one_line(encoders, tmp_path, capsys):
    common = ["--sigma", "0.1", "--out", tmp_path / "out"]
    assert "no attribute 'nope'" in _error(capsys, "--encoder", f"{encoders}:nope", "--data", "cifar10-sample", *common)
    assert "cannot import" in _error(capsys, "--encoder", "no_such_module_xyz:f", "--data", "cifar10-sample", *common)
    assert "no such file or folder" in _error(
        capsys, "--encoder", f"{encoders}:maps", "--data", tmp_path / "nope", *common
    )
    torch.save({"weight": torch.zeros(1)}, tmp_path / "w.pt")
    assert "does not fit" in _error(
        capsys, "--encoder", f"{encoders}:maps", "--weights", tmp_path / "w.pt", "--data", "cifar10-sample", *common
    )
    np.savez(tmp_path / "raw.npz", x=np.full((20, 3, 8, 8), 200.0, dtype=np.float32), y=np.arange(20) % 2)
    assert "outside [0, 1]" in _error(capsys, "--encoder", f"{encoders}:maps", "--data", tmp_path / "raw.npz", *common)
    assert "--sigma" in _error(
        capsys, "--encoder", f"{encoders}:maps", "--data", "cifar10-sample", "--sigma", "-1", "--out", tmp_path / "out"
    )
    assert "--attacks" in _error(
        capsys, "--encoder", f"{encoders}:maps", "--data", "cifar10-sample", *common, "--attacks", "decoder,magic"
    )
    assert "required" in _error(capsys, "--data", "cifar10-sample")


def test_cli_error_has_no_traceback_in_a_fresh_process(encoders, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cem_fast.audit",
            "--encoder",
            f"{encoders}:nope",
            "--data",
            "cifar10-sample",
            "--sigma",
            "0",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_npz_files_load_in_their_canonical_order(tmp_path):
    from cem_fast.audit.datasets import load_named

    x = np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1).repeat(3, axis=1).repeat(2, axis=2).repeat(2, axis=3)
    np.savez(tmp_path / "shuffled.npz", x=x, y=np.array([3, 1, 0, 2]), canonical_index=np.array([3, 1, 0, 2]))
    images, labels = load_named(str(tmp_path / "shuffled.npz"))["train"]
    assert labels.tolist() == [0, 1, 2, 3]
    assert torch.allclose(images[:, 0, 0, 0] * 255, torch.tensor([2.0, 1.0, 3.0, 0.0]))
