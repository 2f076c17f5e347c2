"""reproduce.records and reproduce.results_check: records of smoke runs, and the artifacts rebuilt from them."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reproduce import records, results_check, table
from reproduce.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
SMOKE = results_check.REGISTRIES["smoke"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke grid's two runs (trained and attacked) and their records: (runs folder, records folder)."""
    from reproduce.grid import run_grid

    base = tmp_path_factory.mktemp("records")
    runs = base / "runs"
    run_grid("smoke", runs_root=runs, out_dir=base, device="cpu", threads=1, log=lambda _m: None)
    recs = base / "records"
    for rd in (RunDir(p.parent) for p in sorted(runs.rglob("final.pt"))):
        records.save_record(rd, recs, grid="smoke")
    return runs, recs


def _pairs(smoke):
    runs, recs = smoke
    out = [(rd, RunDir(recs / "smoke" / rd.path.relative_to(runs))) for rd in map(RunDir, sorted(runs.glob("*/seed*")))]
    assert len(out) == 2
    return out


def _tree(recs, tmp_path):
    """A fresh results folder with a copy of the records at results/runs."""
    results = tmp_path / "results"
    shutil.copytree(recs, results / "runs")
    return results


def _check(results, *extra):
    return results_check.main(["--registry", "smoke", "--results", str(results), *extra])


def test_record_is_small_has_no_machine_path_and_only_record_files(smoke):
    for run, rec in _pairs(smoke):
        assert rec.is_record and records.check_record(rec) == []
        names = {p.name for p in rec.path.iterdir()}
        assert names == {
            "config.json",
            "metrics.jsonl",
            "record.json",
            "encoder.pt",
            "attack_decoder.json",
            "attack_decoder_samples.pt",
        } | ({"bound.json"} if run.bound_path.is_file() else set())
        assert sum(p.stat().st_size for p in rec.path.iterdir()) < records.MAX_BYTES
        machine = str(smoke[0].parent).encode()
        for p in rec.path.iterdir():
            assert machine not in p.read_bytes(), p.name
        name = rec.path.relative_to(smoke[1] / "smoke").as_posix()
        assert rec.attack_record("decoder")["run"] == f"runs/smoke/{name}"
        assert rec.metrics_path.read_bytes() == run.metrics_path.read_bytes()
        assert rec.read_config()["seed"] == run.read_config()["seed"]
        samples = torch.load(rec.attack_samples_path("decoder"), weights_only=True)
        for entry in samples["settings"].values():
            assert entry["original"].dtype == entry["reconstruction"].dtype == torch.uint8
            assert len(entry["original"]) <= records.NUM_SAMPLES


def test_record_keeps_learning_curves_and_class_histograms(smoke):
    for run, rec in _pairs(smoke):
        for setting in ("train_time", "infer_time"):
            entry, live = rec.attack_entry("decoder", setting), run.attack_entry("decoder", setting)
            assert entry["metrics"] == live["metrics"]
            assert [p["epoch"] for p in entry["learning_curve"]] == list(range(entry["epochs"] + 1))
            assert all("val_mse" in p for p in entry["learning_curve"])
            assert sum(entry["scored_class_counts"]) == entry["n_scored"] == entry["metrics"]["n_images"]
            assert sum(entry["train_class_counts"]) == entry["sizes"]["fit"]


def test_encoder_weights_give_the_runs_features(smoke):
    from reproduce.runs import load_run

    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for run, rec in _pairs(smoke):
        encoder = records.load_encoder(rec)
        with torch.no_grad():
            assert torch.equal(encoder(x), load_run(run.path).model.encoder(x))
        state = torch.load(rec.encoder_path, weights_only=True)
        assert set(state) == set(load_run(run.path).model.encoder.state_dict())


def test_record_reads_as_finished_but_is_never_attacked_resumed_or_loaded(smoke, capsys):
    from reproduce import pipeline, train
    from reproduce.attack import run_attack
    from reproduce.runs import load_run

    run, rec = _pairs(smoke)[0]
    assert rec.finished and not rec.resumable and rec.status() == "record"
    assert rec.final_accuracy() == run.final_accuracy()
    assert table.collect_run(rec.path) == table.collect_run(run.path)
    entries = pipeline.ensure_attacked(rec, "decoder", ("train_time", "infer_time"))  # all there: only reads
    assert entries["train_time"]["metrics"] == run.attack_entry("decoder", "train_time")["metrics"]
    with pytest.raises(ValueError, match="committed record.*not attacked"):
        run_attack(rec.path, "gan")
    with pytest.raises(ValueError, match="committed record"):
        load_run(rec.path)
    assert train.main(["--out", str(rec.path), "--resume"]) == 2
    assert "not resumed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already a record"):
        records.record_files(rec.path, "x/seed0", "smoke")


