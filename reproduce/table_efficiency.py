"""Table 9 of the paper, reproduced: parameters, MMAC per image and latency of the encoder and the server.

PATROL and the bottleneck (the paper's "others") with and without CEM; ``reproduce.table --table 9`` builds
it through ``build_efficiency_table`` and writes it with ``efficiency_markdown`` / ``efficiency_csv_rows``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

from reproduce import paper_numbers
from reproduce.machine import default_device
from reproduce.rundir import RunDir
from reproduce.table import (
    DATASET_MISSING,
    EFFICIENCY_ROWS,
    HEADERS,
    MISSING,
    Arm,
    Options,
    collect_cells,
    ensure_trained,
    format_cell,
    format_paper,
    run_dir_of,
    table_arms,
    wanted,
)

# Latency repetitions per preset (the paper: 100 batches of 128 images).
LATENCY_REPS = {"smoke": 2, "cpu": 10, "paper": 100}
LATENCY_BATCH = 128


def measure_efficiency(run_dir: Path, device: str, reps: int, batch: int = LATENCY_BATCH) -> dict:
    """Parameters (M), MMAC per image and latency (ms per batch) of a trained run's encoder and server."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from reproduce.runs import load_run

    loaded = load_run(run_dir, device=device)
    model = loaded.model
    cfg = loaded.config
    x1 = torch.randn(1, cfg["in_channels"], cfg["image_size"], cfg["image_size"], device=device)
    xb = torch.randn(batch, *x1.shape[1:], device=device)
    out = {}
    with torch.no_grad():
        zb = model.encoder(xb)
        for prefix, module, inp1, inpb in (("enc", model.encoder, x1, xb), ("srv", model.server, zb[:1], zb)):
            out[f"{prefix}_params_m"] = sum(p.numel() for p in module.parameters()) / 1e6
            counter = FlopCounterMode(display=False)
            with counter:
                module(inp1)
            out[f"{prefix}_mmac"] = counter.get_total_flops() / 2 / 1e6  # FLOPs = 2 x multiply-accumulates
            module(inpb)  # warm-up
            times = []
            for _ in range(reps):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                module(inpb)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(1000 * (time.perf_counter() - t0))
            out[f"{prefix}_time_ms"] = statistics.median(times)
    return out


def build_efficiency_table(opts: Options, run: bool, run_defences: Optional[set[str]], errors: list[str]) -> dict:
    arms = table_arms(9, **(opts.arm_options or {}))
    columns = paper_numbers.EFFICIENCY_COLUMNS
    device = opts.device or default_device()
    reps = LATENCY_REPS[opts.preset]

    def produce(arm: Arm, seed: int) -> Path:
        if run and wanted(arm, run_defences):
            return ensure_trained(arm, seed, opts)
        return run_dir_of(arm, seed, opts).path

    def measure(run_dir: Path) -> dict:
        return measure_efficiency(run_dir, device, reps) if RunDir(run_dir).finished else dict.fromkeys(columns)

    cells = collect_cells(arms, columns, opts, errors, produce, measure)
    return {"number": 9, "arms": arms, "columns": columns, "cells": cells, "device": device, "reps": reps}


def efficiency_markdown(result: dict, opts: Options, errors: Sequence[str]) -> str:
    columns = result["columns"]
    lines = [
        "# Table 9 (reproduction): efficiency of the encoder and the server, VGG11",
        "",
        f"- preset: `{opts.preset}`; seeds: {', '.join(map(str, opts.seeds))}; runs: `{opts.runs_label or opts.runs_root}`",
        f"- data: {opts.data.note if opts.data else DATASET_MISSING}",
        f"- MMAC: multiply-accumulates per image (torch.utils.flop_counter FLOPs / 2); time: median of "
        f"{result['reps']} forward passes of a batch of {LATENCY_BATCH} on `{result['device']}` "
        "(the paper: one RTX 4090)",
        "- the paper reports PATROL and OTHERS once (CEM adds nothing at inference); its numbers stand "
        "beside both our rows",
        "",
    ]
    header = ["Method"] + [h for k in columns for h in (HEADERS[k], "paper")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in result["arms"]:
        label = f"{'PATROL' if arm.row == 'PATROL' else 'Others (Bottleneck)'} — {'w/ CEM' if arm.cem else 'w/o CEM'}"
        row = [label] + [
            x
            for k in columns
            for x in (format_cell(result["cells"][arm][k], k), format_paper(paper_numbers.value(9, arm.row, k), k))
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "CEM overhead at inference (w/ CEM − w/o CEM):", ""]
    for row in EFFICIENCY_ROWS:
        a, b = (next(x for x in result["arms"] if x.row == row and x.cem == c) for c in (False, True))
        diffs = []
        for k in ("enc_params_m", "enc_mmac", "srv_params_m", "srv_mmac"):
            va, vb = result["cells"][a][k].get("mean"), result["cells"][b][k].get("mean")
            diffs.append(f"{HEADERS[k]} {MISSING if va is None or vb is None else f'{vb - va:+.4g}'}")
        lines.append(f"- {row}: " + ", ".join(diffs))
    if errors:
        lines += ["", "Errors (these cells are missing):", *[f"- {e}" for e in errors]]
    return "\n".join(lines) + "\n"


def efficiency_csv_rows(result: dict) -> list[dict]:
    rows = []
    for arm in result["arms"]:
        row = {"table": 9, "method": arm.label, "defence": arm.defence, "cem": int(arm.cem)}
        status = ""
        for k in result["columns"]:
            c = result["cells"][arm][k]
            status = status or (c.get("status") or "")
            row[k] = "" if c.get("mean") is None else c["mean"]
            row[f"{k}_std"] = "" if c.get("mean") is None else c["std"]
            row[f"{k}_n"] = c.get("n", 0)
            p = paper_numbers.value(9, arm.row, k)
            row[f"{k}_paper"] = "" if p is None else p
        row["status"] = status
        rows.append(row)
    return rows
