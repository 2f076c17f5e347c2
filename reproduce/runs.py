"""Rebuilding what a run directory describes: the split model, the defence, and ``load_run`` for the attacks.

The directory's files are named and checked by ``reproduce.rundir.RunDir``.
``load_run(run_dir)`` rebuilds the trained split model and its defence in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from reproduce.checkpoint import load_checkpoint, reshape_to_state_dict
from reproduce.defences import Defence, build_defence, with_noise
from reproduce.models import SplitModel, build_split_model
from reproduce.rundir import RunDir


def build_model(config: dict, *, baseline: bool = False) -> SplitModel:
    """The split model of ``config`` (``baseline``: without PATROL's extra client layer)."""
    return build_split_model(
        config["arch"],
        config["num_classes"],
        config["cut"],
        config["image_size"],
        in_channels=config["in_channels"],
        bottleneck=config["bottleneck"],
        sigmoid=config["sigmoid"],
        extra_client_layer=config["extra_client_layer"] and not baseline,
    )


def build_run_defence(config: dict) -> Defence:
    """The defence of ``config``: the named defence, with noise in front when ``noise_on``."""
    defence = build_defence(config["defence"], **config["defence_options"])
    if config["noise_on"]:
        defence = with_noise(defence, config["sigma"])
    return defence


def setup_defence(defence: Defence, model: SplitModel, config: dict, device) -> None:
    """``defence.setup`` for ``model``; PATROL also gets the encoder size without its extra layer."""
    baseline = None
    if config["extra_client_layer"]:
        baseline = sum(p.numel() for p in build_model(config, baseline=True).encoder.parameters())
    defence.setup(
        model,
        image_size=config["image_size"],
        in_channels=config["in_channels"],
        dataset=config["dataset"],
        device=device,
        total_epochs=config["epochs"],
        baseline_encoder_params=baseline,
        bf16_autocast=bool(config.get("bf16_autocast")),
    )


def load_model_state(model: nn.Module, state: dict) -> None:
    """Load a model state_dict, first resizing layers a pruning changed (PATROL)."""
    reshape_to_state_dict(model, state)
    model.load_state_dict(state)


class ServerNotKept(nn.Module):
    """The server half of a run restored from a record, which keeps the client half only: calling it fails."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = str(run_dir)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            f"{self.run_dir} was restored from a record, which keeps the client half's weights only: "
            "its server half (and so its accuracy) cannot be evaluated; the record's metrics.jsonl has the accuracy"
        )


@dataclass
class LoadedRun:
    """A trained run, ready for attacks. ``model`` and ``defence`` are in eval mode on ``device``.

    Use ``defence.perturb(model.encoder(x))`` for what the server (and an attacker) receives;
    the noise / dropout stay on in eval mode, as in the authors' evaluation.
    """

    config: dict
    model: SplitModel
    defence: Defence
    dataset: str
    data_root: Optional[str]
    num_classes: int
    sigma: float
    noise_on: bool
    run_dir: Path
    which: str
    metrics: list = field(default_factory=list)
    cem_state: Optional[dict] = None


def read_config(run_dir: Union[str, Path]) -> dict:
    """The run's ``config.json`` (FileNotFoundError when ``run_dir`` is no run directory)."""
    return RunDir(run_dir).read_config()


def load_run(run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu", which: str = "final") -> LoadedRun:
    """Load the model and defence of a training run.

    which: "final" (``final.pt``, training finished) or "checkpoint" (``checkpoint.pt``, the last
    finished epoch of a run that may still be going). A run restored from a record
    (``reproduce.records restore``) loads its client half only: its ``model.server`` raises when called.
    """
    rd = RunDir(run_dir).check_live(
        "loaded as a whole model (it keeps the encoder only: reproduce.records.load_encoder)"
    )
    weights = rd.weights_path(which)
    config = rd.read_config()
    run_dir = rd.path
    model = build_model(config).to(device)
    defence = build_run_defence(config)
    if rd.is_restored:
        if which != "final":
            raise ValueError(f"{rd.path} was restored from a record: it has no {RunDir.CHECKPOINT} to load")
        # The record kept the client half only; every defence's perturb depends on its config alone
        # (tests/test_records.py checks that), so a fresh defence perturbs as the trained one did.
        load_model_state(model.encoder, torch.load(rd.encoder_path, map_location=device, weights_only=True))
        model.server = ServerNotKept(rd.path)
        setup_defence(defence, model, config, device)
        state = {"metrics": rd.metrics()}
    else:
        state = load_checkpoint(weights, map_location=device)
        load_model_state(model, state["model"])
        setup_defence(defence, model, config, device)
        defence.load_state_dict(state["defence"])
    model.eval()
    defence.eval()
    return LoadedRun(
        config=config,
        model=model,
        defence=defence,
        dataset=config["dataset"],
        data_root=config["data_root"],
        num_classes=config["num_classes"],
        sigma=config["sigma"],
        noise_on=config["noise_on"],
        run_dir=run_dir,
        which=which,
        metrics=list(state.get("metrics", [])),
        cem_state=state.get("cem"),
    )
