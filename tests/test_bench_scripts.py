"""Smoke tests of bench/inference_overhead.py and bench/train_step.py in their --quick modes.

They check that each script runs end to end and prints the table rows it promises; they assert no timings.
One torch thread keeps them fast on a shared 2-core machine (two threads competing with other processes
are several times slower).
"""
import math
import re
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
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| encoder") and not line.startswith("| device")]


def test_inference_overhead_quick(tmp_path):
    out = tmp_path / "inference.md"
    text = inference_overhead.main(["--quick", "--threads", "1", "--models", "vgg11-c4-32", "resnet20-c5-64",
                                    "--out", str(out)])
    assert out.read_text() == text + "\n"
    rows = table_rows(text)
    for label in ("VGG11-BN cut 4, 32 px", "ResNet-20 cut 5, 64 px"):
        got = {r[1]: r[2:] for r in rows if r[0] == label}
        assert set(got) == {"parameters", "buffer elements (BN statistics)", "FLOPs per image (conv + matmul)",
                            "CPU latency, batch 1 (median)", "CPU latency, batch 128 (median)",
                            "torch.export graph", "exported parameter shapes",
                            "parameter difference (max abs; relative L2)"}
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
    text = train_step.main(["--quick", "--threads", "1", "--batch", "8", "--official-repo", str(repo),
                            "--out", str(out)])
    assert out.read_text() == text + "\n"
    rows = table_rows(text)
    labels = [tuple(r[1:4]) for r in rows]
    cpu_backends = [b for b in ("torch", "cpp") if backends.resolve(b, torch.device("cpu")) == b]
    auto = backends.resolve("auto", torch.device("cpu"))
    expected = [("-", "-", "no CEM")]
    for variant in ("paper", "official-trained"):
        expected += [(variant, b, "one backward") for b in cpu_backends] + [(variant, auto, "authors' application")]
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
    text = bench_kernels.main(["--quick", "--threads", "1", "--official-repo", str(repo), "--csv", str(out),
                               "--refit-runs", "1"])
    cpu_backends = [b for b in ("torch", "cpp") if backends.resolve(b, torch.device("cpu")) == b]
    rows = [r for r in table_rows(text) if r[0] in ("loss", "kernel")]
    expected = []
    for D in ("512", "2048"):
        expected += [("loss", D, "ours official-trained", b) for b in cpu_backends]
        expected += [("loss", D, "authors GMM", "-"), ("loss", D, "authors PP", "-")]
        expected += [("kernel", D, "kernels", b) for b in cpu_backends]
    assert [(r[0], r[2], r[5], r[6]) for r in rows] == expected
    for r in rows:
        assert all(math.isfinite(float(v)) and float(v) > 0 for v in r[7:12])   # fwd, bwd, fwd+bwd ms, GB/s, min
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


def test_gpu_loss_check_runs_on_the_cpu(capsys):
    """bench/gpu_loss_check.py --device cpu --quick: every parity line passes and the script reports 0 failures."""
    from bench import gpu_loss_check
    torch.set_num_threads(1)
    assert gpu_loss_check.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    parity = [line for line in out.splitlines() if line.startswith("parity ")]
    cpu_backends = [b for b in ("torch", "cpp") if backends.resolve(b, torch.device("cpu")) == b]
    assert len(parity) == len(cpu_backends) * (3 * 2 + 1)       # 3 variants x (fp32, bf16), and full covariance
    assert all(line.endswith(" ok") for line in parity), out
    assert "full covariance, D=128" in out and "refit of 5000 x 256" in out and "\n0 failure(s)" in out
