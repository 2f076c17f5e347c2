"""The experiment pipeline as plain calls: train a run unless it is finished, attack it unless it is attacked.

    rd = ensure_trained("runs/noise_cem", preset="cpu", overrides={"defence": "noise", "cem_lambda": 16.0})
    entries = ensure_attacked(rd, "decoder", ("train_time", "infer_time"), overrides={"epochs": 8})
    record = ensure_bound(rd)   # RUN/bound.json: Eq. 3's bound for Figure 3 (None when the run adds no noise)

All are idempotent: a finished run, attack or bound is returned as it is, an interrupted run or attack
resumes. They are what ``reproduce.table``, ``reproduce.demo`` and ``reproduce.grid`` call.
"""

from __future__ import annotations

import importlib
import os
import shlex
import sys
from typing import Callable, Mapping, Optional, Sequence, Union

from reproduce.rundir import RunDir, setting_key

PathLike = Union[str, os.PathLike, RunDir]
TRAIN_SETTINGS_FIXED = ("out", "resume", "stop_after_epoch")  # the pipeline decides these
# What the steps (and the grid's tables) import when they first run. tests/test_grid.py checks that importing
# these leaves no project import inside a function unresolved.
STEP_MODULES = (
    "reproduce.train",
    "reproduce.attack",
    "reproduce.bound",
    "reproduce.data",
    "reproduce.runs",
    "reproduce.train_data",
    "reproduce.table",
    "reproduce.table_efficiency",
    "reproduce.strength",
)


def preload() -> None:
    """Import every module a step will need, and every CEM backend's Python module, now.

    A grid runs for days; code merged into its checkout meanwhile must not meet, half-way, the modules it
    already holds (an ImportError hours in). After this call it runs on the code it started with."""
    from cem_fast import backends

    for name in STEP_MODULES:
        importlib.import_module(name)
    for name in backends.BACKENDS:
        try:
            backends.get(name)
        except ImportError:  # a backend this machine cannot load; it falls back to 'torch' anyway
            pass


def _train_namespace(path, preset: Optional[str], overrides: Mapping, data_root, device, threads, progress):
    from reproduce.train_config import build_parser

    parser = build_parser()
    args = parser.parse_args(["--out", str(path)])
    known = set(vars(args))
    for key, value in overrides.items():
        if key not in known or key in TRAIN_SETTINGS_FIXED:
            raise ValueError(
                f"overrides: {key!r} is not a setting of reproduce.train "
                f"(one of {sorted(known - set(TRAIN_SETTINGS_FIXED))})"
            )
        setattr(args, key, value)
    args.preset = preset
    for key, value in (("data_root", data_root), ("device", device), ("threads", threads)):
        if value is not None:
            setattr(args, key, str(value) if key == "data_root" else value)
    args.progress = progress
    return args


def train_overrides(flags: str) -> dict:
    """The settings a string of ``reproduce.train`` flags sets (``"--epochs 3 --no-augment"`` -> a dict)."""
    from reproduce.train_config import build_parser

    parser = build_parser()
    defaults = vars(parser.parse_args(["--out", "x"]))
    given = vars(parser.parse_args(["--out", "x", *shlex.split(flags)]))
    out = {k: v for k, v in given.items() if v != defaults[k]}
    bad = sorted(set(out) & set(TRAIN_SETTINGS_FIXED))
    if bad:
        raise ValueError(f"--train-args may not set {', '.join(bad)}: the pipeline chooses them")
    return out


def planned_config(run_dir: PathLike, *, preset: Optional[str] = None, overrides: Optional[Mapping] = None) -> dict:
    """The settings ``ensure_trained`` would train ``run_dir`` with (its stored ones once it has started)."""
    from reproduce.train_config import DEFAULT_PRESET, resolve_config

    rd = RunDir(run_dir)
    if rd.started:
        return rd.read_config()
    overrides = {k: v for k, v in dict(overrides or {}).items() if k != "progress"}
    return resolve_config(_train_namespace(rd.path, preset or DEFAULT_PRESET, overrides, None, None, None, False))


