"""reproduce.bound: one estimator of Eq. 3's bound for every run, stored as bound.json; Figure 3 from the records."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from reproduce import bound, pipeline
from reproduce.rundir import RunDir

# One cluster per class, so that each cluster holds several of the 64 images (a cluster of one has variance 0).
_TINY = {
    "epochs": 1,
    "train_subset": 64,
    "test_subset": 4,
    "batch_size": 16,
    "cem_backend": "torch",
    "cem_clusters": 1,
    "seed": 0,
}
_ATTACK = {"epochs": 1, "max_train_images": 16, "max_test_images": 20}
# Three noisy arms (Eq. 3 needs the noise): two noise levels without CEM, one with.
ARMS = {"s025_l0": (0.025, 0.0), "s1_l0": (0.1, 0.0), "s025_l16": (0.025, 16.0)}


def test_gaussian_entropy_of_gaussian_samples():
    gen = torch.Generator().manual_seed(0)
    cov = torch.tensor([[0.04, 0.01, 0.0], [0.01, 0.02, 0.0], [0.0, 0.0, 0.001]], dtype=torch.float64)
    x = torch.randn(40_000, 3, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    truth = 0.5 * (3 * math.log(2 * math.pi * math.e) + float(torch.logdet(cov)))
    g = bound.gaussian_entropy(x)
    assert g["h"] == pytest.approx(truth, abs=0.03) and g["h_per_dim"] == pytest.approx(g["h"] / 3)
    assert g["mean_variance"] == pytest.approx(float(cov.diagonal().mean()), rel=0.02) and g["n"] == 40_000
    # The small-sample bias of the log-det, for Gaussian data: about -d (d + 1) / (4 n) nats, and seen in samples.
    assert g["gaussian_bias"] == pytest.approx(-3 * 4 / (4 * 40_000), rel=0.05)
    small = [bound.gaussian_entropy(x[i : i + 12]) for i in range(0, 12 * 400, 12)]
    mean_small = float(np.mean([s["h"] for s in small]))
    assert mean_small - truth == pytest.approx(small[0]["gaussian_bias"], abs=0.1)
    assert small[0]["gaussian_bias"] < -0.3  # 12 samples in 3 dimensions: clearly biased low
    # Extra variance on the diagonal: the entropy of x + independent noise of that variance.
    q = 0.001
    with_q = bound.gaussian_entropy(x, extra_variance=q)["h"]
    assert with_q == pytest.approx(
        0.5 * (3 * math.log(2 * math.pi * math.e) + float(torch.logdet(cov + q * torch.eye(3)))), abs=0.03
    )
    # Fewer samples than dimensions: singular without the extra variance, finite with it.
    few = torch.rand(4, 10, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        bound.gaussian_entropy(few)
    assert math.isfinite(bound.gaussian_entropy(few, extra_variance=bound.DEQUANTISATION_VARIANCE)["h"])
    with pytest.raises(ValueError, match="extra_variance"):
        bound.gaussian_entropy(x, extra_variance=-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        bound.gaussian_entropy(x[:1])


def test_dequantisation_variance_is_one_grey_level():
    u = (torch.rand(1_000_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.5) / 255
    assert float(u.var()) == pytest.approx(bound.DEQUANTISATION_VARIANCE, rel=0.01)


def test_estimate_refuses_runs_without_noise_or_unfinished(tmp_path):
    rd = RunDir(tmp_path / "clean")
    rd.write_config({"defence": "bottleneck", "defence_options": {}, "noise_on": False, "sigma": 0.025})
    with pytest.raises(ValueError, match="has not finished"):
        bound.estimate(rd)
    rd.final_path.write_bytes(b"")
    with pytest.raises(bound.NoNoiseError, match="adds no Gaussian noise"):
        bound.estimate(rd)
    assert isinstance(bound.NoNoiseError("x"), ValueError)
    assert bound.ensure(rd, log=lambda m: None) is None and not rd.bound_path.exists()
    with pytest.raises(ValueError, match="max_images"):
        bound.estimate(rd, max_images=0)
    assert bound.attacker_sigma({"defence": "noise", "defence_options": {"sigma": 0.1}, "noise_on": False}) == 0.1


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Three tiny noisy runs on the shipped sample, decoder-attacked, and their bound.json (via the CLI)."""
    root = tmp_path_factory.mktemp("bound_runs")
    for name, (sigma, lam) in ARMS.items():
        rd = pipeline.ensure_trained(
            root / name,
            preset="smoke",
            overrides={"defence": "noise", "sigma": sigma, "cem_lambda": lam, **_TINY},
            device="cpu",
            threads=1,
            log=lambda m: None,
        )
        pipeline.ensure_attacked(rd, "decoder", ("train_time",), preset="smoke", overrides=_ATTACK, log=lambda m: None)
    assert bound.main([str(root), "--threads", "1"]) == 0
    return root


