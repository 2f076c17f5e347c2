"""reproduce.train: smoke runs of every defence, resume determinism, CEM on/off, load_run, CLI errors."""

import json
import warnings

import pytest
import torch
from helpers import TINY_TRAIN, restore_threads, run_metrics, tiny_run  # noqa: F401 (a fixture)

import cem_fast
from reproduce import train, train_loop
from reproduce.defences import DEFENCES
from reproduce.runs import load_run
from reproduce.schedules import LRFactor, cem_weight

# Tiny runs: 8 training images in 2 batches, 4 test images, 2 epochs, 1 decoder pretraining epoch.
TINY = TINY_TRAIN


pytestmark = pytest.mark.usefixtures("restore_threads")


def _run(tmp_path, *extra, name="run"):
    return tiny_run(tmp_path, *extra, name=name, base=TINY)


_metrics = run_metrics


@pytest.mark.parametrize("arch", ["vgg11_bn", "resnet20"])
@pytest.mark.parametrize("defence", DEFENCES)
def test_smoke_run_every_defence_with_and_without_cem(tmp_path, defence, arch):
    for lam, epochs in (("0", 1), ("16", 2)):  # CEM needs epoch 2: no clusters before the first refit
        extra = ["--pruning-ratio", "0.1", "--prune-epoch", "1"] if defence == "patrol" else []
        out = _run(
            tmp_path,
            "--defense",
            defence,
            "--arch",
            arch,
            "--cem-lambda",
            lam,
            "--epochs",
            str(epochs),
            *extra,
            name=f"l{lam}",
        )
        cfg = json.loads((out / "config.json").read_text())
        rows = _metrics(out)
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
        for r in rows:
            for key in ("loss", "ce", "train_acc", "test_acc", "lr", "lambda_eff", "feature_var", "time_s"):
                assert key in r and r[key] == r[key]  # present and not NaN
            assert ("cem" in r) == (lam != "0")
        assert cfg["cem_enabled"] == (lam != "0") and cfg["defence"] == defence and cfg["arch"] == arch
        assert cfg["noise_on"] == (lam != "0" and defence not in ("noise", "noise_nopeek", "noise_arl"))
        if lam != "0":
            assert rows[0]["cem"] == 0.0 and rows[1]["cem"] != 0.0  # no clusters before the first refit
        run = load_run(out)
        assert not run.model.training and run.num_classes == 10 and run.dataset == "cifar10-sample"
        x = torch.rand(2, 3, 32, 32)
        z = run.defence.perturb(run.model.encoder(x))
        assert tuple(z.shape[1:]) == run.model.smashed_shape
        assert run.model.server(z).shape == (2, 10)
        if defence == "patrol":
            parts = getattr(run.defence, "parts", [run.defence])  # with CEM the noise comes in front
            assert parts[-1].pruned  # pruned at epoch 1 and reloaded into the right shapes


def _final_state(out):
    return torch.load(out / "final.pt", weights_only=False)


@pytest.mark.parametrize("defence,stop", [("noise_arl", 1), ("patrol", 2)])
def test_resume_after_kill_gives_identical_weights(tmp_path, defence, stop):
    args = ["--defense", defence, "--cem-lambda", "16", "--epochs", "3"]
    if defence == "patrol":
        args += ["--prune-epoch", "2"]
    full = _run(tmp_path, *args, name="full")
    part = _run(tmp_path, *args, "--stop-after-epoch", str(stop), name="part")
    assert not (part / "final.pt").exists()
    with pytest.raises(FileNotFoundError, match="final.pt"):
        load_run(part)
    assert load_run(part, which="checkpoint").metrics[-1]["epoch"] == stop
    assert [r["epoch"] for r in _metrics(part)] == list(range(1, stop + 1))
    _run(tmp_path, *args, "--resume", name="part")
    a, b = _final_state(full), _final_state(part)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["cem"]:
        if isinstance(a["cem"][k], torch.Tensor):
            assert torch.equal(a["cem"][k], b["cem"][k]), k
    ra, rb = _metrics(full), _metrics(part)
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [r["test_acc"] for r in ra] == [r["test_acc"] for r in rb]


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path):
    args = ["--defense", "noise", "--cem-lambda", "16", "--epochs", "2"]
    full = _run(tmp_path, *args, name="full")
    killed = _run(tmp_path, *args, "--stop-after-epoch", "1", name="killed")
    (killed / "checkpoint.pt").unlink()  # as if killed during epoch 1: config.json and a stray metrics line
    _run(tmp_path, *args, "--resume", name="killed")
    assert [r["epoch"] for r in _metrics(killed)] == [1, 2]
    a, b = _final_state(full), _final_state(killed)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with pytest.raises(SystemExit):  # the stored settings still bind
        train.main([*TINY, "--out", str(killed), "--defense", "nopeek", "--cem-lambda", "0", "--resume"])
    with pytest.raises(SystemExit, match="2"):  # nothing there at all: argparse error
        train.main([*TINY, "--out", str(tmp_path / "none"), *args, "--resume"])


def test_resume_refuses_changed_settings(tmp_path):
    out = _run(tmp_path, "--defense", "noise", "--cem-lambda", "0", "--stop-after-epoch", "1")
    with pytest.raises(SystemExit):
        train.main([*TINY, "--out", str(out), "--defense", "nopeek", "--cem-lambda", "0", "--resume"])
    assert train.main([*TINY, "--out", str(out), "--defense", "noise", "--cem-lambda", "0"]) == 2
    with pytest.raises(FileExistsError, match="--resume"):  # the library call says the same
        train.run(train.resolve_config(train.build_parser().parse_args([*TINY, "--out", str(out)])), out)


