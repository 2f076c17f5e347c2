"""reproduce.figure3: Theorem 1's floor, the bootstrap correlation, and Figure 3's data from hand-made records."""

import json
import math

import numpy as np
import pytest
import torch

from cem_fast import entropy_bound
from reproduce.figure3 import LADDER, bootstrap_correlation, caption, figure3_data, figure3_plot, floor_mse

D_IN = 3072
H_GAUSS = -9900.0


# ----------------------------------------------------------------------------- Theorem 1 in the Gaussian case


def _gaussian_case(s2: np.ndarray, t2: float):
    """x ~ N(0, diag(s2)), z = x + N(0, t2 I): H(x), Eq. 3's bound for one Gaussian cluster, H(x|z), MMSE."""
    d = len(s2)
    h_x = 0.5 * np.sum(np.log(2 * math.pi * math.e * s2))
    v = s2 * t2 / (s2 + t2)  # Var(x_i | z_i)
    h_cond = 0.5 * np.sum(np.log(2 * math.pi * math.e * v))
    bound = float(entropy_bound(torch.ones(1, dtype=torch.float64), torch.tensor(s2)[None], math.sqrt(t2)))
    return d, float(h_x), bound, float(h_cond), float(v.mean())


def test_floor_is_the_mmse_for_isotropic_gaussians():
    d, h_x, bound, h_cond, mmse = _gaussian_case(np.full(8, 0.04), 0.01)
    # One Gaussian cluster: Eq. 3's bound is exactly -I(x; z), so H(x) + bound is H(x|z).
    assert h_x + bound == pytest.approx(h_cond, rel=1e-12)
    # Theorem 1 is tight for an isotropic Gaussian posterior: the floor is the MMSE, 0.04 * 0.01 / 0.05.
    assert floor_mse(h_x, bound, d) == pytest.approx(0.008, rel=1e-12) and mmse == pytest.approx(0.008)


def test_floor_is_below_the_mmse_for_anisotropic_gaussians_and_the_sampled_estimators():
    s2 = np.array([0.09, 0.04, 0.01, 0.0025, 0.001])
    t2 = 0.01
    d, h_x, bound, h_cond, mmse = _gaussian_case(s2, t2)
    v = s2 * t2 / (s2 + t2)
    floor = float(floor_mse(h_x, bound, d))
    assert floor == pytest.approx(np.exp(np.log(v).mean()), rel=1e-12)  # the geometric mean of Var(x_i|z)
    assert floor < 0.9 * mmse  # strictly below the arithmetic mean: not tight here
    # Sampled: the posterior mean reaches the MMSE, a worse estimator stays above; both above the floor.
    gen = np.random.default_rng(0)
    x = gen.normal(size=(200_000, d)) * np.sqrt(s2)
    z = x + gen.normal(size=x.shape) * math.sqrt(t2)
    mse_posterior = float(((s2 / (s2 + t2) * z - x) ** 2).mean())
    mse_identity = float(((z - x) ** 2).mean())
    assert mse_posterior == pytest.approx(mmse, rel=0.01)
    assert floor < mse_posterior < mse_identity
    # A stated H(x) above the true one lifts the floor over the MMSE: the figure's check can fail.
    assert floor_mse(h_x + d, bound, d) > mmse