def test_save_refuses_to_overwrite_or_to_exceed_the_budget(smoke, tmp_path, monkeypatch):
    run, rec = _pairs(smoke)[0]
    with pytest.raises(FileExistsError, match="--replace"):
        records.save_record(run, smoke[1], grid="smoke")
    out = records.save_record(run, tmp_path, grid="g", name="a/seed0", num_samples=2)
    assert records.check_record(out) == []
    assert (
        len(
            torch.load(RunDir(out).attack_samples_path("decoder"), weights_only=True)["settings"]["train_time"][
                "original"
            ]
        )
        == 2
    )
    assert records.save_record(run, tmp_path, grid="g", name="a/seed0", replace=True) == out
    with pytest.raises(ValueError, match="'..'"):
        records.save_record(run, tmp_path, grid="..", name="a/seed0")
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "metrics.jsonl", "final.pt", "attack_decoder.json"):
        shutil.copy(run.path / name, copy / name)
    report = json.loads((copy / "attack_decoder.json").read_text())
    report["settings"]["train_time"]["data"]["attack_test"] = "images from /home/someone/data"
    (copy / "attack_decoder.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="absolute path in settings.train_time.data.attack_test"):
        records.save_record(copy, tmp_path, grid="g", name="c/seed0")
    del report["settings"]["infer_time"]["metrics"]
    report["settings"]["train_time"]["data"]["attack_test"] = "test images"
    (copy / "attack_decoder.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="infer_time: no metrics"):
        records.save_record(copy, tmp_path, grid="g", name="c/seed0")
    assert not (tmp_path / "g" / "c").exists() and not list((tmp_path / "g").glob(".*"))
    monkeypatch.setattr(records, "MAX_BYTES", 10_000)
    with pytest.raises(ValueError, match="over 10000"):
        records.save_record(run, tmp_path, grid="g", name="b/seed0")
    assert not (tmp_path / "g" / "b").exists()


def test_records_give_the_same_table_and_figures_as_the_runs(smoke):
    from reproduce import figure, figures_curves

    runs, recs = smoke
    recs = recs / "smoke"

    def table_csv(root):
        opts = table.Options(
            preset="smoke",
            runs_root=root,
            seeds=[0],
            data=table.ResolvedData("cifar10-sample", None, "x"),
            device=None,
            attacks=("decoder",),
            log=lambda _m: None,
        )
        return table.csv_text(table.render_table(1, opts)[2])

    assert table_csv(runs) == table_csv(recs)
    assert "0.0" in table_csv(recs)  # cells are filled, not all missing
    f4 = [figures_curves.figure4_data([root], root=root, log=lambda _m: None) for root in (runs, recs)]
    assert f4[0] == f4[1] and len(f4[0]["families"]) == 2
    names = [p.relative_to(runs).as_posix() for p in sorted(runs.glob("*/seed*"))]
    f5 = [figure.figure5_data([root / n for n in names], names=names) for root in (runs, recs)]
    assert f5[0] == f5[1] and len(f5[0]["rows"]) == 3


def test_results_check_passes_then_fails_on_an_edited_number(smoke, tmp_path, capsys):
    results = _tree(smoke[1], tmp_path)
    assert _check(results) == 1  # nothing written yet
    assert _check(results, "--write") == 0
    assert {p.name for p in results.iterdir()} == {
        "runs",
        "table1_smoke.md",
        "table1_smoke.csv",
        "figure4_smoke.json",
        "figure4_smoke.png",
        "figure5_smoke.json",
        "figure5_smoke.png",
        "regime_smoke.md",
    }
    capsys.readouterr()
    assert _check(results) == 0
    assert "FAIL" not in capsys.readouterr().out
    path = next((results / "runs").rglob("attack_decoder.json"))
    report = json.loads(path.read_text())
    old = report["settings"]["train_time"]["metrics"]["mse"]
    report["settings"]["train_time"]["metrics"]["mse"] = old * 2
    path.write_text(json.dumps(report, indent=2))
    assert _check(results) == 1
    out = capsys.readouterr().out
    assert "--- committed/figure4_smoke.json" in out and "+++ from-records/figure4_smoke.json" in out
    assert f'-     "mse": {old},' in out and f'+     "mse": {old * 2},' in out
    assert "FAIL table1_smoke: table1_smoke.csv differs" in out


def test_committed_artifact_without_records_fails(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    assert _check(results) == 0  # no records, no artifacts: "no records yet" everywhere
    assert capsys.readouterr().out.count("no records yet") == len(SMOKE.artifacts)
    (results / "table1_smoke.md").write_text("# a table\n")
    assert _check(results) == 1
    assert "table1_smoke.md committed without records" in capsys.readouterr().out
    assert _check(results, "--write") == 0 and not (results / "table1_smoke.md").exists()
    (results / "notes.txt").write_text("x")
    assert _check(results) == 1
    assert "notes.txt: in results/ but no artifact" in capsys.readouterr().out


def test_check_flags_a_broken_record(smoke, tmp_path, capsys):
    results = _tree(smoke[1], tmp_path)
    assert _check(results, "--write") == 0
    rec = RunDir(next((results / "runs").rglob("record.json")).parent)
    report = rec.attack_record("decoder")
    del report["settings"]["infer_time"]["scored_class_counts"]
    train_time = report["settings"]["train_time"]
    train_time["data"]["attack_test"] = "/home/someone/data"
    n = train_time["n_scored"]
    train_time["scored_class_counts"] = [n - 9 * (n // 20)] + [n // 20] * 9  # one class holds about half
    rec.attack_record_path("decoder").write_text(json.dumps(report))
    (rec.path / "final.pt").write_bytes(b"")
    problems = records.check_record(rec)
    assert any("infer_time: no scored_class_counts" in p for p in problems)
    assert any("train_time: scored_class_counts" in p and "not balanced within 10 %" in p for p in problems)
    assert any("absolute path in settings.train_time.data.attack_test" in p for p in problems)
    assert any(p.startswith("final.pt: not a record file") for p in problems)
    capsys.readouterr()
    assert _check(results) == 1
    assert "FAIL record smoke/" in capsys.readouterr().out


def test_class_balance_allows_one_image_of_rounding_and_ten_percent():
    assert records.class_balanced([100] * 10) and records.class_balanced([1, 1, 0, 0])
    assert records.class_balanced([105, 96, 100]) and not records.class_balanced([112, 100, 100])
    assert not records.class_balanced([2, 0])


def test_absolute_paths():
    hits = records.absolute_paths(
        {
            "a": "/tmp/x",
            "b": "../shared/data",
            "c": ["10*log10(1/MSE_batch)", "cmd --out=/srv/r"],
            "d": "C:\\data",
            "e": "MSE with / without",
        }
    )
    assert [h.split(":")[0] for h in hits] == ["a", "c[1]", "d"]
    assert records.absolute_paths({"n": 1, "s": "runs/cpu/x/seed1"}) == []


def test_record_name_and_command_relativized():
    cfg = {"dataset": "cifar10", "arch": "vgg11_bn", "defence": "noise", "sigma": 0.025, "cem_lambda": 16.0, "seed": 3}
    assert records.record_name(cfg) == "cifar10_vgg11_bn_noise_lam16_sigma0.025/seed3"
    assert records.record_name({**cfg, "cem_variant": "official"}).endswith("_official/seed3")
    with pytest.raises(ValueError, match="'seed'"):
        records.record_name({k: v for k, v in cfg.items() if k != "seed"})
    cmd = records._relative_command("python -m reproduce.train --data-root /d --out /abs/run --seed 1", "runs/x/seed1")
    assert cmd == "python -m reproduce.train --data-root ../shared/data --out runs/x/seed1 --seed 1"


def test_committed_results_match_their_records_on_a_fresh_clone(tmp_path):
    """The repository's own records and artifacts, from another folder, with no data folder anywhere."""
    env = {**os.environ, "CEM_FAST_DATA": str(tmp_path / "no-data"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "reproduce.results_check"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every artifact matches" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_figure3_slot_calls_the_hook_once_records_have_a_bound(tmp_path, monkeypatch, capsys):
    import importlib.machinery
    import types

    calls = []
    fake = types.ModuleType(results_check.FIGURE3_MODULE)
    fake.__spec__ = importlib.machinery.ModuleSpec(results_check.FIGURE3_MODULE, None)
    fake.figure3_data = lambda grid_dir: {
        "bounds": sorted(json.loads(p.read_text())["b"] for p in grid_dir.rglob("bound.json"))
    }
    fake.figure3_plot = lambda data, out: calls.append(data) or Path(out).write_bytes(b"png")
    monkeypatch.setitem(sys.modules, results_check.FIGURE3_MODULE, fake)
    registry = results_check.Registry("t", (results_check.figure3_artifact("g"),))
    results, recs = tmp_path / "results", tmp_path / "results" / "runs"
    rd = RunDir(recs / "g" / "arm" / "seed0")
    rd.write_config({"seed": 0})
    rd.write_metrics([{"epoch": 1, "test_acc": 0.5}])
    rd.record_path.write_text(json.dumps({"format": 1, "weights": None}))
    assert results_check.check(registry, recs, results) == 0
    assert "no record in" in capsys.readouterr().out and not calls
    rd.bound_path.write_text(json.dumps({"b": 1.5}))
    assert results_check.check(registry, recs, results) == 2  # figure3_g.json and its PNG are missing
    assert results_check.check(registry, recs, results, write=True) == 0
    assert calls == [{"bounds": [1.5]}] and (results / "figure3_g.png").is_file()
    assert json.loads((results / "figure3_g.json").read_text()) == {"bounds": [1.5]}
    assert results_check.check(registry, recs, results) == 0


def test_preset_table_reads_each_records_final_accuracy_and_machine(smoke):
    from reproduce import preset_compare

    for run, rec in _pairs(smoke):
        row = preset_compare.preset_row(rec, "x")
        final = run.metrics()[-1]["test_acc"]
        assert row["final_acc"] == round(100 * final, 2)
        assert row["epochs"] == f"{len(run.metrics())} / {run.read_config()['epochs']}"
        assert row["cpu"] == run.read_config()["machine"]["cpu"] != "not recorded"
    text = preset_compare.preset_markdown([preset_compare.preset_row(r, r.path.name) for _, r in _pairs(smoke)], "t")
    assert text.count("\n| ") == 3  # header + two rows
    with pytest.raises(ValueError, match="has not finished"):
        preset_compare.preset_row(smoke[0] / "nothing")


def test_record_states_lambda_in_the_papers_units(smoke):
    from reproduce.strength import config_paper_units

    for run, rec in _pairs(smoke):
        cfg, marker = run.read_config(), rec.read_record_marker()
        if cfg["cem_lambda"] > 0:
            assert marker["cem"]["lambda"] == cfg["cem_lambda"]
            assert marker["cem"]["lambda_paper_units"] == config_paper_units(cfg, cfg["train_size"])
        else:
            assert marker["cem"] is None


def test_a_restored_record_attacks_like_its_run_and_saves_again(smoke, tmp_path):
    from reproduce import pipeline
    from reproduce.runs import load_run

    run, rec = _pairs(smoke)[0]
    restored = records.restore_record(rec, tmp_path / "live" / "arm" / "seed0")
    assert restored.is_restored and restored.finished and not restored.resumable
    assert restored.status() == "restored" and not restored.final_path.exists()
    assert restored.missing_settings("decoder", ("train_time", "infer_time")) == []
    assert pipeline.ensure_trained(restored.path, preset="smoke", log=lambda _m: None) == restored  # no retraining
    assert not restored.final_path.exists()
    live, back = load_run(run.path), load_run(restored.path)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(live.model.encoder(x), back.model.encoder(x))
        with pytest.raises(RuntimeError, match="restored from a record"):
            back.model(x)
    with pytest.raises(ValueError, match="no checkpoint.pt"):
        load_run(restored.path, which="checkpoint")
    # an attack the record does not have yet gives the numbers it gives on the live run; its decoder (the
    # record keeps no decoder weights) is retrained with the recorded decoder's settings, so it is the same one
    for target in (run, restored):
        pipeline.ensure_attacked(target, "whitebox", ("train_time",), preset="smoke", log=lambda _m: None)
    assert restored.attack_entry("decoder", "train_time") != {}
    for key in ("metrics", "config", "learning_curve"):
        assert restored.attack_entry("decoder", "train_time")[key] == run.attack_entry("decoder", "train_time")[key]
    assert (
        restored.attack_entry("whitebox", "train_time")["metrics"]
        == run.attack_entry("whitebox", "train_time")["metrics"]
    )
    again = RunDir(records.save_record(restored, tmp_path / "recs", grid="smoke", name="arm/seed0"))
    assert records.check_record(again) == [] and again.attacked("whitebox") and again.attacked("decoder", "infer_time")
    assert again.read_record_marker()["restored"]["record_saved_at"] == rec.read_record_marker()["saved_at"]
    assert again.metrics_path.read_bytes() == rec.metrics_path.read_bytes()
    assert torch.equal(records.load_encoder(again)(x), records.load_encoder(rec)(x))
    with pytest.raises(FileExistsError, match="not empty"):
        records.restore_record(rec, restored.path)
    with pytest.raises(ValueError, match="not a record"):
        records.restore_record(run, tmp_path / "other")
    name = rec.read_record_marker()["name"]
    assert records.main(["restore", str(rec.path), "--runs-root", str(tmp_path / "cli"), "--data-root", "d"]) == 0
    assert (
        RunDir(tmp_path / "cli" / name).is_restored
        and RunDir(tmp_path / "cli" / name).read_config()["data_root"] == "d"
    )
    assert records.main(["restore", str(rec.path), "--runs-root", str(tmp_path / "cli")]) == 1  # there already


@pytest.mark.parametrize("name", __import__("reproduce.defences", fromlist=["DEFENCES"]).DEFENCES)
def test_every_defences_perturbation_depends_on_its_config_alone(smoke, name):
    """Why a restored run (no defence state kept) perturbs the features as its trained defence did."""
    from reproduce.runs import build_model, build_run_defence, setup_defence

    config = {**_pairs(smoke)[0][0].read_config(), "defence": name, "defence_options": {}}
    config["extra_client_layer"] = build_run_defence(config).extra_client_layer
    model = build_model(config)
    fresh, trained = build_run_defence(config), build_run_defence(config)
    for d in (fresh, trained):
        setup_defence(d, model, config, "cpu")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in [*trained.parameters(), *trained.buffers()]:  # a stand-in for whatever training left there
            t.copy_(
                torch.randn(t.shape, generator=gen)
                if t.is_floating_point()
                else torch.randint(0, 7, t.shape, generator=gen)
            )
    z = model.encoder(torch.rand(3, 3, 32, 32, generator=gen)).detach()
    outs = []
    for d in (fresh.eval(), trained.eval()):
        torch.manual_seed(3)
        outs.append(d.perturb(z))
    assert torch.equal(outs[0], outs[1])


def test_regime_table_groups_seeds_and_divides_by_the_arm_without_cem(smoke, tmp_path):
    from reproduce import regime_table

    recs = tmp_path / "g"
    shutil.copytree(smoke[1] / "smoke", recs)
    arms = sorted(p.name for p in recs.iterdir())
    mse = {0: (0.02, 0.03), 16: (0.05, 0.07)}  # (whitebox, adaptive) per lambda, stand-ins for the ladder
    for arm in arms:
        lam = 16 if "lam16" in arm else 0
        rd = RunDir(recs / arm / "seed0")
        for attack, value in zip(("whitebox", "adaptive"), mse[lam]):
            entry = {**rd.attack_entry("decoder", "train_time"), "metrics": {"mse": value}}
            rd.attack_record_path(attack).write_text(json.dumps({"settings": {"train_time": entry}}))
        second = recs / arm / "seed1"  # a second seed, 2 points more accurate
        shutil.copytree(rd.path, second)
        cfg = json.loads((second / "config.json").read_text())
        (second / "config.json").write_text(json.dumps({**cfg, "seed": 1}))
        rows = RunDir(second).metrics()
        rows[-1]["test_acc"] += 0.02
        RunDir(second).write_metrics(rows)
    rows = regime_table.regime_rows(recs)
    assert [r["arm"].endswith("no CEM") for r in rows] == [True, False] and [r["seeds"] for r in rows] == ["0, 1"] * 2
    live = [RunDir(smoke[1] / "smoke" / arm / "seed0") for arm in arms]
    worst = [
        min(rd.attack_metric("decoder", "train_time", "mse"), *mse[16 if "lam16" in rd.path.parent.name else 0])
        for rd in live
    ]
    by_lam = dict(zip((0 if "lam0" in a else 16 for a in arms), worst))
    assert rows[0]["worst"] == f"{by_lam[0]:.4f} ± 0.0000" and rows[1]["gain"] == f"x{by_lam[16] / by_lam[0]:.2f}"
    acc = 100 * live[0].final_accuracy()
    mean, sd = rows[0]["acc"].split(" ± ")
    assert float(mean) == pytest.approx(acc + 1, abs=0.006) and float(sd) == pytest.approx(2**0.5, abs=0.006)
    assert rows[1]["strength"] != "-" and rows[0]["strength"] == "-"
    text = regime_table.regime_markdown(rows)
    assert (
        "Noise_ARL+CEM: 87.62 % accuracy, decoder MSE 0.0330" in text and text.count("\n| ") == 3
    )  # the header and two rows
