"""How a setting's attack entry is written into a run (the file names are ``reproduce.rundir.RunDir``'s).

``RUN/attack_<name>.json``: the header (run, defence, preset, seed) and ``settings[<setting>]`` entries;
``RUN/attack_<name>_samples.pt``: a few test originals (uint8) and their reconstructions per setting;
``RUN/attack_<name>/<setting>/``: the attack's resumable state (checkpoint.pt while it trains, best.pt).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reproduce.checkpoint import save_atomic, write_json_atomic
from reproduce.rundir import RunDir

__all__ = ["SETTINGS", "read_record", "write_setting"]

SETTINGS = ("train_time", "infer_time")


def read_record(run_dir, attack: str) -> dict:
    """The attack's JSON record of a run ({} when it has none yet)."""
    path = RunDir(run_dir).attack_record_path(attack)
    if not path.exists():
        return {}
    with open(path) as f:
        return json.load(f)


def write_setting(run_dir, attack: str, header: dict, setting: str, entry: dict, samples: dict) -> Path:
    """Add (or replace) one setting's entry and samples, keeping the other settings; atomic writes."""
    report = read_record(run_dir, attack)
    report.update(header)
    report.setdefault("settings", {})[setting] = entry
    rd = RunDir(run_dir)
    path = rd.attack_record_path(attack)
    write_json_atomic(report, path)
    spath = rd.attack_samples_path(attack)
    saved = torch.load(spath, map_location="cpu", weights_only=True) if spath.exists() else {}
    saved.update({k: v for k, v in header.items() if k != "settings"})
    saved.setdefault("settings", {})[setting] = samples
    save_atomic(saved, spath)
    return path
