"""Copy a run's small record (config.json + per-epoch metrics, no weights) into this folder.

    python reproduce/results/runs/save_record.py RUN_DIR NAME

writes ``reproduce/results/runs/NAME/{config.json,metrics.json}``: the config with its machine
paths replaced (``data_root`` and ``--data-root`` -> ``../shared/data``, the project's data
convention; ``--out`` -> ``runs/NAME``), and the metrics as one JSON list (one row per finished
epoch). ``complete`` in ``metrics.json`` says whether all
the configured epochs are there. Refuses to write more than 1 MB.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_BYTES = 1_000_000


def _relative_command(command: str, name: str) -> str:
    words = shlex.split(command)
    for i, w in enumerate(words[:-1]):
        if w == "--out":
            words[i + 1] = f"runs/{name}"
        elif w == "--data-root":
            words[i + 1] = "../shared/data"
    return shlex.join(words)


def save_record(run_dir: str | Path, name: str) -> Path:
    """Write ``NAME/config.json`` and ``NAME/metrics.json`` from ``run_dir``; returns the folder."""
    run_dir = Path(run_dir)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    config = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if config.get("data_root"):
        config["data_root"] = "../shared/data"
    if config.get("command"):
        config["command"] = _relative_command(config["command"], name)
    metrics = {"epochs_configured": config.get("epochs"), "epochs_done": len(rows),
               "complete": len(rows) == config.get("epochs"), "rows": rows}
    texts = {"config.json": json.dumps(config, indent=1, sort_keys=True) + "\n",
             "metrics.json": json.dumps(metrics, indent=1) + "\n"}
    size = sum(len(t.encode()) for t in texts.values())
    if size > MAX_BYTES:
        raise ValueError(f"the record would be {size} bytes, over {MAX_BYTES}")
    out = HERE / name
    out.mkdir(exist_ok=True)
    for file, text in texts.items():
        (out / file).write_text(text)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    print(save_record(sys.argv[1], sys.argv[2]))
