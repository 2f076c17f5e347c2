"""Smoke tests of the bench/ scripts in their --quick modes, and of the GPU check's dry run on the CPU.

They check that each script runs end to end and prints the table rows it promises; they assert no timings.
One torch thread keeps them fast on a shared 2-core machine (two threads competing with other processes
are several times slower).
"""

import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from bench import inference_overhead, train_step
from cem_fast import backends


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def table_rows(text: str) -> list:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| encoder") and not line.startswith("| device")
    ]


def test_inference_overhead_quick(tmp_path):
    out = tmp_path / "inference.md"
    text = inference_overhead.main(
        ["--quick", "--threads", "1", "--models", "vgg11-c4-32", "resnet20-c5-64", "--out", str(out)]
    )
    assert out.read_text() == text + "\n"
    rows = table_rows(text)
    for label in ("VGG11-BN cut 4, 32 px", "ResNet-20 cut 5, 64 px"):
        got = {r[1]: r[2:] for r in rows if r[0] == label}
        assert set(got) == {
            "parameters",
            "buffer elements (BN statistics)",
            "FLOPs per image (conv + matmul)",
            "CPU latency, batch 1 (median)",
            "CPU latency, batch 128 (median)",
            "torch.export graph",
            "exported parameter shapes",
            "parameter difference (max abs; relative L2)",
        }
        assert got["parameters"][0] == got["parameters"][1] and int(got["parameters"][0].replace(",", "")) > 0
        assert got["FLOPs per image (conv + matmul)"][2] == "1.000"
        for batch in (1, 128):
            ms = [float(v.split()[0]) for v in got[f"CPU latency, batch {batch} (median)"][:2]]
            assert all(math.isfinite(v) and v > 0 for v in ms)
        assert got["torch.export graph"][2] == "identical"
        assert got["exported parameter shapes"][2] == "identical"
        assert got["parameter difference (max abs; relative L2)"][2] == "trained apart"
    assert "Structural fact" in text and "Every check above agrees" in text


def test_inference_overhead_missing_runs_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        inference_overhead.main(["--quick", "--runs", str(tmp_path / "a"), str(tmp_path / "b")])


FAKE_OFFICIAL = textwrap.dedent("""
    class MIA_train:
        def compute_class_means(self, features, labels, unique_labels, centroids_list, *rest):
            loss = ((features.flatten(1) - centroids_list[0][0]) ** 2).mean()
            return loss, loss
""")


def test_train_step_quick(tmp_path):
    # a stand-in checkout exercises the --official-repo plumbing (the authors' code is not shipped)
    repo = tmp_path / "official"
    repo.mkdir()
    for name in ("model_training_GMM.py", "model_training_paral_pruning.py"):
        (repo / name).write_text(FAKE_OFFICIAL)
    out = tmp_path / "step.md"
    text = train_step.main(
        ["--quick", "--threads", "1", "--batch", "8", "--official-repo", str(repo), "--out", str(out)]
    )
    assert out.read_text() == text + "\n"
    rows = table_rows(text)
    labels = [tuple(r[1:4]) for r in rows]
    cpu_backends = [b for b in ("torch", "cpp") if backends.resolve(b, torch.device("cpu")) == b]
    auto = backends.resolve("auto", torch.device("cpu"))
    expected = [("-", "-", "no CEM")]
    for variant in ("paper", "official-trained"):
        expected += [(variant, b, "one backward") for b in cpu_backends]
        expected += [(variant, auto, "one backward, validate=False"), (variant, auto, "authors' application")]
    expected.append(("official-trained", "authors' loss fn", "authors' application"))
    assert labels == expected
    assert rows[0][6:] == ["(baseline)", "(baseline)"]
    for r in rows:
        assert float(r[4]) > 0
    for r in rows[1:]:
        for cell in r[6:8]:
            assert math.isfinite(float(re.fullmatch(r"([+-]\d+\.\d) %", cell).group(1)))
    assert len(re.findall(r"^- cpu, (paper|official-trained): fastest backend", text, re.M)) == 2


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--steps", "-1"], ["--warmup", "-1"]])
def test_train_step_rejects_bad_counts(argv):
    with pytest.raises(SystemExit):
        train_step.parse_args(argv)


