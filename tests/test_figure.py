"""Figure 5: grid of originals and reconstructions from attack sample files."""

import json

import pytest
import torch

from reproduce.figure import figure5, main, run_label


def _fake_run(path, defence, lam, originals, seed):
    path.mkdir()
    rec = torch.rand(originals.shape, generator=torch.Generator().manual_seed(seed))
    header = {"defence": defence, "cem_lambda": lam, "attack_noise_sigma": 0.025}
    torch.save(
        {**header, "settings": {"train_time": {"original": originals, "reconstruction": rec}}},
        path / "attack_decoder_samples.pt",
    )
    (path / "attack_decoder.json").write_text(
        json.dumps({**header, "settings": {"train_time": {"metrics": {"mse": 0.0123}}}})
    )
    return path


def test_figure5_writes_a_png_with_one_row_per_run(tmp_path):
    import matplotlib.image

    originals = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    runs = [
        _fake_run(tmp_path / "a", "noise", 0.0, originals, 1),
        _fake_run(tmp_path / "b", "noise", 16.0, originals, 2),
    ]
    out = figure5(runs, tmp_path / "fig" / "f5.png", num_images=4)
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    assert (
        run_label({"defence": "noise", "cem_lambda": 16.0, "attack_noise_sigma": 0.025}, {"mse": 0.0123})
        == "noise σ=0.025 λ=16\nMSE 0.0123"
    )


def test_figure5_errors(tmp_path, capsys):
    originals = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    a = _fake_run(tmp_path / "a", "noise", 0.0, originals, 1)
    b = _fake_run(tmp_path / "b", "noise", 0.0, 255 - originals, 2)
    with pytest.raises(ValueError, match="other test images"):
        figure5([a, b], tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels"):
        figure5([a], tmp_path / "x.png", labels=["one", "two"])
    with pytest.raises(ValueError, match="infer_time"):
        figure5([a], tmp_path / "x.png", setting="infer_time")
    with pytest.raises(SystemExit):
        main(["--figure", "5", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    assert "reproduce.attack" in capsys.readouterr().err