def test_resume_of_a_run_from_before_dtype_existed(tmp_path):
    out = _run(tmp_path, "--defense", "noise", "--cem-lambda", "0", "--epochs", "2", "--stop-after-epoch", "1")
    config = json.loads((out / "config.json").read_text())
    assert config.pop("dtype") == "float32"
    (out / "config.json").write_text(json.dumps(config))
    assert (
        train.main([*TINY, "--out", str(out), "--defense", "noise", "--cem-lambda", "0", "--epochs", "2", "--resume"])
        == 0
    )
    assert [r["epoch"] for r in _metrics(out)] == [1, 2]
    with pytest.raises(SystemExit):  # a float64 resume of a float32 run is a different run
        train.main(
            [
                *TINY,
                "--out",
                str(out),
                "--defense",
                "noise",
                "--cem-lambda",
                "0",
                "--epochs",
                "2",
                "--dtype",
                "float64",
                "--resume",
            ]
        )


def test_lambda_zero_builds_no_cem(tmp_path, monkeypatch):
    built = []

    class Spy(cem_fast.CEMLoss):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(cem_fast, "CEMLoss", Spy)
    _run(tmp_path, "--defense", "bottleneck", "--cem-lambda", "0", "--epochs", "1", name="off")
    assert built == []
    _run(tmp_path, "--defense", "bottleneck", "--cem-lambda", "4", "--epochs", "1", name="on")
    assert built == [1]  # the spy does see a CEM run, so the 0 above is meaningful


def test_official_schedule_and_config_record(tmp_path):
    out = _run(
        tmp_path,
        "--defense",
        "noise",
        "--cem-lambda",
        "16",
        "--cem-schedule",
        "official",
        "--lr-schedule",
        "authors",
        "--authors-warmup-bug",
        "--cem-refit",
        "extra-pass",
        "--seed",
        "3",
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["cem_schedule"] == "official" and cfg["cem_refit"] == "extra-pass" and cfg["seed"] == 3
    assert cfg["preset"] == "smoke" and cfg["data_root"] is None and "torch" in cfg["versions"]
    rows = _metrics(out)
    assert rows[0]["lr"] == 0.0  # the authors' warm-up bug: epoch 1 at LR 0
    assert rows[1]["lambda_eff"] == pytest.approx(cem_weight("official", 16, rows[1]["lr_server"]))
    assert cem_weight("official", 16, 0.05) == pytest.approx(16 * 0.001 / 0.05)


def test_presets_resolve():
    def cfg(*argv):
        return train.resolve_config(train.build_parser().parse_args(["--out", "x", *argv]))

    c = cfg("--preset", "paper", "--arch", "resnet20", "--data-root", "/tmp")
    assert (c["epochs"], c["cut"], c["dataset"], c["batch_size"], c["lr"]) == (120, 5, "cifar10", 128, 0.05)
    assert c["train_subset"] is None and c["lr_schedule"] == "paper" and c["cem_schedule"] == "constant"
    c = cfg("--preset", "paper")
    assert (c["epochs"], c["cut"], c["dataset"]) == (240, 4, "cifar10-sample")  # offline without --data-root
    c = cfg("--preset", "cpu", "--data-root", "/tmp", "--epochs", "3", "--defense", "none", "--cem-lambda", "0")
    assert (c["epochs"], c["train_subset"], c["bottleneck"], c["noise_on"]) == (3, 10_000, "none", False)
    assert cfg("--preset", "cpu", "--full-data")["train_subset"] is None


def test_lr_factors():
    paper = LRFactor("paper", 240)
    assert [paper(e) for e in (0, 59, 60, 120, 180, 239)] == pytest.approx([1, 1, 0.2, 0.04, 0.008, 0.008])
    authors = LRFactor("authors", 240, warmup_bug=True)
    assert [authors(e) for e in (0, 1, 58, 59, 209)] == pytest.approx([0, 1, 1, 0.2, 0.2**4])
    assert LRFactor("cosine", 10)(0) == 1 and LRFactor("cosine", 10)(5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        LRFactor("step", 10)


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--cem-lambda", "-1"], "--cem-lambda"),
        (["--epochs", "0"], "--epochs"),
        (["--defense", "magic"], "defence"),
        (["--sigma", "0", "--cem-lambda", "16"], "--sigma"),
        (["--dropout-rate", "0.3", "--defense", "noise"], "--dropout-rate"),
        (["--bottleneck", "C8X"], "bottleneck"),
        (["--defense", "patrol", "--pruning-ratio", "abc"], "--pruning-ratio"),
        (["--defense", "patrol", "--pruning-ratio", "1.5"], "pruning_ratio"),
        (["--cem-backend", "gpu"], "--cem-backend"),
        (["--arch", "vgg11_bn", "--cut", "40"], "cut"),
    ],
)
def test_bad_cli_values_name_the_flag(tmp_path, capsys, argv, flag):
    with pytest.raises((SystemExit, ValueError)) as info:
        train.main([*TINY, "--out", str(tmp_path / "bad"), *argv])
    text = capsys.readouterr().err + str(info.value)
    assert flag in text
    assert not (tmp_path / "bad" / "config.json").exists()  # nothing written for a bad command


def test_collapse_warning():
    cfg = {"sigma": 0.025, "num_classes": 10}
    with pytest.warns(train_loop.Collapse, match="variance"):
        train_loop.check_collapse({"epoch": 1, "feature_var": 1e-9, "train_acc": 0.9}, cfg)
    with pytest.warns(train_loop.Collapse, match="chance"):
        train_loop.check_collapse({"epoch": 3, "feature_var": 0.1, "train_acc": 0.1}, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_loop.check_collapse({"epoch": 3, "feature_var": 0.1, "train_acc": 0.6}, cfg)