def ensure_trained(
    run_dir: PathLike,
    *,
    preset: Optional[str] = None,
    overrides: Optional[Mapping] = None,
    data_root: Optional[PathLike] = None,
    device: Optional[str] = None,
    threads: Optional[int] = None,
    download: bool = False,
    log: Callable[[str], None] = print,
) -> RunDir:
    """Train ``run_dir`` as ``preset`` + ``overrides`` say unless it has finished; resume an interrupted run.

    ``overrides`` maps ``reproduce.train`` settings (their flag names with ``_``: ``defence``, ``sigma``,
    ``cem_lambda``, ``epochs``, ``seed``, ...) to values. A run already there must have been made with the
    same preset (ValueError otherwise) and its stored settings bind. Returns the finished run's ``RunDir``.
    """
    from reproduce import train
    from reproduce.train_config import DEFAULT_PRESET, resolve_config, resume_config

    rd = RunDir(run_dir)
    if rd.finished:
        return rd
    overrides = dict(overrides or {})
    progress = bool(overrides.pop("progress", sys.stderr.isatty()))
    preset = preset or DEFAULT_PRESET
    args = _train_namespace(rd.path, preset, overrides, data_root, device, threads, progress)
    cfg = resolve_config(args)
    cfg["command"] = "reproduce.pipeline.ensure_trained"
    if rd.started:
        stored = rd.read_config()
        if stored.get("preset") != preset:
            raise ValueError(
                f"{rd.path} holds a run of preset {stored.get('preset')!r}, not {preset!r}: "
                "use another run directory per preset"
            )
        cfg = resume_config(stored, cfg, args)
        log(f"[pipeline] resuming {rd.path}")
    else:
        log(f"[pipeline] training {rd.path}")
    train.run(cfg, rd.path, resume=rd.started, log=log, download=download)
    return rd


def ensure_attacked(
    run_dir: PathLike,
    attack: str,
    settings: Sequence[str] = ("train_time",),
    *,
    preset: Optional[str] = None,
    data_root: Optional[PathLike] = None,
    device: str = "cpu",
    overrides: Optional[Mapping] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run ``attack`` on the finished run ``run_dir`` in each of ``settings`` that has no record yet.

    ``settings``: ``"train_time"`` / ``"infer_time"`` (``"train-time"`` spellings too). Returns
    ``{setting: record entry}`` for every requested setting. The attack resumes its own saved state.
    ``overrides["bf16_autocast"] = "auto"``: per setting, as :func:`reproduce.attack.bf16_choice` decides.
    """
    from reproduce.attack import run_attack

    if isinstance(settings, str):
        settings = (settings,)
    rd = RunDir(run_dir).check_finished()
    for setting in rd.missing_settings(attack, settings):
        log(f"[pipeline] {attack} attack on {rd.path} ({setting_key(setting)})")
        run_attack(
            rd.path,
            attack,
            setting=setting,
            preset=preset,
            data_root=data_root,
            device=device,
            overrides=overrides,
        )
    return {setting_key(s): rd.attack_entry(attack, s) for s in settings}


def ensure_bound(
    run_dir: PathLike,
    *,
    device: str = "cpu",
    data_root: Optional[PathLike] = None,
    log: Callable[[str], None] = print,
    **options,
) -> Optional[dict]:
    """The finished run's ``bound.json`` (``reproduce.bound.estimate``), computed when it is missing.

    Returns the record, or None when the run adds no noise to its features (Eq. 3's bound needs it).
    ``options``: ``max_images``, ``h_x_images``.
    """
    from reproduce import bound

    rd = RunDir(run_dir).check_finished()
    return bound.ensure(rd, log=log, device=device, data_root=None if data_root is None else str(data_root), **options)
