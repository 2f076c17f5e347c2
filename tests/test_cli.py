"""The command lines' rough edges: Ctrl-C, an existing --out, a missing --data-root, file modes and sizes,
progress bars off a terminal, and every --help listing every choice."""

import argparse
import stat
import sys

import pytest
import torch
from helpers import TINY_TRAIN

from reproduce import figure, grid, table, train, train_loop
from reproduce.rundir import RunDir

TINY = [
    *TINY_TRAIN,
    "--epochs",
    "2",
    "--defense",
    "noise",
    "--cem-lambda",
    "0",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_ctrl_c_ends_with_one_line_naming_the_resume_command_which_works(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = train.train_epoch

    def interrupted_in_epoch_2(epoch, *a, **k):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(epoch, *a, **k)

    monkeypatch.setattr(train, "train_epoch", interrupted_in_epoch_2)
    assert train.main([*TINY, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "interrupted after 1 finished epoch" in lines[0]
    hint = lines[0].split("`")[1]
    assert hint == f"python -m reproduce.train --out {out} --resume"
    monkeypatch.setattr(train, "train_epoch", real)
    # The hint as printed (only --out and --resume) finishes the run with its stored settings.
    assert train.main(hint.split()[3:]) == 0
    rd = RunDir(out)
    assert rd.finished and [r["epoch"] for r in rd.metrics()] == [1, 2]
    assert rd.read_config()["preset"] == "smoke"


def test_ctrl_c_in_an_attack_or_an_audit_is_one_line(tmp_path, capsys, monkeypatch):
    from cem_fast.audit import __main__ as audit_cli
    from reproduce import attack

    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(attack, "run_attack", interrupted)
    argv = ["--run", str(out), "--attack", "decoder", "--fresh", "--no-progress"]
    assert attack.main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "resumes" in err
    again = err.split("`")[1]
    assert again == f"python -m reproduce.attack --run {out} --attack decoder --no-progress"  # without --fresh
    attack.build_parser().parse_args(again.split()[3:])

    monkeypatch.setattr(audit_cli, "run", interrupted)
    assert audit_cli.main(["--help-is-not-parsed-here"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: interrupted") and "rerun" in err


def test_existing_out_suggests_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert train.main([*TINY, "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "FileExistsError" not in err
    assert len(err.splitlines()) == 1 and f"python -m reproduce.train --out {out} --resume" in err
    # A finished run resumed is left as it is.
    assert train.main(["--out", str(out), "--resume", "--no-progress"]) == 0


def test_missing_data_root_is_one_line_and_downloads_nothing(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    class NoDownload(torchvision.datasets.CIFAR10):
        def __init__(self, *a, download=False, **k):
            if download:
                pytest.fail("a download was attempted")
            super().__init__(*a, download=False, **k)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoDownload)
    assert train.main([*TINY, "--dataset", "cifar10", "--data-root", "/nonexistent", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/nonexistent" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train.main([*TINY, "--dataset", "cifar10", "--data-root", str(empty), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dataset 'cifar10' not found") and "Traceback" not in err
    assert "download" in err  # it says how to get the data


def test_download_only_with_download(tmp_path, capsys, monkeypatch):
    """--download is what lets torchvision fetch a missing CIFAR set (here it "fails" offline: one line)."""
    import torchvision.datasets

    asked = []

    class Offline(torchvision.datasets.CIFAR10):
        def __init__(self, *a, download=False, **k):
            asked.append(download)
            if download:
                raise RuntimeError("no network in this test")
            super().__init__(*a, download=False, **k)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    root = tmp_path / "empty"
    root.mkdir()
    argv = [*TINY, "--dataset", "cifar10", "--data-root", str(root), "--download", "--out", str(tmp_path / "a")]
    assert train.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert asked == [True] and "no network in this test" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_run_files_are_0644_and_small(tmp_path):
    out = tmp_path / "run"
    assert train.main([*TINY, "--arch", "resnet20", "--epochs", "1", "--out", str(out)]) == 0
    files = [p for p in out.iterdir() if p.is_file()]
    assert {p.name for p in files} == {RunDir.CONFIG, RunDir.METRICS, RunDir.FINAL}  # checkpoint.pt: not kept
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p.name
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    stopped = tmp_path / "stopped"
    assert train.main([*TINY, "--arch", "resnet20", "--out", str(stopped), "--stop-after-epoch", "1"]) == 0
    assert stat.S_IMODE(RunDir(stopped).checkpoint_path.stat().st_mode) == 0o644
    ckpt = torch.load(RunDir(stopped).checkpoint_path, weights_only=False)
    assert "config" not in ckpt  # what resume needs, once: the config lives in config.json


def test_a_smoke_run_and_its_attack_stay_under_10_mb(tmp_path, monkeypatch):
    """`python -m reproduce.train --preset smoke` and a smoke decoder attack: each file once, 0644, < 10 MB in all;
    the finished attack keeps only best.pt, and a rerun re-scores from it without training."""
    import json

    from cem_fast.audit.decoder import DecoderAttack
    from reproduce import attack

    out = tmp_path / "run"
    assert train.main(["--preset", "smoke", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    assert attack.main(["--run", str(out), "--attack", "decoder", "--no-progress", "--threads", "1"]) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name == "checkpoint.pt"], files
    assert {p.relative_to(out).as_posix() for p in files if p.suffix == ".pt"} == {
        RunDir.FINAL,
        "attack_decoder_samples.pt",
        "attack_decoder/train_time/best.pt",
        "attack_decoder/infer_time/best.pt",
    }
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert sum(p.stat().st_size for p in files) < 10 * 2**20, {p.name: p.stat().st_size for p in files}
    first = json.loads((out / "attack_decoder.json").read_text())["settings"]["train_time"]

    def no_training(*a, **k):
        raise AssertionError("a finished attack was trained again")

    monkeypatch.setattr(DecoderAttack, "epoch", no_training)
    argv = ["--run", str(out), "--attack", "decoder", "--setting", "train_time", "--no-progress", "--threads", "1"]
    assert attack.main(argv) == 0
    again = json.loads((out / "attack_decoder.json").read_text())["settings"]["train_time"]
    assert again["metrics"] == first["metrics"] and again["learning_curve"] == first["learning_curve"]


def test_every_hint_is_a_command_its_parser_accepts(tmp_path, capsys, monkeypatch):
    """The commands the CLIs print (table's missing runs and attacks, attacking an unfinished run, figure's
    missing samples, an interrupted grid) name only flags that exist."""
    import json
    import re

    from reproduce import attack, pipeline

    root = tmp_path / "runs"
    arm = table.table_arms(1)[0]
    done = root / "done"
    done.mkdir(parents=True)
    cfg = {"preset": "cpu", "dataset": "cifar10-sample", "arch": arm.arch, "defence": arm.defence, "seed": 125}
    cfg.update(cem_lambda=arm.cem_lambda, sigma=arm.sigma, cem_variant="paper")
    (done / "config.json").write_text(json.dumps(cfg))
    (done / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 0.5}) + "\n")
    (done / "final.pt").write_bytes(b"")
    assert table.main(["--table", "1", "--runs-root", str(root), "--out", str(tmp_path / "t1.md")]) == 0
    texts = {"table": capsys.readouterr().err}
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        attack.main(["--run", str(unfinished), "--attack", "decoder"])
    texts["attack"] = capsys.readouterr().err
    with pytest.raises(FileNotFoundError) as missing:
        figure.load_samples(done)
    texts["figure"] = str(missing.value)
    monkeypatch.setattr(pipeline, "ensure_trained", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert grid.main(["smoke", "--runs-root", str(tmp_path / "grid")]) == 130
    texts["grid"] = capsys.readouterr().err

    parsers = {
        "reproduce.train": train.build_parser,
        "reproduce.attack": attack.build_parser,
        "reproduce.table": table.build_parser,
        "reproduce.figure": figure.build_parser,
        "reproduce.grid": grid.build_parser,
    }
    for source, text in texts.items():
        text = "\n".join(line for line in text.splitlines() if not line.startswith(("usage:", " ")))  # not argparse's
        hints = re.findall(r"python -m ([\w.]+)(?![\w.:])((?: [^\s`]+)*)", text)  # not "prog: error:"
        assert hints, (source, text)
        for module, args in hints:
            parsers[module]().parse_args(args.split())  # SystemExit (exit 2) for a flag that does not exist
    assert f"`python -m reproduce.train --out {unfinished} --resume`" in texts["attack"]


def test_progress_bars_only_on_a_terminal(monkeypatch):
    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    from cem_fast.audit.data import progress_bar  # the attacks' and the audit's bars

    steps = range(3)
    monkeypatch.setattr(sys, "stderr", Tty(False))
    assert not train_loop.show_progress({"progress": True})
    assert progress_bar(steps, "attack") is steps  # default: no bar in a log file
    monkeypatch.setattr(sys, "stderr", Tty(True))
    assert train_loop.show_progress({"progress": True}) and not train_loop.show_progress({"progress": False})
    assert progress_bar(steps, "attack", progress=False) is steps  # --no-progress
    bar = progress_bar(steps, "attack", file=sys.stderr)
    assert bar is not steps and list(bar) == [0, 1, 2]


def _choices(parser: argparse.ArgumentParser):
    for action in parser._actions:
        for choice in action.choices or ():
            yield action, str(choice)


# Every command line of the repository: `python -m <module> --help` must list every choice of every option.
CLI_MODULES = [
    "reproduce.train",
    "reproduce.attack",
    "reproduce.table",
    "reproduce.figure",
    "reproduce.grid",
    "reproduce.summary",
    "reproduce.demo",
    "reproduce.lambda_guidance",
    "reproduce.bound",
    "reproduce.records",
    "reproduce.results_check",
    "reproduce.data.make_sample",
    "cem_fast.audit.__main__",
    "cem_fast.build",
    "bench.bench_backends_cpu",
    "bench.bench_kernels",
    "bench.bench_loss",
    "bench.epoch_speed",
    "bench.gpu_check_runner",
    "bench.gpu_checks",
    "bench.inference_overhead",
    "bench.launch_count",
    "bench.train_step",
]


class _Parsed(Exception):
    pass


def _parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The module's parser: ``build_parser()`` where it has one, else the one its ``main`` parses with."""
    import importlib

    module = importlib.import_module(name)
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def caught(self, *a, **k):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", caught)
    with pytest.raises(_Parsed) as parsed:
        module.main() if name == "bench.bench_backends_cpu" else module.main([])
    return parsed.value.args[0]


@pytest.mark.parametrize("name", CLI_MODULES)
def test_every_help_lists_every_choice(name, monkeypatch):
    parsers = [_parser_of(name, monkeypatch)]
    for p in parsers:
        text = " ".join(p.format_help().split())
        for action, choice in _choices(p):
            assert choice in text, (action.dest, choice)
        for action in p._actions:  # argparse's own listing, where the option has no metavar of its own
            if action.choices and action.metavar is None:
                assert "{" + ",".join(map(str, action.choices)) + "}" in text, (name, action.dest)
            if isinstance(action, argparse._SubParsersAction):  # `python -m X COMMAND --help` too
                parsers.extend(action.choices.values())


def test_figure_help_lists_every_figure():
    assert "--figure {3,4,5}" in figure.build_parser().format_help()


def test_train_help_names_every_defence_and_dataset():
    from reproduce.data import DATASETS
    from reproduce.defences import DEFENCES

    text = train.build_parser().format_help()
    assert all(d in text for d in DEFENCES) and all(d in text for d in DATASETS)


def test_grid_help_lists_every_grid(capsys):
    with pytest.raises(SystemExit):
        grid.main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in grid.GRIDS)


def test_table_and_train_share_the_default_preset():
    t = table.build_parser().parse_args(["--table", "1"])
    assert t.preset == train.resolve_config(train.build_parser().parse_args(["--out", "x"]))["preset"] == "cpu"


def test_the_docs_commands_at_the_smoke_preset(tmp_path, monkeypatch):
    """docs/reproduce.md's short version (train two arms with --out, attack, table --runs-root runs/, figure 5)."""
    from pathlib import Path

    from reproduce import attack

    monkeypatch.chdir(tmp_path)
    common = [
        *TINY_TRAIN,
        "--arch",  # the docs' runs are --preset cpu runs, VGG11-BN like Table 1's arms (smoke alone is ResNet-20)
        "vgg11_bn",
        "--defence",
        "bottleneck",
        "--sigma",
        "0.025",
    ]
    assert train.main([*common, "--cem-lambda", "0", "--out", "runs/bottleneck"]) == 0
    assert train.main([*common, "--cem-lambda", "16", "--out", "runs/bottleneck_cem"]) == 0
    for run in ("runs/bottleneck", "runs/bottleneck_cem"):
        assert (
            attack.main(
                [
                    "--run",
                    run,
                    "--attack",
                    "decoder",
                    "--epochs",
                    "1",
                    "--max-train-images",
                    "16",
                    "--max-test-images",
                    "20",
                    "--no-progress",
                    "--threads",
                    "1",
                ]
            )
            == 0
        )
    assert table.main(["--table", "1", "--preset", "smoke", "--runs-root", "runs/", "--out", "table1.md"]) == 0
    rows = {}
    for line in Path("table1.md").read_text().splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    for label in ("Bottleneck — w/o CEM", "Bottleneck — w/ CEM"):
        assert rows[label][0] != "—" and rows[label][4] != "—", rows[label]  # accuracy and decoder MSE found
    assert figure.main(["--figure", "5", "--runs", "runs/bottleneck", "runs/bottleneck_cem", "--out", "fig5.png"]) == 0
