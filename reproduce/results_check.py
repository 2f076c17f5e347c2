"""Every table and figure of ``reproduce/results/``, regenerated from the committed records alone.

    python -m reproduce.results_check            # compare; exit 1 with a unified diff if anything differs
    python -m reproduce.results_check --write    # regenerate and overwrite (PNGs of changed data too)

``REGISTRIES["results"]`` lists each artifact: its files and the function that rebuilds them from the
records of one grid, ``reproduce/results/runs/<grid>/`` (``reproduce.records``). Tables are compared as
text (markdown and csv); a figure is compared by its data file (``<name>.json``: the plotted numbers),
never by its pixels, and its PNG is drawn only with ``--write``. Nothing here trains, attacks or reads
a dataset, so the check runs on a fresh clone with no ``runs/`` and no data folder.

It fails (exit 1) when a regenerated file differs from the committed one or is missing, when an artifact
is committed but its records are not, when a record breaks the record rules (``reproduce.records
check``), or when ``reproduce/results/`` holds a file no artifact makes. An artifact with no records and
no committed file only reads "no records yet".
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from reproduce import records
from reproduce.rundir import RunDir, find_runs

__all__ = [
    "NoRecords",
    "Artifact",
    "Registry",
    "REGISTRIES",
    "table_artifact",
    "figure3_artifact",
    "preset_artifact",
    "regime_artifact",
    "figure4_artifact",
    "figure5_artifact",
    "check",
    "main",
]

RESULTS_DIR = records.REPO / "reproduce" / "results"
FIGURE3_MODULE = "reproduce.figure3"  # figure3_data(records_dir) -> dict | None; figure3_plot(data, out)


class NoRecords(Exception):
    """An artifact's records are not there (the message says which)."""


@dataclass(frozen=True)
class Artifact:
    """One table or figure: ``build(grid_dir)`` -> {data file: text} (NoRecords when its records are absent);
    ``plot(grid_dir, texts, results_dir)`` draws its ``images`` (PNGs) from those texts."""

    name: str
    grid: str
    data_files: tuple
    build: Callable[[Path], dict]
    images: tuple = ()
    plot: Optional[Callable[[Path, dict, Path], None]] = None


@dataclass(frozen=True)
class Registry:
    name: str
    artifacts: tuple
    raw: dict = field(default_factory=dict)  # files of the results folder that are records themselves -> why


def _json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def _quiet(_msg: str) -> None:
    pass


