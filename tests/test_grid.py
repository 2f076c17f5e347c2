"""reproduce.grid: a named grid runs job by job, resumes, and a finished grid reruns as a no-op."""

import json

import pytest
import torch

from reproduce import attack, bound, grid, train
from reproduce.rundir import RunDir


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_smoke_grid_runs_then_reruns_as_a_no_op(tmp_path, monkeypatch, capsys):
    root, out = tmp_path / "runs", tmp_path / "out"
    planned = grid.run_grid(
        "smoke", runs_root=root, out_dir=out, device="cpu", threads=1, dry_run=True, log=lambda m: None
    )
    assert len(planned) == 3 and not root.exists()  # a dry run writes nothing
    # Figure 3's bound for the run with noise (lambda 16 turns it on); the lambda-0 bottleneck run has none.
    assert planned[0].endswith("infer_time") and planned[1].endswith("infer_time, bound")
    done = grid.run_grid("smoke", runs_root=root, out_dir=out, device="cpu", threads=1, log=lambda m: None)
    assert done == planned
    for job in grid.GRIDS["smoke"].jobs:
        if isinstance(job, grid.RunJob):
            rd = RunDir(root / job.name)
            assert rd.finished and not rd.missing_settings("decoder", ("train_time", "infer_time"))
            assert (rd.read_bound() is not None) == (job.cem_lambda > 0)
    text = (out / "table1_smoke.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Bottleneck — w/ CEM"))
    assert row.split("|")[2].strip() not in ("", "—")  # the table found the grid's run

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(attack, "run_attack", lambda *a, **k: pytest.fail("a finished attack ran again"))
    monkeypatch.setattr(bound, "write", lambda *a, **k: pytest.fail("a stored bound was computed again"))
    assert grid.run_grid("smoke", runs_root=root, out_dir=out, device="cpu", log=lambda m: None) == []
    assert grid.main(["smoke", "--runs-root", str(root), "--dry-run"]) == 0
    assert grid.main(["--list", "--runs-root", str(root)]) == 0
    assert "smoke:" in capsys.readouterr().out
    smoke = grid.GRIDS["smoke"]
    assert grid.progress_text(smoke, root, None).startswith("2/2 run jobs done, 0 more trained")
    (root / smoke.jobs[1].name / "attack_decoder.json").unlink()  # its attacks are left, not its training
    assert grid.progress_text(smoke, root, None).startswith("1/2 run jobs done, 1 more trained with attacks left")
    assert grid.progress_text(smoke, tmp_path / "empty", None).startswith("0/2 run jobs done, 0 more trained")


def test_cpu_grid_replaces_the_shell_script():
    jobs = grid.GRIDS["cpu"].jobs
    runs = {j.name for j in jobs if isinstance(j, grid.RunJob)}
    # 3 seeds x (noise sigma 0.025 at lambda 0 and 16, noise sigma 0.1, noise_arl at lambda 0 and 16),
    # lambda 4 and sigma 0.05, 0.2, 0.4 at seed 125, and six more Table 1 defences with and without CEM at seed 125
    assert len(runs) == 3 * 5 + 4 + 6 * 2
    assert {f"cifar10_vgg11_bn_noise_lam0_sigma{s}/seed125" for s in ("0.05", "0.2", "0.4")} <= runs
    assert "cifar10_vgg11_bn_noise_arl_lam16_sigma0.025/seed127" in runs
    assert "cifar10_vgg11_bn_patrol_lam16_sigma0.025/seed125" in runs
    ladder = [j for j in jobs if isinstance(j, grid.RunJob)]
    assert all({a for a, _ in j.attacks} >= {"decoder", "whitebox", "adaptive"} for j in ladder)
    gan = {j.name for j in ladder if any(a == "gan" for a, _ in j.attacks)}
    assert len(gan) == 3 * 2 + 6 * 2  # Table 1's arms
    assert grid.GRIDS["cpu"].attack_overrides["decoder"].get("epochs") is None  # to convergence
    with pytest.raises(ValueError, match="grid must be one of"):
        grid.run_grid("nope")