def test_floor_bad_input():
    with pytest.raises(ValueError, match="d must"):
        floor_mse(0.0, 0.0, 0)
    with pytest.raises(ValueError, match="h_x"):
        floor_mse(math.inf, 0.0, 3)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_correlation_against_hand_computed_values():
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
    y = np.array([0.5, 0.1, 0.3, 2.0, 1.0])
    c = bootstrap_correlation(x, y, resamples=500, seed=3)
    assert c["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    rx, ry = np.array([0, 1.5, 1.5, 3, 4]), np.array([2, 0, 1, 4, 3])  # ties share the average rank
    assert c["spearman"] == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    for name in ("pearson", "spearman"):
        lo, hi = c[f"{name}_ci"]
        assert -1 <= lo <= c[name] <= hi <= 1 and hi - lo > 0.1  # five noisy points: a wide interval
    assert c["n"] == 5 and c["resamples"] == 500 and 0 < c["dropped"] < 500  # some resamples repeat one point
    assert bootstrap_correlation(x, y, resamples=500, seed=3) == c  # seeded
    assert bootstrap_correlation(x, y, resamples=500, seed=4) != c
    exact = bootstrap_correlation(x, 2 * x + 1, resamples=200)
    assert exact["pearson"] == pytest.approx(1.0) and exact["pearson_ci"] == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="at least 3"):
        bootstrap_correlation([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_correlation(x, y, resamples=0)
    with pytest.raises(ValueError, match="one length"):
        bootstrap_correlation(x, y[:4])


# ----------------------------------------------------------------------------- figure3_data from records


def _record(root, name, *, bound, mses, defence="noise", sigma=0.025, lam=0.0, h_x=H_GAUSS, d=D_IN, version=1):
    """A record folder: config.json, attack_<A>.json and bound.json only (no weights, no data)."""
    run = root / name
    run.mkdir(parents=True)
    config = {
        "defence": defence,
        "sigma": sigma,
        "cem_lambda": lam,
        "cem_variant": "paper",
        "cem_schedule": "constant",
        "lr": 0.05,
        "batch_size": 128,
        "seed": 125,
        "train_size": 10_000,
    }
    (run / "config.json").write_text(json.dumps(config))
    for attack, mse in mses.items():
        (run / f"attack_{attack}.json").write_text(json.dumps({"settings": {"train_time": {"metrics": {"mse": mse}}}}))
    if bound is not None:
        rec = {
            "bound": bound,
            "sigma": sigma,
            "input_dim": d,
            "h_x_gaussian": h_x,
            "dequantisation_variance": 1 / (12 * 255**2),
            "pixel_variance_mean": 0.06,
            "train_size": 10_000,
            "snr": 10.0,
            "estimator": {"version": version},
        }
        (run / "bound.json").write_text(json.dumps(rec))
    return run


def _records(root, extra=False):
    if extra:  # a third run without CEM, whose MSE falls as its bound rises
        _record(root, "a2", bound=-850.0, mses={"decoder": 0.007})
    _record(root, "a", bound=-1000.0, mses={"decoder": 0.008, "gan": 0.007})
    _record(root, "b", bound=-700.0, mses={"decoder": 0.012})
    _record(root, "c", bound=-300.0, mses={"decoder": 0.020, "gan": 0.022, "whitebox": 0.05}, lam=16.0)
    _record(root, "d", bound=-200.0, mses={"decoder": 0.031}, lam=4.0, defence="noise_arl")
    _record(root, "no_bound", bound=None, mses={"decoder": 0.01})
    return root


def test_figure3_data_reads_records_only(tmp_path, capsys):
    root = _records(tmp_path / "records")
    data = figure3_data(root, h_x=[-9000.0])
    assert [p["run"] for p in data["points"]] == ["a", "b", "c", "d"]
    assert data["skipped"] == [
        {"run": "no_bound", "reason": "no bound.json (run `python -m reproduce.bound no_bound` on the trained run)"}
    ]
    assert "skipping no_bound" in capsys.readouterr().err
    a, c = data["points"][0], data["points"][2]
    assert a["mse"] == 0.008 and a["mse_worst"] == 0.007 and a["worst_attack"] == "gan"
    assert c["mse_by_attack"] == {"decoder": 0.020, "gan": 0.022, "whitebox": 0.05} and c["worst_attack"] == "decoder"
    assert a["lambda_paper_units"] == 0.0 and c["lambda_paper_units"] == pytest.approx(16 * 50_000 / 10_000)
    # The floors are the stated H(x) and the records' h_x_gaussian, at the points and along the curve.
    assert [(f["h_x"], f["source"]) for f in data["floors"]] == [(-9000.0, "stated"), (H_GAUSS, "h_x_gaussian")]
    assert a["floors"]["-9000"] == pytest.approx(math.exp(2 * (-9000 - 1000) / D_IN) / (2 * math.pi * math.e))
    curve = data["floors"][1]["curve"]
    assert np.allclose(curve["mse"], floor_mse(H_GAUSS, np.array(curve["bound"]), D_IN))
    assert data["floors"][0]["below"] == [] and data["theorem_slope"] == 2 / D_IN
    # The correlation of the bound with log MSE, with its interval.
    c = data["correlation"]
    b = [p["bound"] for p in data["points"]]
    assert c["pearson"] == pytest.approx(np.corrcoef(b, np.log([0.008, 0.012, 0.020, 0.031]))[0, 1])
    assert c["spearman"] == pytest.approx(1.0) and c["n"] == 4 and c["x"] == "bound (nats)" and c["y"] == "log MSE"
    assert "Pearson r(bound, log MSE) = " in caption(data) and "[" in caption(data)
    # Within the groups: two runs without CEM (a, b) and two with (c, d) are too few for a correlation.
    assert data["correlation_within"] == {"without CEM": None, "with CEM": None}
    json.dumps(data)  # the data file is plain JSON
    assert str(tmp_path) not in json.dumps(data)  # and names runs, not machine paths


def test_floor_is_stated_not_fitted_and_a_point_under_it_is_reported(tmp_path):
    root = _records(tmp_path / "r")
    before = figure3_data(root, h_x=[-9000.0])
    assert [f["below"] for f in before["floors"]] == [[], []]
    # Lower the MSE of runs a and b 1000x: the floors stay where they were (nothing is fitted to the points) ...
    for name in "ab":
        path = root / name / "attack_decoder.json"
        rec = json.loads(path.read_text())
        rec["settings"]["train_time"]["metrics"]["mse"] /= 1000
        path.write_text(json.dumps(rec))
    after = figure3_data(root, h_x=[-9000.0])
    assert [f["curve"] for f in after["floors"]] == [f["curve"] for f in before["floors"]]
    # ... and the runs now under a floor are named: run a (bound -1000, MSE 8e-6) lies under the h_x_gaussian
    # floor exp(2 (-9900 - 1000) / 3072) / (2 pi e) = 4.9e-5, run b (-700, 1.2e-5) under 5.9e-5.
    assert math.exp(2 * (H_GAUSS - 1000) / D_IN) / (2 * math.pi * math.e) == pytest.approx(4.85e-5, rel=0.01)
    assert after["floors"][1]["below"] == ["a", "b"] and after["floors"][0]["below"] == ["a", "b"]
    assert figure3_data(root, derived_h_x=False)["floors"] == []


def test_correlation_within_groups(tmp_path):
    data = figure3_data(_records(tmp_path / "r", extra=True))
    within = data["correlation_within"]
    assert within["with CEM"] is None and within["without CEM"]["n"] == 3
    b, m = [-1000.0, -850.0, -700.0], [0.008, 0.007, 0.012]  # a, a2, b
    assert within["without CEM"]["pearson"] == pytest.approx(np.corrcoef(b, np.log(m))[0, 1])
    assert within["without CEM"]["spearman"] == pytest.approx(0.5)
    assert data["correlation"]["n"] == 5


def test_worst_attack_and_errors(tmp_path):
    root = _records(tmp_path / "r")
    worst = figure3_data(root, attack="worst")
    assert [p["mse"] for p in worst["points"]] == [0.007, 0.012, 0.020, 0.031]
    gan = figure3_data(root, attack="gan")
    assert [p["run"] for p in gan["points"]] == ["a", "c"] and gan["correlation"] is None
    assert "no correlation" in gan["notes"][0] and "no correlation" in caption(gan)
    with pytest.raises(ValueError, match="attack must be"):
        figure3_data(root, attack="best")
    with pytest.raises(ValueError, match="none of the runs"):
        figure3_data(root, setting="infer_time")
    with pytest.raises(FileNotFoundError):
        figure3_data(tmp_path / "missing")
    _record(tmp_path / "mixed", "x", bound=-1.0, mses={"decoder": 0.01})
    _record(tmp_path / "mixed", "y", bound=-2.0, mses={"decoder": 0.01}, d=48 * 48 * 3)
    with pytest.raises(ValueError, match="input dimensions"):
        figure3_data(tmp_path / "mixed")
    _record(tmp_path / "hx", "x", bound=-1.0, mses={"decoder": 0.01})
    _record(tmp_path / "hx", "y", bound=-2.0, mses={"decoder": 0.01}, h_x=-9000.0)
    with pytest.raises(ValueError, match="h_x_gaussian"):
        figure3_data(tmp_path / "hx")
    _record(tmp_path / "ver", "x", bound=-1.0, mses={"decoder": 0.01})
    _record(tmp_path / "ver", "y", bound=-2.0, mses={"decoder": 0.01}, version=2)
    with pytest.raises(ValueError, match="version"):
        figure3_data(tmp_path / "ver")


def test_plot_and_cli(tmp_path, capsys):
    import matplotlib.image

    from reproduce.attack import ATTACKS
    from reproduce.figure import main

    assert LADDER == ATTACKS
    root = _records(tmp_path / "r")
    out = figure3_plot(figure3_data(root, h_x=[-9000.0, -9500.0]), tmp_path / "f.png")
    assert matplotlib.image.imread(out).shape[0] > 300
    png = tmp_path / "cli" / "fig3.png"
    assert main(["--figure", "3", "--runs", str(root), "--out", str(png), "--h-x", "-9000", "--attack", "worst"]) == 0
    data = json.loads(png.with_suffix(".json").read_text())
    assert data["attack"] == "worst" and len(data["floors"]) == 2 and data["correlation"]["n"] == 4
    assert "Pearson r" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--figure", "4", "--runs", str(root), "--out", str(png), "--attack", "worst"])
    assert "figure 3 only" in capsys.readouterr().err
