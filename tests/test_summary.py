"""reproduce.summary: one row per run, read from the run's files."""

import json

import pytest

from reproduce import summary


def _run(tmp_path, name, lam, finished, attack=None):
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps(
            {
                "defence": "noise",
                "sigma": 0.025,
                "cem_lambda": lam,
                "cem_variant": "paper",
                "cem_schedule": "constant",
                "epochs": 3,
            }
        )
    )
    rows = [{"epoch": e, "test_acc": 0.5 + 0.1 * e, "time_s": 60.0, "feature_var": 0.01 / e} for e in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if finished:
        (run / "final.pt").write_bytes(b"")
    if attack:
        (run / "attack_decoder.json").write_text(json.dumps({"settings": attack}))
    return run


def test_rows_come_from_the_run_files(tmp_path, capsys):
    a = _run(tmp_path, "a", 0.0, False)
    b = _run(
        tmp_path,
        "b",
        16.0,
        True,
        {
            "train_time": {"metrics": {"mse": 0.0123, "ssim": 0.5}},
            "infer_time": {"metrics": {"mse": 0.02, "ssim": 0.4}},
        },
    )
    out = tmp_path / "t.md"
    assert summary.main([str(a), str(b), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| a (unfinished) | noise | 0.025 | 0 | 2/3 | 70.00 | 2.0 | 0.005 | — / — |" in text
    assert (
        "| b | noise | 0.025 | 16 (paper, constant) | 2/3 | 70.00 | 2.0 | 0.005 | 0.0123 / 0.0200 | 0.500 / 0.400 | — |"
    ) in text
    assert text.strip() == capsys.readouterr().out.strip()


def test_not_a_run_directory(tmp_path):
    with pytest.raises(SystemExit):
        summary.main([str(tmp_path)])


def test_by_arm_gives_mean_sd_and_range_over_finished_seeds(tmp_path, capsys):
    arm = tmp_path / "noise_lam16"
    arm.mkdir()
    for seed, mse, finished in ((1, 0.01, True), (2, 0.03, True), (3, 0.5, False)):
        _run(arm, f"seed{seed}", 16.0, finished, {"train_time": {"metrics": {"mse": mse, "ssim": 0.5}}})
    assert summary.main(["--by-arm", *(str(p) for p in sorted(arm.iterdir()))]) == 0
    out = capsys.readouterr().out
    # seeds 1 and 2 only: mean 0.02, sample sd 0.0141; the unfinished seed 3 is named, not averaged
    assert (
        "| noise_lam16 (unfinished: seed3) | 1, 2 | 70.00 ± 0.00 [70.00, 70.00] (2) "
        "| 0.0200 ± 0.0141 [0.0100, 0.0300] (2) | — | 0.500 ± 0.000 [0.500, 0.500] (2) | — |" in out
    )