def test_ctrl_c_in_a_grid_or_table_says_how_to_continue(tmp_path, monkeypatch, capsys):
    from reproduce import pipeline, table

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "ensure_trained", interrupted)
    assert grid.main(["smoke", "--runs-root", str(tmp_path / "runs")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "python -m reproduce.grid smoke" in err
    assert (
        table.main(
            [
                "--table",
                "1",
                "--preset",
                "smoke",
                "--runs-root",
                str(tmp_path / "runs"),
                "--run-missing",
                "--out",
                str(tmp_path / "t.md"),
            ]
        )
        == 130
    )
    assert "rerun the same command" in capsys.readouterr().err


def test_regime_grid_holds_issue_17s_arms():
    jobs = [j for j in grid.GRIDS["regime"].jobs if isinstance(j, grid.RunJob)]
    assert grid.GRIDS["regime"].preset == "cpu-full"
    names = {j.name for j in jobs}
    assert "cifar10_vgg11_bn_noise_lam16_sigma0.025_official-trained/seed125" in names
    trained = next(j for j in jobs if "official-trained" in j.name)
    assert dict(trained.train) == {"cem_variant": "official-trained", "cem_schedule": "official"}
    assert {j.seed for j in jobs if j.defence == "noise" and j.cem_lambda in (0, 16) and not j.train} == {125, 126}
    assert {(j.defence, j.cem_lambda) for j in jobs} >= {("noise", 80), ("noise_arl", 0), ("noise_arl", 16)}
    # the regime grid's first arms were attacked in float32, so all of them are; the cpu grid's decoders use
    # bf16 where the CPU has it
    assert not any("bf16_autocast" in o for o in grid.GRIDS["regime"].attack_overrides.values())
    cpu = grid.GRIDS["cpu"].attack_overrides
    assert cpu["decoder"]["bf16_autocast"] == cpu["adaptive"]["bf16_autocast"] == "auto"


def test_a_grid_saves_each_runs_record_as_it_goes(tmp_path):
    from reproduce import records

    recs = tmp_path / "records"
    grid.run_grid(
        "smoke",
        runs_root=tmp_path / "runs",
        out_dir=tmp_path,
        device="cpu",
        threads=1,
        records_root=recs,
        log=lambda m: None,
    )
    saved = sorted(p.parent for p in recs.rglob("record.json"))
    assert [p.relative_to(recs / "smoke").as_posix() for p in saved] == [
        j.name for j in grid.GRIDS["smoke"].jobs if isinstance(j, grid.RunJob)
    ]
    assert all(records.check_record(RunDir(p)) == [] and RunDir(p).attacked("decoder", "train_time") for p in saved)
    assert grid.GRIDS["cpu"].records and grid.GRIDS["regime"].records and not grid.GRIDS["smoke"].records


def test_a_job_whose_committed_record_is_complete_is_not_redone(tmp_path):
    recs = tmp_path / "records"
    kw = dict(out_dir=tmp_path, device="cpu", threads=1, records_root=recs, log=lambda m: None)
    grid.run_grid("smoke", runs_root=tmp_path / "runs", **kw)
    # a new machine: no runs/, only the committed records -> nothing left (the table exists too)
    assert grid.run_grid("smoke", runs_root=tmp_path / "fresh", dry_run=True, **kw) == []
    without = grid.run_grid("smoke", runs_root=tmp_path / "fresh", dry_run=True, **{**kw, "records_root": False})
    assert len([line for line in without if "train (not run)" in line]) == 2, without


def test_a_new_machine_restores_a_record_and_runs_only_the_attacks_left(tmp_path):
    recs = tmp_path / "records"
    kw = dict(out_dir=tmp_path, device="cpu", threads=1, records_root=recs, log=lambda m: None)
    grid.run_grid("smoke", runs_root=tmp_path / "runs", **kw)
    first = next(j for j in grid.GRIDS["smoke"].jobs if isinstance(j, grid.RunJob))
    rec = RunDir(recs / "smoke" / first.name)
    report = rec.attack_record("decoder")
    del report["settings"]["infer_time"]  # as if the ladder had stopped after one setting
    rec.attack_record_path("decoder").write_text(json.dumps(report))
    plan = grid.run_grid("smoke", runs_root=tmp_path / "fresh", dry_run=True, **kw)
    assert plan[0].endswith(": restore from its record, decoder infer_time"), plan
    lines = []
    left = grid.run_grid("smoke", runs_root=tmp_path / "fresh", **{**kw, "log": lines.append})
    assert left[0].startswith("1/") and "decoder infer_time" in left[0] and len(left) == 2, left
    assert any(line.startswith("[grid] restored") for line in lines)
    live = RunDir(tmp_path / "fresh" / first.name)
    assert live.is_restored and not live.final_path.exists()  # attacked, never retrained
    assert RunDir(recs / "smoke" / first.name).attacked("decoder", "infer_time")


def _fake_noise_record(root, sigma, lam, acc, seed=125):
    run = RunDir(root / f"cifar10_vgg11_bn_noise_lam{lam:g}_sigma{sigma:g}" / f"seed{seed}")
    run.path.mkdir(parents=True)
    cfg = {"defence": "noise", "sigma": sigma, "cem_lambda": lam, "cem_variant": "paper", "seed": seed}
    run.write_config(cfg)
    run.write_metrics([{"epoch": 1, "test_acc": acc}])
    (run.path / "record.json").write_text("{}")
    return run


def test_matched_sigma_interpolates_the_noise_sweep_and_joins_the_regime_grid(tmp_path):
    from reproduce.matched_sigma import describe, matched_sigma

    recs = tmp_path / "cpu"
    _fake_noise_record(recs, 0.025, 0, 0.66)
    assert "CEM lambda 16 at sigma 0.025 has no finished run" in describe(recs)
    _fake_noise_record(recs, 0.025, 16, 0.62)  # CEM costs 4 points
    assert matched_sigma(recs) is None and len(grid._regime_jobs(recs)) == 8  # no sweep point beyond it yet
    assert describe(recs).startswith("not yet: the noise sweep {0.025: 0.66}, CEM lambda 16 at sigma 0.025 at 0.62")
    _fake_noise_record(recs, 0.05, 0, 0.64)  # 2 points
    _fake_noise_record(recs, 0.1, 0, 0.60)  # 6 points
    found = matched_sigma(recs)
    # 4 points lies halfway between sigma 0.05 (2) and 0.1 (6): the geometric mean, 0.0707
    assert found["sigma"] == pytest.approx(0.0707) and found["target_drop"] == pytest.approx(0.04)
    assert describe(recs).startswith("sigma 0.0707: noise alone loses 4.00 points there")
    jobs = grid._regime_jobs(recs)
    assert len(jobs) == 9 and jobs[-1].name == "cifar10_vgg11_bn_noise_lam0_sigma0.0707/seed125"
    _fake_noise_record(recs, 0.025, 16, 0.67, seed=126)  # another seed does not count
    assert matched_sigma(recs)["sigma"] == found["sigma"]
    assert matched_sigma(recs, seed=126) is None


def test_only_and_train_only_pick_runs_and_leave_their_attacks_for_later(tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    kw = dict(runs_root=root, out_dir=tmp_path, device="cpu", threads=1, log=lambda m: None)
    second = [j for j in grid.GRIDS["smoke"].jobs if isinstance(j, grid.RunJob)][1]
    plan = grid.run_grid("smoke", only=["*lam16*"], dry_run=True, **kw)
    assert plan == [f"2/3 {second.name}: train (not run), decoder train_time, decoder infer_time, bound"], plan
    monkeypatch.setattr(attack, "run_attack", lambda *a, **k: pytest.fail("--train-only attacked"))
    done = grid.run_grid("smoke", only=["*lam16*"], train_only=True, **kw)
    assert done == [f"2/3 {second.name}: train (not run)"]
    rd = RunDir(root / second.name)
    assert rd.finished and rd.missing_settings("decoder", ("train_time", "infer_time")) == ["train_time", "infer_time"]
    assert not (root / grid.GRIDS["smoke"].jobs[0].name).exists() and not (tmp_path / "table1_smoke.md").exists()
    assert grid.run_grid("smoke", only=["*lam16*"], train_only=True, **kw) == []  # trained: nothing left
    # without --train-only the same run has its attacks left, and the other run all of it
    later = grid.run_grid("smoke", dry_run=True, **kw)
    assert later[1] == f"2/3 {second.name}: decoder train_time, decoder infer_time, bound", later
    assert later[0].startswith("1/3 ") and "train (not run)" in later[0]
    with pytest.raises(ValueError, match="only: no run of grid 'smoke' matches"):
        grid.run_grid("smoke", only=["*nope*"], **kw)
    with pytest.raises(TypeError, match="only must be a sequence"):
        grid.run_grid("smoke", only="*lam16*", **kw)
    with pytest.raises(SystemExit):
        grid.main(["smoke", "--only", "*nope*", "--runs-root", str(root)])
    assert "only: no run of grid" in capsys.readouterr().err


_LAZY_IMPORTS_LEFT = r"""
import ast, sys
from reproduce import grid, pipeline
pipeline.preload()
left = set()
for name, mod in list(sys.modules.items()):
    path = getattr(mod, "__file__", None) or ""
    if name.split(".")[0] not in ("reproduce", "cem_fast") or not path.endswith(".py"):
        continue
    for fn in ast.walk(ast.parse(open(path).read())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    wanted = [node.module]
                elif isinstance(node, ast.Import):
                    wanted = [a.name for a in node.names]
                else:
                    continue
                left |= {f"{w} (in {name})" for w in wanted
                         if w.split(".")[0] in ("reproduce", "cem_fast") and w not in sys.modules}
print(sorted(left))
"""


def test_preload_leaves_a_grid_no_project_module_to_import_later():
    # A grid imports everything it will use at its start, so code merged while it runs cannot break it.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _LAZY_IMPORTS_LEFT], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_grid_preloads_its_modules_before_its_first_job(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(grid.pipeline, "preload", lambda: calls.append("preload"))
    monkeypatch.setattr(grid.pipeline, "ensure_trained", lambda *a, **k: calls.append("train") or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        grid.run_grid("smoke", runs_root=tmp_path, log=lambda m: None)
    assert calls[:2] == ["preload", "train"]
    calls.clear()
    grid.run_grid("smoke", runs_root=tmp_path, dry_run=True, log=lambda m: None)
    assert calls == []