def _where(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (messages name no machine path then)."""
    try:
        return Path(path).resolve().relative_to(records.REPO).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- tables


def table_artifact(
    number: int,
    grid: str,
    preset: str,
    dataset: str,
    name: Optional[str] = None,
    attacks: tuple = ("decoder", "gan"),
    seeds: Optional[tuple] = None,
) -> Artifact:
    """Table ``number`` (1-8) of the records in ``<grid>`` at ``preset`` on ``dataset``; ``seeds``: default
    every seed that has a record of one of the table's arms."""
    name = name or f"table{number}_{grid}"
    if number not in range(1, 9):
        raise ValueError(f"number must be a result table 1-8 (Table 9 times the machine), got {number!r}")

    def build(grid_dir: Path) -> dict:
        from reproduce import table

        arms = table.table_arms(number)
        found = [rd.read_config() for rd in find_runs(grid_dir) if rd.finished]
        have = sorted(
            {cfg["seed"] for cfg in found for arm in arms if table._matches(cfg, arm, dataset, cfg.get("seed"), preset)}
        )
        if not have:
            raise NoRecords(f"no record of a Table {number} arm ({preset} preset, {dataset}) in {_where(grid_dir)}")
        opts = table.Options(
            preset=preset,
            runs_root=grid_dir,
            seeds=list(seeds or have),
            data=table.ResolvedData(dataset, None, f"{dataset}, as each record's config.json names it"),
            device=None,
            attacks=attacks,
            log=_quiet,
            runs_label=f"reproduce/results/runs/{grid}",
        )
        _, text, rows, errors = table.render_table(number, opts)
        if errors:
            raise RuntimeError(f"Table {number} from {_where(grid_dir)}: " + "; ".join(errors))
        return {f"{name}.md": text, f"{name}.csv": table.csv_text(rows)}

    return Artifact(name, grid, (f"{name}.md", f"{name}.csv"), build)


# ----------------------------------------------------------------------------- figures


def figure4_artifact(grid: str, name: Optional[str] = None, attack: str = "decoder", setting: str = "train_time"):
    """Figure 4 (accuracy vs attacker MSE) of every record in ``<grid>`` that has the attack's result."""
    name = name or f"figure4_{grid}"

    def build(grid_dir: Path) -> dict:
        from reproduce import figures_curves

        if not any(find_runs(grid_dir)):
            raise NoRecords(f"no records in {_where(grid_dir)}")
        try:
            data = figures_curves.figure4_data([grid_dir], attack=attack, setting=setting, root=grid_dir, log=_quiet)
        except ValueError as err:
            raise NoRecords(f"{_where(grid_dir)}: {err}") from None
        return {f"{name}.json": _json(data)}

    def plot(grid_dir: Path, texts: dict, results_dir: Path) -> None:
        from reproduce import figures_curves

        figures_curves.figure4_plot(json.loads(texts[f"{name}.json"]), results_dir / f"{name}.png")

    return Artifact(name, grid, (f"{name}.json",), build, (f"{name}.png",), plot)


def figure5_artifact(
    grid: str,
    runs: Sequence[str],
    name: Optional[str] = None,
    attack: str = "decoder",
    setting: str = "train_time",
    num_images: int = 8,
) -> Artifact:
    """Figure 5 (originals and reconstructions) of the records ``runs`` (``ARM/seedN`` in ``<grid>``) that
    exist; the data file names the missing ones."""
    name = name or f"figure5_{grid}"
    runs = tuple(runs)

    def present(grid_dir: Path) -> list[str]:
        out = []
        for r in runs:
            rd = RunDir(grid_dir / r)
            if rd.attacked(attack, setting) and rd.attack_samples_path(attack).is_file():
                out.append(r)
        return out

    def build(grid_dir: Path) -> dict:
        from reproduce import figure

        have = present(grid_dir)
        if not have:
            raise NoRecords(f"none of {', '.join(runs)} in {_where(grid_dir)} has {attack} {setting} samples")
        data = figure.figure5_data(
            [grid_dir / r for r in have], attack=attack, setting=setting, num_images=num_images, names=have
        )
        data["missing"] = [r for r in runs if r not in have]
        return {f"{name}.json": _json(data)}

    def plot(grid_dir: Path, texts: dict, results_dir: Path) -> None:
        from reproduce import figure

        data = json.loads(texts[f"{name}.json"])
        rows = data["rows"][1:]
        figure.figure5(
            [grid_dir / r["run"] for r in rows],
            results_dir / f"{name}.png",
            attack=attack,
            setting=setting,
            num_images=data["num_images"],
            labels=[r["label"] for r in rows],
        )

    return Artifact(name, grid, (f"{name}.json",), build, (f"{name}.png",), plot)


def figure3_artifact(grid: str, name: Optional[str] = None) -> Artifact:
    """Figure 3 (attacker MSE vs the entropy bound) through ``reproduce.figure3``'s hook, when that module
    exists: ``figure3_data(grid_dir) -> dict`` (None: no usable records) and ``figure3_plot(data, out)``.
    Records without a ``bound.json`` are "no records yet" before the hook is called."""
    name = name or f"figure3_{grid}"

    def module():
        if importlib.util.find_spec(FIGURE3_MODULE) is None:
            raise NoRecords(f"{FIGURE3_MODULE} (Figure 3's figure3_data / figure3_plot) is not in this checkout")
        return importlib.import_module(FIGURE3_MODULE)

    def build(grid_dir: Path) -> dict:
        mod = module()
        if not any(rd.bound_path.is_file() for rd in find_runs(grid_dir)):
            raise NoRecords(f"no record in {_where(grid_dir)} has a {RunDir.BOUND} (Figure 3's bound estimate)")
        data = mod.figure3_data(grid_dir)
        if data is None:
            raise NoRecords(f"{FIGURE3_MODULE}.figure3_data found no usable record in {_where(grid_dir)}")
        return {f"{name}.json": _json(data)}

    def plot(grid_dir: Path, texts: dict, results_dir: Path) -> None:
        module().figure3_plot(json.loads(texts[f"{name}.json"]), results_dir / f"{name}.png")

    return Artifact(name, grid, (f"{name}.json",), build, (f"{name}.png",), plot)


def preset_artifact(grid: str, others: Sequence[str] = (), name: Optional[str] = None) -> Artifact:
    """The ``cpu`` preset's comparison table (``reproduce.preset_compare``): every record in ``<grid>`` and the
    records ``others`` (``GRID/ARM/seedN`` beside it), in that order."""
    name = name or f"{grid}_compare"
    others = tuple(others)

    def build(grid_dir: Path) -> dict:
        from reproduce import preset_compare

        found = [(rd, rd.path.relative_to(grid_dir.parent).as_posix()) for rd in find_runs(grid_dir) if rd.finished]
        found += [(RunDir(grid_dir.parent / o), o) for o in others if RunDir(grid_dir.parent / o).finished]
        if not found:
            raise NoRecords(f"no finished record in {_where(grid_dir)}")
        rows = [preset_compare.preset_row(rd, label) for rd, label in found]
        return {
            f"{name}.md": preset_compare.preset_markdown(rows, "cpu preset candidates (noise sigma 0.025, lambda 0)")
        }

    return Artifact(name, grid, (f"{name}.md",), build)


def regime_artifact(grid: str, name: Optional[str] = None, title: str = "The regime experiment (cpu-full)") -> Artifact:
    """The regime experiment's table (``reproduce.regime_table``): one row per arm of the records in ``<grid>``."""
    name = name or grid

    def build(grid_dir: Path) -> dict:
        from reproduce import regime_table

        rows = regime_table.regime_rows(grid_dir)
        if not rows:
            raise NoRecords(f"no finished record in {_where(grid_dir)}")
        return {f"{name}.md": regime_table.regime_markdown(rows, title)}

    return Artifact(name, grid, (f"{name}.md",), build)


# ----------------------------------------------------------------------------- the registries

_CPU_FIGURE5_RUNS = tuple(
    f"cifar10_vgg11_bn_{defence}_lam{lam}_sigma0.025/seed125" for defence in ("noise", "noise_arl") for lam in (0, 16)
)
_SMOKE_RUNS = tuple(f"cifar10-sample_vgg11_bn_bottleneck_lam{lam}_sigma0.025/seed0" for lam in (0, 16))

REGISTRIES = {
    # What reproduce/results/ holds: the cpu grid's evidence (reproduce.grid cpu, saved with reproduce.records).
    "results": Registry(
        "results",
        (
            preset_artifact("presets", ("cpu/cifar10_vgg11_bn_noise_lam0_sigma0.025/seed125",), name="cpu_preset"),
            table_artifact(1, "cpu", "cpu", "cifar10"),
            figure3_artifact("cpu"),
            figure4_artifact("cpu"),
            figure5_artifact("cpu", _CPU_FIGURE5_RUNS),
            regime_artifact("regime"),
        ),
        raw={
            "lambda_guidance.json": "the raw output of python -m reproduce.lambda_guidance (it trains no run "
            "directory; the file is its own record)",
        },
    ),
    # The smoke grid's records (python -m reproduce.grid smoke, then reproduce.records save --grid smoke).
    "smoke": Registry(
        "smoke",
        (
            table_artifact(1, "smoke", "smoke", "cifar10-sample", attacks=("decoder",)),
            figure4_artifact("smoke"),
            figure5_artifact("smoke", _SMOKE_RUNS),
            regime_artifact("smoke", name="regime_smoke", title="The regime table of the smoke records"),
        ),
    ),
}


# ----------------------------------------------------------------------------- the check


def _canonical(name: str, text: str) -> str:
    """JSON data files compare by their data: re-dumped the way the check writes them."""
    if name.endswith(".json"):
        try:
            return _json(json.loads(text))
        except ValueError:
            return text
    return text


def _diff(name: str, old: str, new: str) -> str:
    lines = difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        fromfile=f"committed/{name}",
        tofile=f"from-records/{name}",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _check_records(records_root: Path, say) -> int:
    failures = 0
    for rd in find_runs(records_root):
        label = rd.path.relative_to(records_root).as_posix()
        problems = records.check_record(rd) if rd.is_record else [f"a run directory, not a record (no {RunDir.RECORD})"]
        for problem in problems:
            say(f"FAIL record {label}: {problem}")
            failures += 1
    return failures


def check(
    registry: Registry,
    records_root: Path = records.RECORDS_ROOT,
    results_dir: Path = RESULTS_DIR,
    *,
    write: bool = False,
    plots: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """Rebuild every artifact of ``registry`` from ``records_root`` and compare with ``results_dir``;
    returns the number of failures. ``write``: overwrite what differs (and draw its PNGs; ``plots``: every PNG)."""
    records_root, results_dir = Path(records_root), Path(results_dir)
    failures = _check_records(records_root, say)
    known = set(registry.raw)
    for art in registry.artifacts:
        outputs = art.data_files + art.images
        known.update(outputs)
        grid_dir = records_root / art.grid
        try:
            texts = art.build(grid_dir)
        except NoRecords as why:
            committed = [f for f in outputs if (results_dir / f).exists()]
            if not committed:
                say(f"ok   {art.name}: no records yet ({why})")
            elif write:
                for f in committed:
                    (results_dir / f).unlink()
                say(f"del  {art.name}: removed {', '.join(committed)} (no records: {why})")
            else:
                say(f"FAIL {art.name}: {', '.join(committed)} committed without records ({why})")
                failures += 1
            continue
        except Exception as err:  # noqa: BLE001 - one broken artifact must not hide the others
            say(f"FAIL {art.name}: rebuilding it from {_where(grid_dir)} failed: {type(err).__name__}: {err}")
            failures += 1
            continue
        if set(texts) != set(art.data_files):
            raise RuntimeError(f"{art.name} built {sorted(texts)}, not its files {sorted(art.data_files)}")
        changed = []
        for f in art.data_files:
            path, new = results_dir / f, texts[f]
            old = path.read_bytes().decode() if path.is_file() else None
            if old is not None and _canonical(f, old) == new:
                continue
            changed.append(f)
            if write:
                results_dir.mkdir(parents=True, exist_ok=True)
                path.write_bytes(new.encode())
                say(f"wrote {f}")
            elif old is None:
                say(f"FAIL {art.name}: {f} is missing (regenerate with --write)")
                failures += 1
            else:
                say(f"FAIL {art.name}: {f} differs from what its records give:\n{_diff(f, _canonical(f, old), new)}")
                failures += 1
        missing_images = [f for f in art.images if not (results_dir / f).is_file()]
        if art.images and write and (changed or missing_images or plots):
            art.plot(grid_dir, texts, results_dir)
            say(f"drew {', '.join(art.images)}")
        elif missing_images and not write:
            say(f"FAIL {art.name}: {', '.join(missing_images)} missing (draw it with --write)")
            failures += 1
        if not changed and not missing_images:
            say(f"ok   {art.name}")
    if results_dir.is_dir():
        for path in sorted(results_dir.iterdir()):
            if path.resolve() == records_root.resolve() or path.name in known:
                continue
            say(
                f"FAIL {path.name}: in {results_dir.name}/ but no artifact of the registry makes it (nor is it a raw record)"
            )
            failures += 1
    return failures


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reproduce.results_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="regenerate and overwrite what differs (PNGs too)")
    p.add_argument("--plots", action="store_true", help="with --write: redraw every PNG, not only changed ones")
    p.add_argument("--registry", choices=tuple(REGISTRIES), default="results", help="which artifacts (default results)")
    p.add_argument("--records", default=None, help="the records folder (default reproduce/results/runs)")
    p.add_argument("--results", default=None, help="the artifacts folder (default reproduce/results)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.plots and not args.write:
        p.error("--plots redraws PNGs, which only --write does")
    results_dir = Path(args.results) if args.results else RESULTS_DIR
    records_root = (
        Path(args.records) if args.records else (results_dir / "runs" if args.results else records.RECORDS_ROOT)
    )
    failures = check(REGISTRIES[args.registry], records_root, results_dir, write=args.write, plots=args.plots)
    if failures:
        print(
            f"results-check: {failures} failure(s); regenerate with `python -m reproduce.results_check --write`",
            file=sys.stderr,
        )
        return 1
    print("results-check: every artifact matches its records", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
