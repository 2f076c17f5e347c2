"""The ``cpu`` preset's choice, as a table: final test accuracy of lambda-0 runs that differ in schedule,
batch, learning rate or augmentation, read from their records (``reproduce.results_check`` writes it).

    python -m reproduce.preset_compare RECORD...     # print the table
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

from reproduce.rundir import RunDir

__all__ = ["COLUMNS", "preset_row", "preset_markdown"]

COLUMNS = (
    ("record", "record"),
    ("augment", "augmentation"),
    ("lr_schedule", "LR schedule"),
    ("batch_size", "batch"),
    ("lr", "peak LR"),
    ("epochs", "epochs"),
    ("final_acc", "final test acc (%)"),
    ("best_acc", "best test acc (%)"),
    ("epoch_s", "median s / epoch"),
    ("cpu", "CPU"),
)


def preset_row(run_dir, name: Optional[str] = None) -> dict:
    """One table row of the finished run or record ``run_dir`` (``name``: its label, default the folder)."""
    rd = RunDir(run_dir)
    if not rd.finished:
        raise ValueError(f"{rd.path} has not finished training")
    cfg, rows = rd.read_config(), rd.metrics()
    accs = [r["test_acc"] for r in rows if r.get("test_acc") is not None]
    times = [r["time_s"] for r in rows if r.get("time_s") is not None]
    machine = rd.machine(cfg)
    return {
        "record": name or rd.path.name,
        "augment": cfg.get("augment"),
        "lr_schedule": cfg.get("lr_schedule"),
        "batch_size": cfg.get("batch_size"),
        "lr": cfg.get("lr"),
        "epochs": f"{len(rows)} / {cfg.get('epochs')}",
        "final_acc": round(100 * accs[-1], 2) if accs else None,
        "best_acc": round(100 * max(accs), 2) if accs else None,
        "epoch_s": round(statistics.median(times)) if times else None,
        "cpu": machine.get("cpu", "not recorded"),
        "threads": cfg.get("threads"),
    }


def preset_markdown(rows: Sequence[dict], title: str) -> str:
    """The rows as a markdown table under ``title``."""
    head = "| " + " | ".join(label for _, label in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join("-" if r[k] is None else str(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    note = (
        "Test accuracy after the last epoch on the run's own test subset; the epoch times are those of a machine "
        "shared with other work (compare them only within a row's run)."
    )
    return "\n".join([f"# {title}", "", head, rule, *body, "", note, ""])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    print(preset_markdown([preset_row(p, Path(p).as_posix()) for p in sys.argv[1:]], "cpu preset candidates"))