def test_bench_kernels_quick(tmp_path):
    from bench import bench_kernels

    repo = tmp_path / "official"
    repo.mkdir()
    for name in ("model_training_GMM.py", "model_training_paral_pruning.py"):
        (repo / name).write_text(FAKE_OFFICIAL)
    out = tmp_path / "kernels.csv"
    text = bench_kernels.main(
        ["--quick", "--threads", "1", "--official-repo", str(repo), "--csv", str(out), "--refit-runs", "1"]
    )
    cpu_backends = [b for b in ("torch", "cpp") if backends.resolve(b, torch.device("cpu")) == b]
    rows = [r for r in table_rows(text) if r[0] in ("loss", "kernel")]
    expected = []
    for D in ("512", "2048"):
        expected += [("loss", D, "ours official-trained", b) for b in cpu_backends]
        expected += [("loss", D, "authors GMM", "-"), ("loss", D, "authors PP", "-")]
        expected += [("kernel", D, "kernels", b) for b in cpu_backends]
    assert [(r[0], r[2], r[5], r[6]) for r in rows] == expected
    for r in rows:
        assert all(math.isfinite(float(v)) and float(v) > 0 for v in r[7:12])  # fwd, bwd, fwd+bwd ms, GB/s, min
    refit = [r for r in table_rows(text) if r[0].startswith(("ours CEMLoss.refit", "authors' per-class"))]
    assert len(refit) == 2 and all(float(r[5]) > 0 and float(r[6]) > 0 for r in refit)
    if "cpp" in cpu_backends:
        assert "Bar (B=128, D=2048, C=10, m=3" in text
    lines = out.read_text().splitlines()
    assert lines[0].startswith("device,level,B,D,C,m,impl,backend,kind,median_s")
    assert len(lines) == 1 + 3 * len(rows) + 2 * len(refit)


def test_bench_kernels_refit_only(tmp_path):
    from bench import bench_kernels

    text = bench_kernels.main(["--quick", "--refit-only", "--threads", "1", "--refit-runs", "1"])
    assert not [r for r in table_rows(text) if r[0] in ("loss", "kernel")]
    (ours,) = [r for r in table_rows(text) if r[0].startswith("ours CEMLoss.refit")]
    first_iters, warm_iters = (int(v) for v in ours[8].split(" (")[0].split(" / "))
    assert float(ours[5]) > 0 and first_iters >= 1 and warm_iters >= 1
    with pytest.raises(SystemExit):
        bench_kernels.main(["--refit-only", "--no-refit"])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_checks_parity_on_the_cpu_backends(capsys):
    """bench/gpu_checks.py on the CPU backends: every variant in fp32 and bf16 (loss, gradient, state) and the
    paper's full covariance pass against float64, and the script exits 0."""
    from bench import gpu_checks

    torch.set_num_threads(1)
    cpu_backends = [b for b in ("torch", "cpp") if backends.resolve(b, torch.device("cpu")) == b]
    for b in cpu_backends:
        gpu_checks.FAILURES.clear()
        assert gpu_checks.main(["--backend", b, "--device", "cpu", "--tiny", "--checks", "loss,fullcov"]) == 0
        out = capsys.readouterr().out
        cases = [line for line in out.splitlines() if line.startswith(f"  loss {b} ")]
        assert len(cases) == 3 * 2 * 2 and not [c for c in cases if c.endswith("FAIL")], out  # variants x B x dtype
        assert f"CHECK {b} loss PASS" in out and f"CHECK {b} fullcov PASS" in out, out


