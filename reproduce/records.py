"""Committed run records: ``python -m reproduce.records save RUN... | list | check | restore RECORD...``.

A record is a finished run directory stripped to what the tables and figures read, in the layout the grid
and ``reproduce.table`` use: ``reproduce/results/runs/<grid>/<dataset>_<arch>_<defence>_lam<L>_sigma<S>/seed<N>/``
holding

* ``config.json``   the run's config, machine paths replaced (``data_root`` -> ``../shared/data``, the
  ``--out`` of its command -> the record's name);
* ``metrics.jsonl`` the per-epoch metrics, as the run wrote them;
* ``attack_<A>.json`` every attack record (metrics, learning curve, class histograms of the attack's
  training and scored images), its ``run`` field relative;
* ``attack_<A>_samples.pt`` the first few test originals and their reconstructions per setting (uint8);
* ``bound.json``    Figure 3's entropy-bound estimate, when the run has one;
* ``encoder.pt``    the client half's ``state_dict`` (fp32), nothing else;
* ``record.json``   the marker (``RunDir.is_record``): format, grid, where it was saved from.

No ``final.pt``, ``checkpoint.pt`` or attack state: a record reads as a finished run but cannot be
resumed or attacked. Each record must stay under ``MAX_BYTES``; ``check`` lists what breaks the rules.
``restore`` copies a record back into a live run directory (``RunDir.is_restored``) that can be attacked
and saved again without retraining, so a new machine goes on with a run's missing attacks; it holds the
client half only, so its accuracy is the record's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from reproduce.machine import machine_info
from reproduce.rundir import RunDir, find_runs

__all__ = [
    "MAX_BYTES",
    "NUM_SAMPLES",
    "RECORDS_ROOT",
    "record_name",
    "save_record",
    "check_record",
    "find_records",
    "load_encoder",
    "restore_record",
    "absolute_paths",
    "main",
]

MAX_BYTES = 1_000_000
NUM_SAMPLES = 8  # test images (and reconstructions) kept per attack setting: Figure 5's columns
FORMAT = 1
DATA_ROOT = "../shared/data"  # the project's data convention, written in place of a machine's data path
REPO = Path(__file__).resolve().parents[1]
RECORDS_ROOT = REPO / "reproduce" / "results" / "runs"
ATTACK_RE = re.compile(r"^attack_([A-Za-z0-9]+)\.json$")
SAMPLES_RE = re.compile(r"^attack_([A-Za-z0-9]+)_samples\.pt$")
FIXED_FILES = (RunDir.CONFIG, RunDir.METRICS, RunDir.RECORD, RunDir.ENCODER, RunDir.BOUND)
# A token that starts like an absolute path: /x/..., C:\..., ~/... (after a blank, quote, '=' or '(').
_ABSOLUTE = re.compile(r"""(?:^|[\s='"(,])(/[^\s'"/]+/?[^\s'"]*|[A-Za-z]:[\\/][^\s'"]*|~/[^\s'"]*)""")


# ----------------------------------------------------------------------------- names and paths


def record_name(config: dict) -> str:
    """``<dataset>_<arch>_<defence>_lam<L>_sigma<S>/seed<N>``: the run's place in the grid / table layout."""
    from reproduce.table import Arm

    for key in ("dataset", "arch", "defence", "sigma", "cem_lambda", "seed"):
        if key not in config:
            raise ValueError(f"config has no {key!r}: not a config.json of reproduce.train")
    lam = float(config["cem_lambda"])
    arm = Arm(
        row="",
        defence=config["defence"],
        cem=lam > 0,
        dataset=config["dataset"],
        arch=config["arch"],
        sigma=float(config["sigma"]),
        cem_lambda=lam,
        cem_variant=config.get("cem_variant", "paper"),
    )
    return f"{arm.name(config['dataset'])}/seed{config['seed']}"


def absolute_paths(obj, where: str = "") -> list[str]:
    """``"field: value"`` for every string in ``obj`` (nested dicts / lists) that holds an absolute path."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += absolute_paths(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += absolute_paths(v, f"{where}[{i}]")
    elif isinstance(obj, str) and _ABSOLUTE.search(obj):
        found.append(f"{where or '<value>'}: {obj!r}")
    return found


def _replace_strings(obj, old: Sequence[str], new: str):
    if isinstance(obj, dict):
        return {k: _replace_strings(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_strings(v, old, new) for v in obj]
    if isinstance(obj, str):
        for o in old:
            obj = obj.replace(o, new)
    return obj


def _relative_command(command: str, out: str) -> str:
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    for i, w in enumerate(words):
        for flag, value in (("--out", out), ("--data-root", DATA_ROOT)):
            if w == flag and i + 1 < len(words):
                words[i + 1] = value
            elif w.startswith(flag + "="):
                words[i] = f"{flag}={value}"
    return shlex.join(words)


def _json_text(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _repo_relative(path: Path) -> Optional[str]:
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return None


# ----------------------------------------------------------------------------- saving


def _encoder_bytes(run_dir: Path) -> bytes:
    from reproduce.runs import load_run

    encoder = load_run(run_dir, device="cpu").model.encoder
    state = {
        k: (v.float() if v.is_floating_point() else v).detach().clone().contiguous()
        for k, v in encoder.state_dict().items()
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _samples_bytes(path: Path, header: dict, num_samples: int) -> Optional[bytes]:
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    settings = {}
    for setting, s in saved.get("settings", {}).items():
        original = s["original"][:num_samples]
        recon = s["reconstruction"][:num_samples]
        if original.dtype != torch.uint8:
            original = original.float().clamp(0, 1).mul(255).round().to(torch.uint8)
        if recon.dtype != torch.uint8:
            recon = recon.float().clamp(0, 1).mul(255).round().to(torch.uint8)
        settings[setting] = {"original": original.contiguous(), "reconstruction": recon.contiguous()}
    buf = io.BytesIO()
    torch.save({**{k: v for k, v in header.items() if k != "settings"}, "settings": settings}, buf)
    return buf.getvalue()


def _strength(config: dict) -> Optional[dict]:
    """The run's CEM weight and its value in the paper's units (``reproduce.strength``); None without CEM."""
    from reproduce.strength import run_paper_units

    units = run_paper_units(config)
    if units is None:
        return None
    return {
        "lambda": float(config["cem_lambda"]),
        "variant": config.get("cem_variant"),
        "schedule": config.get("cem_schedule", "constant"),
        "train_size": config["train_size"],
        "lambda_paper_units": units,
    }


def record_files(run_dir, name: str, grid: str, num_samples: int = NUM_SAMPLES) -> dict[str, bytes]:
    """The files of the record of finished run ``run_dir`` as it would be saved under ``<grid>/<name>``."""
    rd = RunDir(run_dir)
    if rd.is_record:
        raise ValueError(f"{rd.path} is already a record; save the live run it came from")
    rd.check_finished()
    if not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
    relative = f"runs/{grid}/{name}"  # where the grid keeps the live run
    live = [str(rd.path.resolve())] + ([str(rd.path)] if rd.path.is_absolute() else [])
    config = _replace_strings(rd.read_config(), live, relative)
    if config.get("data_root"):
        config["data_root"] = DATA_ROOT
    if isinstance(config.get("command"), str):
        config["command"] = _relative_command(config["command"], relative)
    rows = rd.metrics()
    if not rows:
        raise ValueError(f"{rd.metrics_path} has no finished epoch")
    files = {RunDir.CONFIG: _json_text(config).encode(), RunDir.METRICS: rd.metrics_path.read_bytes()}
    for path in sorted(rd.path.glob("attack_*.json")):
        attack = ATTACK_RE.match(path.name)
        if attack is None:
            continue
        report = _replace_strings(json.loads(path.read_text()), live, relative)
        report["run"] = relative
        files[path.name] = _json_text(report).encode()
        samples = _samples_bytes(rd.attack_samples_path(attack.group(1)), report, num_samples)
        if samples is not None and num_samples > 0:
            files[rd.attack_samples_path(attack.group(1)).name] = samples
    if rd.bound_path.is_file():
        files[RunDir.BOUND] = _json_text(
            _replace_strings(json.loads(rd.bound_path.read_text()), live, relative)
        ).encode()
    files[RunDir.ENCODER] = _encoder_bytes(rd.path)
    marker = {
        "format": FORMAT,
        "grid": grid,
        "name": name,
        "saved_from": _repo_relative(rd.path),
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # the machine that held the run when it was saved (normally the one that trained it; the run's own
        # config.json names its machine too when it was trained by this version)
        "saved_on": machine_info(),
        "cem": _strength(config),
        "weights": RunDir.ENCODER,
        "samples_per_setting": num_samples,
    }
    if rd.is_restored:  # trained elsewhere: say where the training came from
        marker["restored"] = json.loads(rd.restored_path.read_text())
    files[RunDir.RECORD] = _json_text(marker).encode()
    size = sum(len(b) for b in files.values())
    if size > MAX_BYTES:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in sorted(files.items(), key=lambda kv: -len(kv[1])))
        raise ValueError(
            f"the record of {rd.path} would be {size} bytes, over {MAX_BYTES} ({sizes}); keep fewer samples "
            "(--samples) or record a smaller encoder"
        )
    return files


def save_record(
    run_dir,
    root=RECORDS_ROOT,
    *,
    grid: Optional[str] = None,
    name: Optional[str] = None,
    replace: bool = False,
    num_samples: int = NUM_SAMPLES,
) -> Path:
    """Save the record of the finished run ``run_dir`` to ``root/<grid>/<name>``; returns its folder.

    ``grid``: default the run's preset. ``name``: default :func:`record_name` of its config. An existing
    record is kept unless ``replace``. A record that would break :func:`check_record`'s rules (an absolute
    path, an unfinished attack, over ``MAX_BYTES``) is not written: ValueError says why.
    """
    rd = RunDir(run_dir)
    config = rd.read_config()
    grid = grid or config.get("preset")
    name = name or record_name(config)
    for what, value in (("grid", grid), ("name", name)):
        parts = str(value or "").split("/")
        if not value or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise ValueError(f"{what} must be a relative folder name without '..', got {value!r}")
    files = record_files(rd.path, name, grid, num_samples)
    target = Path(root) / grid / name
    if target.exists():
        if not replace:
            raise FileExistsError(f"{target} exists; pass replace=True (--replace) to overwrite it")
        if not RunDir(target).is_record and any(target.iterdir()):
            raise ValueError(f"{target} holds something other than a record; not replacing it")
    tmp = Path(root) / grid / f".{name.replace('/', '+')}.tmp"  # beside the grid's records, not inside the name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for fname, data in files.items():
        (tmp / fname).write_bytes(data)
        os.chmod(tmp / fname, 0o644)
    problems = check_record(tmp)
    if problems:
        shutil.rmtree(tmp)
        raise ValueError(f"the record of {rd.path} would break the record rules: {'; '.join(problems)}")
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def restore_record(record_dir, run_dir, *, data_root=None) -> RunDir:
    """Copy the record ``record_dir`` into the new live run directory ``run_dir``; returns its ``RunDir``.

    The restored run (``RunDir.is_restored``) has the record's config, metrics, attack results, bound and
    client-half weights, so ``reproduce.pipeline`` attacks it where the record left off and
    :func:`save_record` saves it again. ``data_root``: written into its config (the record says
    ``../shared/data``). ``run_dir`` must not hold a run (FileExistsError).
    """
    src = RunDir(record_dir)
    if not src.is_record:
        raise ValueError(f"{src.path} is not a record (no {RunDir.RECORD})")
    problems = check_record(src)
    if problems:
        raise ValueError(f"{src.path} breaks the record rules: {'; '.join(problems)}")
    if not src.encoder_path.is_file():
        raise ValueError(f"{src.path} was saved without weights: there is nothing to attack")
    target = RunDir(run_dir)
    if target.path.exists() and any(target.path.iterdir()):
        raise FileExistsError(f"{target.path} is not empty; restore into a new folder")
    marker = src.read_record_marker()
    config = src.read_config()
    if data_root is not None:
        config["data_root"] = str(data_root)
    tmp = target.path.with_name(f".{target.path.name}.restoring")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for path in sorted(src.path.iterdir()):
        if path.name not in (RunDir.RECORD, RunDir.CONFIG):
            shutil.copyfile(path, tmp / path.name)
    (tmp / RunDir.CONFIG).write_text(_json_text(config))
    restored = {
        "record": _repo_relative(src.path) or f"{marker.get('grid')}/{marker.get('name')}",
        "record_saved_on": marker.get("saved_on"),
        "record_saved_at": marker.get("saved_at"),
        "restored_on": machine_info(),
        "restored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / RunDir.RESTORED).write_text(_json_text(restored))
    if target.path.exists():
        target.path.rmdir()
    os.replace(tmp, target.path)
    return target


# ----------------------------------------------------------------------------- reading and checking


def find_records(root=RECORDS_ROOT) -> Iterator[RunDir]:
    """Every record below ``root`` (run folders with a ``record.json``), in sorted order."""
    root = Path(root)
    if not root.is_dir():
        return
    for rd in find_runs(root):
        if rd.is_record:
            yield rd


def load_encoder(record_dir, device: str = "cpu") -> torch.nn.Module:
    """The client half of a record, rebuilt from its config and ``encoder.pt``, in eval mode."""
    from reproduce.checkpoint import reshape_to_state_dict
    from reproduce.runs import build_model

    rd = RunDir(record_dir)
    if not rd.encoder_path.is_file():
        raise FileNotFoundError(f"{rd.path} has no {RunDir.ENCODER} (a record saved without weights?)")
    encoder = build_model(rd.read_config()).encoder
    state = torch.load(rd.encoder_path, map_location="cpu", weights_only=True)
    reshape_to_state_dict(encoder, state)
    encoder.load_state_dict(state)
    return encoder.to(device).eval()


def class_balanced(counts: Sequence[int], tolerance: float = 0.1) -> bool:
    """Whether per-class counts differ by at most ``tolerance`` of their mean (or by one image, which a
    stratified split of a total the classes do not divide needs)."""
    spread = max(counts) - min(counts)
    return spread <= max(1.0, tolerance * sum(counts) / len(counts))


def _check_attack(path: Path) -> list[str]:
    problems = []
    report = json.loads(path.read_text())
    for setting, entry in report.get("settings", {}).items():
        where = f"{path.name} {setting}"
        if "metrics" not in entry:
            problems.append(f"{where}: no metrics (an unfinished attack)")
            continue
        counts = entry.get("scored_class_counts")
        if not isinstance(counts, list) or not counts:
            problems.append(f"{where}: no scored_class_counts")
        elif "n_scored" in entry and sum(counts) != entry["n_scored"]:
            problems.append(f"{where}: scored_class_counts sum to {sum(counts)}, n_scored is {entry['n_scored']}")
        elif not class_balanced(counts):
            problems.append(f"{where}: scored_class_counts {counts} not balanced within 10 % across classes")
        if not isinstance(entry.get("learning_curve"), list) or not entry["learning_curve"]:
            problems.append(f"{where}: no learning_curve")
        if "train_class_counts" not in entry:
            problems.append(f"{where}: no train_class_counts")
    return problems


def check_record(record_dir) -> list[str]:
    """What breaks the record rules in ``record_dir`` (empty: none): files, size, absolute paths, attacks."""
    rd = RunDir(record_dir)
    problems = []
    if not rd.is_record:
        return [f"no {RunDir.RECORD}: not a record"]
    for required in (RunDir.CONFIG, RunDir.METRICS):
        if not (rd.path / required).is_file():
            problems.append(f"no {required}")
    try:
        marker = json.loads(rd.record_path.read_text())
    except ValueError as err:
        return problems + [f"{RunDir.RECORD}: not valid JSON ({err})"]
    if marker.get("format") != FORMAT:
        problems.append(f"{RunDir.RECORD}: format {marker.get('format')!r}, this code reads {FORMAT}")
    if marker.get("weights") and not rd.encoder_path.is_file():
        problems.append(f"{RunDir.RECORD} names weights {marker['weights']!r}, but there is no {RunDir.ENCODER}")
    if not marker.get("weights") and rd.encoder_path.is_file():
        problems.append(f"{RunDir.ENCODER} exists, but {RunDir.RECORD} says the record has no weights")
    size = 0
    for path in sorted(rd.path.iterdir()):
        if path.is_dir():
            problems.append(f"{path.name}/: a record holds no folders (attack state, samples?)")
            continue
        size += path.stat().st_size
        name = path.name
        if name not in FIXED_FILES and not ATTACK_RE.match(name) and not SAMPLES_RE.match(name):
            problems.append(
                f"{name}: not a record file (only {', '.join(FIXED_FILES)}, attack_<A>.json, attack_<A>_samples.pt)"
            )
            continue
        if name.endswith((".json", ".jsonl")):
            try:
                text = path.read_text()
                obj = (
                    [json.loads(line) for line in text.splitlines() if line.strip()]
                    if name.endswith("l")
                    else json.loads(text)
                )
            except (ValueError, UnicodeDecodeError) as err:
                problems.append(f"{name}: not valid JSON ({err})")
                continue
            problems += [f"{name}: absolute path in {hit}" for hit in absolute_paths(obj)]
            if ATTACK_RE.match(name):
                problems += _check_attack(path)
        elif name.endswith(".pt"):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file is a problem to report
                problems.append(f"{name}: does not load with weights_only=True ({type(err).__name__}: {err})")
                continue
            if name == RunDir.ENCODER:
                if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                    problems.append(f"{name}: not a state_dict of tensors only")
                elif any(v.is_floating_point() and v.dtype != torch.float32 for v in obj.values()):
                    problems.append(f"{name}: not fp32")
            else:
                problems += [
                    f"{name}: absolute path in {hit}"
                    for hit in absolute_paths({k: v for k, v in obj.items() if k != "settings"})
                ]
    if size > MAX_BYTES:
        problems.append(f"{size} bytes, over {MAX_BYTES}")
    return problems


def describe(rd: RunDir, root: Path) -> str:
    """One line of ``list``: name, epochs, accuracy, attacks, weights, size."""
    rows = rd.metrics()
    acc = rd.final_accuracy()
    attacks = []
    for path in sorted(rd.path.glob("attack_*.json")):
        m = ATTACK_RE.match(path.name)
        if m:
            settings = sorted(rd.attack_record(m.group(1)).get("settings", {}))
            attacks.append(f"{m.group(1)} ({', '.join(settings)})")
    size = sum(p.stat().st_size for p in rd.path.iterdir() if p.is_file())
    weights = "encoder" if rd.encoder_path.is_file() else "no weights"
    acc_text = "-" if acc is None else f"{100 * acc:.2f}%"
    return (
        f"{rd.path.relative_to(root).as_posix()}: {len(rows)} epochs, acc {acc_text}, "
        f"attacks: {', '.join(attacks) or 'none'}; {weights}; {size / 1000:.0f} kB"
    )


# ----------------------------------------------------------------------------- CLI


def _runs_to_save(paths: Sequence[str]) -> list[RunDir]:
    runs = []
    for p in map(Path, paths):
        found = [rd for rd in find_runs(p) if not rd.is_record]
        if not found:
            raise FileNotFoundError(f"{p} is no run directory and holds none (no {RunDir.CONFIG} below it)")
        runs += found
    return list(dict.fromkeys(runs))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reproduce.records", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="the records folder (default reproduce/results/runs)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save", help="save the records of finished runs (run directories or folders holding them)")
    s.add_argument("runs", nargs="+")
    s.add_argument("--grid", default=None, help="records folder under the root (default: each run's preset)")
    s.add_argument("--name", default=None, help="ARM/seedN (default from the config; one run only)")
    s.add_argument("--replace", action="store_true", help="overwrite an existing record")
    s.add_argument("--samples", type=int, default=NUM_SAMPLES, help=f"images kept per attack setting ({NUM_SAMPLES})")
    r = sub.add_parser("restore", help="copy records back into live run directories, to attack them further")
    r.add_argument("records", nargs="+", help="record folders (or folders holding them)")
    r.add_argument("--runs-root", default=None, help="where the live runs go (default runs/<each run's preset>)")
    r.add_argument("--data-root", default=None, help="the data folder written into each restored config")
    sub.add_parser("list", help="one line per record")
    sub.add_parser("check", help="list what breaks the record rules (exit 1 if anything)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    root = Path(args.root) if args.root else RECORDS_ROOT
    if args.command == "save":
        if args.samples < 0:
            p.error("--samples must be >= 0")
        try:
            runs = _runs_to_save(args.runs)
        except OSError as err:
            p.error(str(err))
        if args.name and len(runs) > 1:
            p.error(f"--name names one record, but {len(runs)} runs were given")
        failed = 0
        for rd in runs:
            if not rd.finished:
                print(f"skipping {rd.path}: {rd.status()}", file=sys.stderr)
                continue
            try:
                out = save_record(
                    rd, root, grid=args.grid, name=args.name, replace=args.replace, num_samples=args.samples
                )
            except (OSError, ValueError) as err:
                print(f"error: {err}", file=sys.stderr)
                failed += 1
                continue
            print(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1000:.0f} kB)")
        return 1 if failed else 0
    if args.command == "restore":
        return _restore(p, args)
    records = list(find_records(root))
    if args.command == "list":
        for rd in records:
            print(describe(rd, root))
        if not records:
            print(f"no records under {root}")
        return 0
    bad = 0
    for rd in records:
        for problem in check_record(rd):
            print(f"{rd.path.relative_to(root).as_posix()}: {problem}")
            bad += 1
    print(f"{len(records)} record(s), {bad} problem(s)", file=sys.stderr)
    return 1 if bad else 0


def _restore(p: argparse.ArgumentParser, args) -> int:
    found = [rd for folder in args.records for rd in find_records(folder)]
    if not found:
        p.error(f"no record in {', '.join(args.records)}")
    failed = 0
    for rec in found:
        marker, config = rec.read_record_marker(), rec.read_config()
        base = Path(args.runs_root) if args.runs_root else Path("runs") / str(config.get("preset"))
        try:
            out = restore_record(rec, base / marker["name"], data_root=args.data_root)
        except (OSError, ValueError, KeyError) as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"restored {out.path} from {rec.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
