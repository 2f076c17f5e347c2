"""reproduce.table (Tables 1-9), reproduce.paper_numbers and Figure 4 (reproduce.figures_curves)."""

import csv
import json
import os
import re
from pathlib import Path

import pytest

from reproduce import paper_numbers, table, table_efficiency
from reproduce.figures_curves import expand_runs, figure4, figure4_series, run_point

# The paper's text is not part of the repository: point CEM_FAST_PAPER_TEXT at it to check the transcription.
PAPER_TEXT = os.environ.get("CEM_FAST_PAPER_TEXT")
ROW_LABELS_T1 = [f"{r} — w/o CEM" for r in paper_numbers.DEFENCE_OF_ROW] + [
    f"{r} — w/ CEM" for r in paper_numbers.DEFENCE_OF_ROW if r != "No_defense"
]
TINY = [
    "--attacks",
    "decoder",
    "--train-args",
    "--epochs 1",
    "--attack-args",
    "--epochs 1 --max-train-images 16 --max-test-images 20",
    "--device",
    "cpu",
]


# ----------------------------------------------------------------------------- helpers


def _md_rows(text: str) -> dict:
    """First-column label -> cells of every markdown table row."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def _fake_run(root: Path, arm: table.Arm, dataset: str, seed: int, acc: float, mses: dict, sigma=None):
    """A hand-made finished run with known numbers (no model: enough for --no-run and figure 4)."""
    run = root / arm.name(dataset) / f"seed{seed}"
    run.mkdir(parents=True)
    cfg = {
        "preset": "smoke",
        "defence": arm.defence,
        "cem_lambda": arm.cem_lambda if arm.cem else 0.0,
        "cem_enabled": arm.cem,
        "cem_variant": "paper",
        "sigma": arm.sigma if sigma is None else sigma,
        "cut": 4,
        "in_channels": 3,
        "image_size": 32,
    }
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "test_acc": 0.1}) + "\n" + json.dumps({"epoch": 2, "test_acc": acc}) + "\n"
    )
    (run / "final.pt").write_bytes(b"")
    settings = {
        s: {"metrics": {"mse": m, "ssim": 0.5, "psnr": 20.0, "psnr_per_batch_authors": 19.0}} for s, m in mses.items()
    }
    (run / "attack_decoder.json").write_text(json.dumps({"attack": "decoder", "settings": settings}))
    return run


def _arm(row, cem):
    return next(a for a in table.table_arms(1) if a.row == row and a.cem == cem)


# ----------------------------------------------------------------------------- paper numbers


def test_paper_tables_are_complete_and_their_averages_agree():
    for n in range(1, 9):
        spec = paper_numbers.table(n)
        rows = spec["rows"]
        assert all(len(v) == len(spec["columns"]) for v in rows.values())
        defences = [r for r in rows if r not in paper_numbers.AVERAGE_ROWS]
        assert len(defences) == (15 if n in (1, 2, 3) else 14)
        assert {r.removesuffix("+CEM") for r in defences} <= set(paper_numbers.DEFENCE_OF_ROW)
        # The printed averages are the seven defences' means, truncated to the printed digits.
        for avg, cem in (("Average w/o CEM", False), ("Average w/ CEM", True)):
            for j, col in enumerate(spec["columns"]):
                if paper_numbers.note(n, avg, col):
                    continue
                vals = [
                    v[j] for r, v in rows.items() if r in defences and r != "No_defense" and r.endswith("+CEM") == cem
                ]
                assert len(vals) == 7
                unit = 1e-4 if col.endswith("mse") else 1e-3 if col.endswith("ssim") else 1e-2
                assert abs(sum(vals) / 7 - rows[avg][j]) <= 1.01 * unit, (n, avg, col)
    assert paper_numbers.value(1, "Bottleneck+CEM", "dec_train_mse") == 0.0054
    assert paper_numbers.value(9, "OTHERS", "srv_mmac") == 133.59
    assert paper_numbers.value(5, "No_defense", "acc") is None
    with pytest.raises(ValueError, match="number"):
        paper_numbers.table(10)
    with pytest.raises(ValueError, match="column"):
        paper_numbers.value(1, "Bottleneck", "dec_ssim")


def test_paper_numbers_match_the_paper_text():
    if not PAPER_TEXT:
        pytest.skip("set CEM_FAST_PAPER_TEXT to the paper's text file to check the transcription against it")
    text = Path(PAPER_TEXT).read_text().splitlines()
    current, seen = None, 0
    for line in text:
        m = re.match(r"Table (\d): ", line)
        if m:
            current = int(m.group(1))
            continue
        m = re.match(r"^([A-Za-z_]+(?: w/o CEM| w/ CEM)?)(?:\s*\[\d+\]\s*)?(\+CEM)?\s+([\d. ]+)$", line)
        if current in range(1, 9) and m:
            label = m.group(1) + (m.group(2) or "")
            assert paper_numbers.TABLES[current]["rows"][label] == tuple(float(v) for v in m.group(3).split())
            seen += 1
    assert seen == 3 * 17 + 5 * 16


# ----------------------------------------------------------------------------- tables 1-8


@pytest.fixture(scope="module")
def smoke_table1(tmp_path_factory):
    """Table 1 at the smoke preset, run for two defences (No_defense; Bottleneck w/o and w/ CEM)."""
    root = tmp_path_factory.mktemp("runs")
    out = root.parent / "t1_first.md"
    code = table.main(
        [
            "--table",
            "1",
            "--preset",
            "smoke",
            "--runs-root",
            str(root),
            "--out",
            str(out),
            "--defences",
            "no_defense",
            "bottleneck",
            "--run-missing",
            *TINY,
        ]
    )
    assert code == 0
    dataset = table.resolve_dataset("cifar10", None).name
    return root, dataset


def _real(smoke, row, cem):
    root, dataset = smoke
    return root / _arm(row, cem).name(dataset) / "seed0"


def _mse(run, setting="train_time"):
    return json.loads((run / "attack_decoder.json").read_text())["settings"][setting]["metrics"]["mse"]


def test_table1_smoke_has_the_full_layout(smoke_table1, tmp_path):
    root, _ = smoke_table1
    runs = {
        (r, c): _real(smoke_table1, r, c)
        for r, c in (("No_defense", False), ("Bottleneck", False), ("Bottleneck", True))
    }
    for run in runs.values():
        assert (run / "final.pt").is_file() and (run / "attack_decoder.json").is_file()
    out = tmp_path / "t1.md"
    # --no-run: collect only; the other five defences stay a skeleton.
    assert (
        table.main(["--table", "1", "--preset", "smoke", "--runs-root", str(root), "--out", str(out), "--no-run"]) == 0
    )
    rows = _md_rows(out.read_text())
    header = rows["Method"]
    assert header == [h for k in table.table_columns(1) for h in (table.HEADERS[k], "paper")]
    for label in ROW_LABELS_T1 + ["Average w/o CEM", "Average w/ CEM"]:
        assert len(rows[label]) == len(header), label
    # Our numbers from the real runs; the paper's beside them.
    nd = rows["No_defense — w/o CEM"]
    nd_run = runs[("No_defense", False)]
    assert nd[0] == f"{table.final_accuracy(nd_run):.2f}" and nd[1] == "91.86"
    # the ladder's worst case comes first; these runs have only the decoder, so it is missing (no paper value)
    assert nd[2:4] == [table.MISSING, table.MISSING]
    assert nd[4] == f"{_mse(nd_run):.4f}" and nd[5] == "0.0013"
    assert nd[6] == f"{_mse(nd_run, 'infer_time'):.4f}" and nd[7] == "0.0014"
    assert nd[8] == table.MISSING and nd[9] == "0.0014"  # no GAN attack was run; the paper's value is there
    assert nd[13] == table.MISSING  # the paper has no SSIM for No_defense
    assert rows["Bottleneck — w/ CEM"][1] == "90.69" and rows["Bottleneck — w/o CEM"][13] == "0.863"
    assert rows["PATROL — w/ CEM"][0] == table.MISSING and rows["PATROL — w/ CEM"][1] == "89.67"
    assert rows["Average w/ CEM"][5] == "0.0183"
    ratio = _mse(runs[("Bottleneck", True)]) / _mse(runs[("Bottleneck", False)])
    assert rows["Bottleneck"][:2] == [table.MISSING, table.MISSING]
    assert rows["Bottleneck"][2:4] == [f"{ratio:.2f}× ({100 * (ratio - 1):+.1f}%)", "1.50× (+50.0%)"]
    assert rows["DistCorr"][2] == table.MISSING and rows["DistCorr"][3] == "1.22× (+21.6%)"
    assert rows["Average w/o CEM"][4] == f"{_mse(runs[('Bottleneck', False)]):.4f} (1 of 7)"
    with open(out.with_suffix(".csv")) as f:
        records = list(csv.DictReader(f))
    assert [r["method"] for r in records] == ROW_LABELS_T1[:1] + [
        lab for r in list(paper_numbers.DEFENCE_OF_ROW)[1:] for lab in (f"{r} — w/o CEM", f"{r} — w/ CEM")
    ] + ["Average w/o CEM", "Average w/ CEM"]
    assert float(records[0]["dec_train_mse"]) == pytest.approx(_mse(nd_run))
    assert float(records[0]["dec_train_mse_paper"]) == 0.0013
    assert records[3]["dec_train_mse"] == "" and float(records[3]["dec_train_mse_paper"]) == 0.0074


def test_cem_gain_arithmetic_with_seeds(tmp_path):
    root = tmp_path / "runs"
    ds = "cifar10-sample"
    for seed in (0, 1):
        _fake_run(root, _arm("Bottleneck", False), ds, seed, 0.80, {"train_time": 0.010, "infer_time": 0.020})
        _fake_run(root, _arm("Bottleneck", True), ds, seed, 0.70, {"train_time": 0.015, "infer_time": 0.030})
    _fake_run(root, _arm("DistCorr", False), ds, 0, 0.6, {"train_time": 0.018, "infer_time": 0.040})
    _fake_run(root, _arm("DistCorr", False), ds, 1, 0.6, {"train_time": 0.022, "infer_time": 0.040})
    _fake_run(root, _arm("DistCorr", True), ds, 0, 0.6, {"train_time": 0.025, "infer_time": 0.050})
    _fake_run(root, _arm("DistCorr", True), ds, 1, 0.6, {"train_time": 0.025, "infer_time": 0.050})
    out = tmp_path / "t.md"
    argv = ["--table", "1", "--runs-root", str(root), "--out", str(out), "--no-run", "--seeds", "0", "1"]
    assert table.main(argv) == 0
    rows = _md_rows(out.read_text())
    assert rows["DistCorr — w/o CEM"][4] == "0.0200 ± 0.0028"  # stdev(0.018, 0.022) = 0.00283
    # per defence: 0.015/0.010 = 1.5 and 0.025/0.020 = 1.25 (columns 0-1: the ladder's worst case, absent here)
    assert rows["Bottleneck"][2] == "1.50× (+50.0%)" and rows["DistCorr"][2] == "1.25× (+25.0%)"
    assert rows["DistCorr"][4] == "1.25× (+25.0%)"
    assert rows["Mean of the ratios"][2] == "1.38× (+37.5%)"
    assert rows["Ratio of the averages"][2] == "1.33× (+33.3%)"  # (0.015 + 0.025) / (0.010 + 0.020)
    assert rows["Average w/o CEM"][4] == "0.0150 (2 of 7)" and rows["Average w/ CEM"][4] == "0.0200 (2 of 7)"
    gains = table.cem_gains(
        {
            ("A", False): {"dec_train_mse": 2.0},
            ("A", True): {"dec_train_mse": 3.0},
            ("B", False): {"dec_train_mse": 1.0},
        },
        ["A", "B"],
        ["dec_train_mse"],
    )
    assert gains["per_row"]["B"]["dec_train_mse"] is None and gains["count"]["dec_train_mse"] == 1
    assert gains["ratio_of_means"]["dec_train_mse"] == pytest.approx(1.5)
    # one of two seeds missing is marked
    cell = table.summarize([0.5, None])
    assert table.format_cell(cell, "dec_ssim") == "0.500 ± 0.000 (1/2 seeds)"


def test_worst_case_is_the_lowest_mse_of_the_ladder_and_needs_its_three_attacks(tmp_path):
    run = _fake_run(tmp_path / "runs", _arm("Bottleneck", False), "cifar10-sample", 0, 0.8, {"train_time": 0.02})
    assert table.worst_case_mse(run) is None  # the decoder alone is no worst case
    for attack, mse in (("whitebox", 0.03), ("adaptive", 0.015)):
        entry = {"metrics": {"mse": mse}}
        (run / f"attack_{attack}.json").write_text(json.dumps({"attack": attack, "settings": {"train_time": entry}}))
    assert table.worst_case_mse(run) == 0.015
    assert table.collect_run(run)[table.WORST_KEY] == 0.015
    assert table.worst_case_mse(run, "infer_time") is None
    assert table.table_columns(1)[:3] == ("acc", table.WORST_KEY, "dec_train_mse")


def test_missing_dataset_gives_a_clear_table(tmp_path):
    out = tmp_path / "t8.md"
    empty = tmp_path / "no_data"
    empty.mkdir()
    assert (
        table.main(["--table", "8", "--runs-root", str(tmp_path / "r"), "--out", str(out), "--data-root", str(empty)])
        == 0
    )
    rows = _md_rows(out.read_text())
    assert rows["Bottleneck — w/o CEM"][0] == table.DATASET_MISSING
    assert rows["Bottleneck — w/o CEM"][1] == "68.43"
    assert rows["Average w/ CEM"][2] == table.DATASET_MISSING
    with open(out.with_suffix(".csv")) as f:
        assert all(r["status"] == table.DATASET_MISSING for r in csv.DictReader(f))


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        table.main(["--table", "10", "--out", str(tmp_path / "x.md")])
    with pytest.raises(SystemExit):
        table.main(["--table", "1", "--defences", "nonsense", "--out", str(tmp_path / "x.md")])
    with pytest.raises(SystemExit):
        table.main(["--table", "1", "--seeds", "1", "1", "--out", str(tmp_path / "x.md")])


def test_a_defence_outside_the_table_is_refused(tmp_path, capsys):
    # plain "noise" is a registered defence but no row of Table 1: it would run nothing, silently
    with pytest.raises(SystemExit):
        table.main(["--table", "1", "--no-run", "--defences", "noise", "--out", str(tmp_path / "x.md")])
    assert "noise is not a defence of table 1" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


# ----------------------------------------------------------------------------- table 9


def test_efficiency_of_a_real_run_and_table9_layout(smoke_table1, tmp_path):
    root, _ = smoke_table1
    eff = table_efficiency.measure_efficiency(_real(smoke_table1, "No_defense", False), "cpu", reps=1, batch=4)
    # VGG11 encoder without bottleneck on 32x32: conv 3->64 at 32x32 and conv 64->128 at 16x16 (MAC per image)
    convs = (3 * 64 * 9 * 32 * 32 + 64 * 128 * 9 * 16 * 16) / 1e6
    assert convs <= eff["enc_mmac"] <= convs * 1.05
    assert eff["srv_params_m"] > 9 and eff["enc_time_ms"] > 0
    out = tmp_path / "t9.md"
    assert (
        table.main(["--table", "9", "--preset", "smoke", "--runs-root", str(root), "--out", str(out), "--no-run"]) == 0
    )
    text = out.read_text()
    rows = _md_rows(text)
    assert rows["PATROL — w/ CEM"][1] == "0.083" and rows["Others (Bottleneck) — w/o CEM"][3] == "21.90"
    assert rows["PATROL — w/o CEM"][0] == table.MISSING
    with_cem, without = rows["Others (Bottleneck) — w/ CEM"], rows["Others (Bottleneck) — w/o CEM"]
    assert float(with_cem[0]) > 0 and with_cem[0] == without[0] and with_cem[2] == without[2]
    assert "- OTHERS: Enc. params (M) +0, Enc. MMAC +0, Server params (M) +0, Server MMAC +0" in text


# ----------------------------------------------------------------------------- figure 4 (figure 3: test_figure3.py)


def test_figure4_from_hand_made_runs(tmp_path):
    import matplotlib.image

    root = tmp_path / "sweep"
    for sigma, (acc_a, mse_a, acc_b, mse_b) in {0.01: (0.9, 0.01, 0.89, 0.013), 0.1: (0.8, 0.03, 0.8, 0.04)}.items():
        arm = table.Arm("Noise_ARL", "noise_arl", False, "cifar10", "vgg11_bn", sigma=sigma)
        _fake_run(root, arm, "x", 0, acc_a, {"train_time": mse_a})
        arm_cem = table.Arm("Noise_ARL", "noise_arl", True, "cifar10", "vgg11_bn", sigma=sigma)
        _fake_run(root, arm_cem, "x", 0, acc_b, {"train_time": mse_b})
    arm = table.Arm("Noise_ARL", "noise_arl", False, "cifar10", "vgg11_bn", sigma=0.01)
    _fake_run(root, arm, "x", 1, 0.7, {"train_time": 0.02})  # a second seed of one arm
    assert len(expand_runs([root])) == 5
    points = [run_point(r) for r in expand_runs([root])]
    series = figure4_series(points)
    assert sorted(len(v) for v in series.values()) == [2, 2]
    seeds = next(v for k, v in series.items() if not k[1])[0]  # w/o CEM at sigma 0.01: seeds 0 and 1
    assert seeds["n"] == 2 and seeds["mse"] == pytest.approx(0.015)
    assert seeds["mse_sd"] == pytest.approx(0.005 * 2**0.5)
    assert seeds["acc"] == pytest.approx(80.0) and seeds["acc_sd"] == pytest.approx(10 * 2**0.5)
    out = figure4([root], tmp_path / "f4.png")
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 200
    with pytest.raises(ValueError, match="none of the runs"):
        figure4([root], tmp_path / "x.png", setting="infer_time")
    from reproduce.figure import build_parser

    assert "{3,4,5}" in build_parser().format_help()  # one parser, every figure


def test_runs_are_resumed_skipped_or_restarted(tmp_path, monkeypatch):
    """What table asks train/attack to do for each state of a run directory (training and attacks stubbed)."""
    from reproduce import attack, train

    calls = []

    def fake_run(cfg, out, *, resume=False, **kw):
        calls.append(("train", cfg, resume))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"preset": "smoke"}))
        (out / "metrics.jsonl").write_text(json.dumps({"test_acc": 0.5}) + "\n")
        (out / "final.pt").write_bytes(b"")
        return []

    def fake_attack(run_dir, name, *, setting, **kw):
        calls.append(("attack", setting))
        return {}

    monkeypatch.setattr(train, "run", fake_run)
    monkeypatch.setattr(attack, "run_attack", fake_attack)
    root, ds = tmp_path / "runs", "cifar10-sample"
    opts = table.Options(
        preset="smoke",
        runs_root=root,
        seeds=[0],
        data=table.ResolvedData(ds, None, ""),
        device="cpu",
        attacks=("decoder",),
        train_overrides={"epochs": 1},
        threads=None,
        log=lambda m: None,
    )
    fresh, killed, partial, done = (_arm(r, False) for r in ("DistCorr", "Dropout", "PATROL", "ResSFL"))
    for arm, files in (
        (killed, ["config.json"]),
        (partial, ["config.json", "checkpoint.pt"]),
        (done, ["config.json", "final.pt"]),
    ):
        run = root / arm.name(ds) / "seed0"
        run.mkdir(parents=True)
        for name in files:
            (run / name).write_text(json.dumps({"preset": "smoke"}))
    (root / done.name(ds) / "seed0" / "attack_decoder.json").write_text(
        json.dumps({"settings": {"train_time": {"metrics": {"mse": 0.1}}}})
    )

    for arm in (fresh, killed, partial, done):
        calls.clear()
        run = table.ensure_trained(arm, 0, opts)
        table.ensure_attacked(run, "decoder", 0, opts)
        trained = [(c[1], c[2]) for c in calls if c[0] == "train"]
        attacked = [c[1] for c in calls if c[0] == "attack"]
        if arm is done:
            assert not trained
            assert attacked == ["infer_time"]  # only the missing setting
        else:
            assert len(trained) == 1 and trained[0][1] == (arm is not fresh)
            cfg = trained[0][0]
            if arm is fresh:  # a resumed run keeps its stored settings; a fresh one gets the arm's
                assert cfg["epochs"] == 1 and cfg["defence"] == arm.defence
            assert attacked == ["train_time", "infer_time"]
    (root / done.name(ds) / "seed0" / "config.json").write_text(json.dumps({"preset": "cpu"}))
    (root / done.name(ds) / "seed0" / "final.pt").unlink()
    with pytest.raises(ValueError, match="preset 'cpu'"):
        table.ensure_trained(done, 0, opts)


def test_table_finds_runs_made_by_train_out_and_trains_nothing_by_default(tmp_path, capsys, monkeypatch):
    """``--runs-root runs/`` finds ``runs/<any name>`` by its config; without --run-missing nothing is trained."""
    from reproduce import train

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("table trained without --run-missing"))
    root = tmp_path / "runs"
    arm = _arm("Bottleneck", True)
    run = root / "my_bottleneck_cem"
    run.mkdir(parents=True)
    cfg = {
        "preset": "cpu",
        "dataset": "cifar10-sample",
        "arch": arm.arch,
        "defence": arm.defence,
        "seed": 125,
        "cem_lambda": arm.cem_lambda,
        "sigma": arm.sigma,
        "cem_variant": "paper",
    }
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 0.4321}) + "\n")
    (run / "final.pt").write_bytes(b"")
    out = tmp_path / "t1.md"
    assert table.main(["--table", "1", "--runs-root", str(root), "--out", str(out)]) == 0
    rows = _md_rows(out.read_text())
    assert rows["Bottleneck — w/ CEM"][0] == "43.21"
    err = capsys.readouterr().err
    assert "--run-missing" in err and "python -m reproduce.train --preset cpu" in err
    assert f"python -m reproduce.attack --run {run}" in err  # found but not attacked yet