def test_gpu_check_summary_is_short_and_lists_every_failure(tmp_path):
    from bench import gpu_check_runner

    log = ["# device 2026-01-01, CPU X"] + [f"CHECK triton c{i} PASS ok" for i in range(30)]
    log += [f"CHECK cuda bad{i} FAIL why {i}" for i in range(3)]
    log += ["TIME triton t 3.0 us goal<5us met", "TIME x y 1 us"]
    log += [f"STEP s{i} PASS 1 s" for i in range(5)]
    (tmp_path / "a.log").write_text("\n".join(log) + "\n")
    lines = gpu_check_runner.summary(str(tmp_path), 40)
    assert len(lines) <= 40
    assert [ln for ln in lines if ln.startswith("FAIL cuda bad")] == [f"FAIL cuda bad{i}: why {i}" for i in range(3)]
    assert "  triton t 3.0 us goal<5us met" in lines and not [ln for ln in lines if "x y" in ln]
    assert sum(ln.startswith("PASS triton:") for ln in lines) == 1
    long = gpu_check_runner.summary(str(tmp_path), 8)
    assert len(long) == 8 and long[-1].startswith("... ")


def test_gpu_check_imports_need_no_torch_pruning():
    code = (
        "import sys; sys.modules['torch_pruning'] = None\n"
        "import bench.gpu_checks, bench.harness, bench.bench_kernels, bench.train_step, bench.inference_overhead\n"
        "import bench.gpu_check_runner, tests.gpu.test_gpu_kernels, tests.gpu.test_gpu_loss\n"
        "print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_gpu_check_dry_run(tmp_path):
    """GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh: every step runs or is SKIPPED as CUDA-only, none fails,
    at most 8 files come back, and the summary (<= 40 lines) is printed last. Generous limits: this machine
    is shared (the script alone keeps a 345 s deadline)."""
    out = tmp_path / "out"
    env = dict(
        os.environ,
        GPU_CHECK_DRY_RUN="1",
        OUT=str(out),
        PYTHON=sys.executable,
        GPU_CHECK_BUDGET="1500",
        GPU_CHECK_TIMEOUT_SCALE="5",
    )
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and "summary.txt" in files and "junit.xml" in files, files
    summary = (out / "summary.txt").read_text().splitlines()
    assert 0 < len(summary) <= 40
    assert proc.stdout.rstrip().endswith("\n".join(summary)), proc.stdout[-3000:]
    steps = {ln.split()[0]: ln.split()[1] for ln in summary if re.match(r"^[a-z-]+ (PASS|FAIL|TIMEOUT|SKIPPED) ", ln)}
    assert steps == {
        "cuda-build": "SKIPPED",
        "device": "PASS",
        "triton": "PASS",
        "cuda": "SKIPPED",
        "tests-gpu": "SKIPPED",
        "kernel-grid": "PASS",
        "train-step": "PASS",
        "inference": "PASS",
        "first-compile": "SKIPPED",
    }, summary
    assert not [ln for ln in summary if ln.startswith("FAIL ")], summary
    (tri,) = [ln for ln in summary if ln.startswith("PASS triton:")]
    for check in ("kernels", "loss", "nosync", "graph-step(skipped)", "timings", "fullcov", "refit"):
        assert check in tri.split(": ", 1)[1].split(", "), tri


def test_epoch_speed_steps_the_trainers_defence_with_or_without_its_decoder_in_bf16(monkeypatch):
    from bench import epoch_speed
    from reproduce import speed
    from reproduce.models import build_split_model

    monkeypatch.setattr(speed, "bf16_supported", lambda *_: True)  # autocast runs (slowly) on any CPU
    torch.manual_seed(0)
    model = build_split_model("vgg11_bn", 10, 4, 32, bottleneck="noRELU_C8S1", sigmoid=True)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    rows = {name: epoch_speed.Row(name, 1, model, x, y, "noise_arl") for name in ("fp32", "bf16+fp32-defence", "bf16")}
    assert {n: r.defence.parts[1].bf16_autocast for n, r in rows.items()} == {
        "fp32": False,
        "bf16+fp32-defence": False,
        "bf16": True,
    }
    assert "fp32_defence" not in rows["bf16+fp32-defence"].cfg
    decoder = rows["bf16"].defence.parts[1].decoder
    before = [p.detach().clone() for p in decoder.parameters()]
    wall, cpu = rows["bf16"].step()
    assert wall > 0 and cpu > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, decoder.parameters()))  # the attacker took its step
    with pytest.raises(ValueError, match=re.escape("row 'bf16+fp33'")):
        epoch_speed.row_config("bf16+fp33")
