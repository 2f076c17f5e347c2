"""The run directory: every file name of a training run and every status check, in one place.

A run directory written by ``python -m reproduce.train --out DIR`` holds

* ``config.json``          every resolved setting (preset, data, model, defence, CEM, optimiser, seed, versions)
* ``metrics.jsonl``        one JSON object per finished epoch
* ``checkpoint.pt``        what ``--resume`` needs after the last finished epoch (optimisers, RNGs, ...)
* ``final.pt``             written once training is done: model, defence and CEM state, metrics
* ``attack_<A>.json``      the record of attack ``A``: one entry per setting (``train_time``, ``infer_time``)
* ``attack_<A>_samples.pt`` a few test originals and their reconstructions, for figures
* ``attack_<A>/<setting>/`` the attack's own resumable state
* ``bound.json``           Eq. 3's entropy bound of the trained encoder and what it used (``reproduce.bound``)

A *record* (``reproduce.records``, committed under ``reproduce/results/runs/``) is a stripped run
directory in the same layout: ``config.json``, ``metrics.jsonl``, every ``attack_<A>.json`` (and a few
samples), ``encoder.pt`` (the client half's weights) and the marker ``record.json``. It counts as finished
for reading (accuracy, attack metrics, config) but cannot be resumed or attacked: it has no ``final.pt``.

Nothing else in ``reproduce/`` spells these names: use :class:`RunDir`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from reproduce.checkpoint import FILE_MODE, write_json_atomic

PathLike = Union[str, os.PathLike]


def setting_key(setting: str) -> str:
    """The record key of an attack setting: ``"train-time"`` and ``"train_time"`` both give ``"train_time"``."""
    if not isinstance(setting, str):
        raise TypeError(f"setting must be a string, got {type(setting).__name__}")
    return setting.replace("-", "_")


class RunDir:
    """A training run's directory: its file paths, its status, and reading its records."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint.pt"
    FINAL = "final.pt"
    RECORD = "record.json"  # marks a committed record (reproduce.records)
    ENCODER = "encoder.pt"  # a record's client-half weights
    BOUND = "bound.json"  # Figure 3's entropy-bound estimate, when one was made
    RESTORED = "restored.json"  # marks a live run rebuilt from a record (client half only)

    def __init__(self, path: PathLike):
        if isinstance(path, RunDir):
            path = path.path
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or path, got {type(path).__name__}")
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ file names
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoint_path(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def final_path(self) -> Path:
        return self.path / self.FINAL

    @property
    def record_path(self) -> Path:
        return self.path / self.RECORD

    @property
    def encoder_path(self) -> Path:
        return self.path / self.ENCODER

    @property
    def restored_path(self) -> Path:
        return self.path / self.RESTORED

    def weights_path(self, which: str = "final") -> Path:
        """``final.pt`` (``which="final"``) or ``checkpoint.pt`` (``"checkpoint"``)."""
        if which not in ("final", "checkpoint"):
            raise ValueError(f"which must be 'final' or 'checkpoint', got {which!r}")
        return self.final_path if which == "final" else self.checkpoint_path

    def attack_record_path(self, attack: str) -> Path:
        return self.path / f"attack_{attack}.json"

    def attack_samples_path(self, attack: str) -> Path:
        return self.path / f"attack_{attack}_samples.pt"

    def attack_state_dir(self, attack: str, setting: str) -> Path:
        return self.path / f"attack_{attack}" / setting_key(setting)

    @property
    def bound_path(self) -> Path:
        """``bound.json``: the entropy bound ``reproduce.bound`` estimated for this run."""
        return self.path / self.BOUND

    # ------------------------------------------------------------------ status
    @property
    def started(self) -> bool:
        """Training was started here (``config.json`` exists)."""
        return self.config_path.is_file()

    @property
    def is_record(self) -> bool:
        """A committed record (``record.json``): readable as a finished run, never resumed or attacked."""
        return self.record_path.is_file()

    @property
    def is_restored(self) -> bool:
        """A live run rebuilt from a record (``restored.json``, ``reproduce.records restore``): it can be
        attacked and re-recorded, but it holds the client half's weights only (no server half, no resuming)."""
        return self.restored_path.is_file() and not self.is_record and not self.final_path.is_file()

    @property
    def finished(self) -> bool:
        """Training finished (``final.pt`` exists, or this is a record of a finished run or restored from one)."""
        return self.final_path.is_file() or self.is_record or self.is_restored

    @property
    def resumable(self) -> bool:
        """Started but not finished: ``reproduce.train --resume`` continues it."""
        return self.started and not self.finished

    @property
    def occupied(self) -> bool:
        """Holds a run (finished or not): a new training must not write here without ``--resume``."""
        return self.started or self.checkpoint_path.exists() or self.final_path.exists()

    def status(self) -> str:
        """``"not run"``, ``"training unfinished"``, ``"trained"``, ``"restored"`` or ``"record"``."""
        if not self.started:
            return "not run"
        if self.is_record:
            return "record"
        if self.is_restored:
            return "restored"
        return "trained" if self.finished else "training unfinished"

    def attacked(self, attack: str, setting: str = "train_time") -> bool:
        """Whether ``attack`` has a finished record for ``setting``."""
        return "metrics" in self.attack_entry(attack, setting)

    def missing_settings(self, attack: str, settings: Sequence[str]) -> list[str]:
        """The settings of ``settings`` that ``attack`` has no finished record for."""
        return [s for s in settings if not self.attacked(attack, s)]

    def check_finished(self) -> "RunDir":
        """``self`` if training finished, else an error saying what is wrong and the command that fixes it."""
        if not self.path.exists():
            raise FileNotFoundError(f"run directory {self.path} does not exist")
        if not self.path.is_dir():
            raise NotADirectoryError(f"run {self.path} is not a directory")
        if not self.started:
            raise FileNotFoundError(f"{self.path} is not a run directory: it has no {self.CONFIG}")
        if not self.finished:
            raise ValueError(
                f"run {self.path} has not finished training (no {self.FINAL}); finish it with "
                f"`{self.resume_command()}` before attacking it"
            )
        return self

    def check_live(self, action: str) -> "RunDir":
        """``self`` unless it is a record; ``action`` (e.g. "attacked") names what a record cannot be."""
        if self.is_record:
            raise ValueError(
                f"{self.path} is a committed record (reproduce.records: config, metrics, attack results and the "
                f"encoder's weights, no {self.FINAL} or {self.CHECKPOINT}); it can be read but not {action}: "
                "use the live run directory it was saved from"
            )
        return self

    def check_attackable(self) -> "RunDir":
        """``self`` if training finished and this is a live run (not a record), else the error saying why."""
        return self.check_finished().check_live("attacked")

    def resume_command(self) -> str:
        """The command that continues this run."""
        return f"python -m reproduce.train --out {self.path} --resume"

    # ------------------------------------------------------------------ reading
    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.config_path} not found: is {self.path} a run directory of reproduce.train?")
        return json.loads(self.config_path.read_text())

    def read_record_marker(self) -> dict:
        """A record's ``record.json`` ({} for a live run)."""
        return json.loads(self.record_path.read_text()) if self.is_record else {}

    def machine(self, config: Optional[dict] = None) -> dict:
        """The machine that trained the run (its config's ``machine``), else the one that saved its record; {}.
        ``config``: the run's config when it is already read."""
        config = self.read_config() if config is None else config
        return config.get("machine") or self.read_record_marker().get("saved_on") or {}

    def metrics(self) -> list[dict]:
        """The finished epochs' rows (empty when none)."""
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def final_accuracy(self) -> Optional[float]:
        """Test accuracy (a fraction) of the last epoch, if training finished."""
        if not self.finished:
            return None
        rows = self.metrics()
        return float(rows[-1]["test_acc"]) if rows and "test_acc" in rows[-1] else None

    def attack_record(self, attack: str) -> dict:
        """The whole ``attack_<attack>.json`` (empty when the attack never ran)."""
        path = self.attack_record_path(attack)
        return json.loads(path.read_text()) if path.is_file() else {}

    def attack_entry(self, attack: str, setting: str) -> dict:
        """The record entry of ``attack`` in ``setting`` (empty when missing)."""
        return self.attack_record(attack).get("settings", {}).get(setting_key(setting), {})

    def attack_metric(self, attack: str, setting: str, key: str) -> Optional[float]:
        value = self.attack_entry(attack, setting).get("metrics", {}).get(key)
        return None if value is None else float(value)

    def read_bound(self) -> Optional[dict]:
        """The run's ``bound.json`` (None when it has none)."""
        return json.loads(self.bound_path.read_text()) if self.bound_path.is_file() else None

    @property
    def label(self) -> str:
        """``ARM/seedN`` for the grid's layout, else the directory name."""
        return f"{self.path.parent.name}/{self.path.name}" if self.path.name.startswith("seed") else self.path.name

    # ------------------------------------------------------------------ writing
    def write_config(self, config: dict) -> None:
        write_json_atomic(config, self.config_path)

    def write_bound(self, record: dict) -> None:
        write_json_atomic(record, self.bound_path)

    def write_metrics(self, rows: list[dict]) -> None:
        """Replace ``metrics.jsonl`` with ``rows`` (atomically)."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / (self.METRICS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, self.metrics_path)

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def find_runs(root: PathLike) -> Iterator[RunDir]:
    """Every run directory at or below ``root`` (those with a ``config.json``), in sorted order; hidden
    folders (a name starting with ``.``, e.g. a record being written) are skipped."""
    root = Path(root)
    if (root / RunDir.CONFIG).is_file():
        yield RunDir(root)
        return
    if root.is_dir():
        for cfg in sorted(root.rglob(RunDir.CONFIG)):
            if not any(part.startswith(".") for part in cfg.relative_to(root).parts):
                yield RunDir(cfg.parent)