def test_bound_json_of_smoke_runs(smoke_runs, monkeypatch, capsys):
    records = {name: RunDir(smoke_runs / name).read_bound() for name in ARMS}
    for name, rec in records.items():
        sigma, lam = ARMS[name]
        assert rec["sigma"] == sigma and rec["n_images"] == rec["train_size"] == 64
        assert rec["feature_dim"] == 8 * 8 * 8 and rec["input_dim"] == 3 * 32 * 32
        assert rec["num_classes"] == rec["clusters_used"] == 10 and rec["clusters_per_class"] == 1
        assert rec["cluster_size"]["min"] >= 6 and rec["cluster_size"]["max"] <= 7  # class-balanced: 6 or 7
        assert rec["estimator"]["version"] == bound.VERSION and rec["estimator"]["variant"] == "paper"
        # Eq. 3: bound = -(mixture entropy + log-det term), both >= 0.
        assert rec["bound"] == pytest.approx(-(rec["mixture_entropy"] + rec["log_det_term"]))
        assert rec["mixture_entropy"] > 0 and rec["log_det_term"] >= 0
        assert rec["snr"] == pytest.approx(rec["feature_variance"]["mean"] / sigma**2)
        assert rec["h_x_images"] == 5000 and rec["pixel_variance_mean"] > 0
        text = json.dumps(rec)
        assert str(smoke_runs) not in text and "/tmp" not in text  # a record to commit: no machine paths
    # The data-derived H(x) is one value per dataset, the same in every run's record.
    assert len({rec["h_x_gaussian"] for rec in records.values()}) == 1
    hx = next(iter(records.values()))
    # Its floor at bound 0 (z tells nothing) is the geometric mean of the pixel covariance's eigenvalues:
    # below the arithmetic mean, the MSE of the mean image.
    assert math.exp(2 * hx["h_x_gaussian"] / hx["input_dim"]) / (2 * math.pi * math.e) < hx["pixel_variance_mean"]
    # More noise, less information: the sigma 0.1 run's bound is higher than the sigma 0.025 run's.
    assert records["s1_l0"]["bound"] > records["s025_l0"]["bound"]
    # The estimator is deterministic: a second estimate gives the stored bound.
    assert bound.estimate(smoke_runs / "s025_l16")["bound"] == records["s025_l16"]["bound"]
    # The CLI skips runs that have one, and --force recomputes.
    monkeypatch.setattr(bound, "write", lambda *a, **k: pytest.fail("recomputed a stored bound"))
    assert bound.main([str(smoke_runs / "s025_l0")]) == 0
    assert "has bound.json" in capsys.readouterr().err
    monkeypatch.undo()
    assert bound.main([str(smoke_runs / "s025_l0"), "--force", "--max-images", "20"]) == 0
    assert RunDir(smoke_runs / "s025_l0").read_bound()["n_images"] == 20
    bound.main([str(smoke_runs / "s025_l0"), "--force"])  # back to the fixture's record


def test_figure3_from_records_alone(smoke_runs, tmp_path):
    import matplotlib.image

    from reproduce.figure import main
    from reproduce.figure3 import figure3_data, figure3_plot

    # A record holds config.json, the attack records and bound.json: no weights, no data.
    records = tmp_path / "records"
    for name in ARMS:
        src, dst = RunDir(smoke_runs / name), RunDir(records / name)
        dst.path.mkdir(parents=True)
        for path in (src.config_path, src.attack_record_path("decoder"), src.bound_path):
            shutil.copy(path, dst.path / path.name)
    from_records = figure3_data(records, h_x=[-9000.0])
    assert from_records == figure3_data(smoke_runs, h_x=[-9000.0])
    points = {p["run"]: p for p in from_records["points"]}
    assert set(points) == set(ARMS) and points["s025_l16"]["lambda"] == 16.0
    assert points["s025_l16"]["lambda_paper_units"] == pytest.approx(16 * 50_000 / 64)
    c = from_records["correlation"]
    assert c["n"] == 3 and -1 <= c["pearson_ci"][0] <= c["pearson_ci"][1] <= 1
    b = [p["bound"] for p in from_records["points"]]
    m = [p["mse"] for p in from_records["points"]]
    assert c["pearson"] == pytest.approx(np.corrcoef(b, np.log(m))[0, 1])
    assert matplotlib.image.imread(figure3_plot(from_records, tmp_path / "f3.png")).shape[0] > 300
    out = tmp_path / "cli" / "f3.png"
    assert main(["--figure", "3", "--runs", str(records), "--out", str(out), "--h-x", "-9000"]) == 0
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(from_records))
