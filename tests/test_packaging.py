"""Packaging: the core package needs only torch, numpy and ninja, and imports without the extras installed."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = {"torch", "numpy", "ninja"}
# Installed only by extras; no module of cem_fast may need one of them to import.
HEAVY = ("torchvision", "matplotlib", "torchmetrics", "tqdm", "PIL", "torch_pruning", "lightning", "pytorch_lightning")
# A cem_fast module that needs an extra at import time (say, a callback class deriving from a Lightning one)
# is listed here with that extra's top-level module; every other module must import with the extras absent.
NEEDS_EXTRA = {"cem_fast.integrations.lightning": "lightning"}


def _pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(requirement: str) -> str:
    for sep in "<>=!~;[ ":
        requirement = requirement.split(sep)[0]
    return requirement.lower()


def test_core_dependencies_are_torch_numpy_ninja():
    project = _pyproject()["project"]
    assert {_name(r) for r in project["dependencies"]} == CORE
    extras = project["optional-dependencies"]
    assert {"triton", "reproduce", "audit", "lightning", "test"} <= set(extras)
    assert {"torchvision", "matplotlib", "torchmetrics", "torch-pruning", "pillow", "tqdm"} <= {
        _name(r) for r in extras["reproduce"]
    }


def test_version_is_written_once():
    config = _pyproject()
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cem_fast.__version__"}
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        assert "version" not in f.read()


def test_cem_fast_imports_without_the_extras():
    """Every cem_fast module imports, and the loss runs, with the extras' modules made unimportable."""
    script = textwrap.dedent(f"""
        import importlib, importlib.abc, pkgutil, sys

        HEAVY = {HEAVY!r}
        NEEDS_EXTRA = {NEEDS_EXTRA!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HEAVY:
                    raise ImportError(f"{{name}} is blocked: not a core dependency")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import cem_fast

        failed = []
        for info in pkgutil.walk_packages(cem_fast.__path__, "cem_fast."):
            try:
                importlib.import_module(info.name)
            except ImportError as exc:
                if info.name not in NEEDS_EXTRA:
                    failed.append((info.name, str(exc)))
        assert not failed, failed
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
        assert not loaded, loaded

        g = torch.Generator().manual_seed(0)
        z = torch.rand(64, 8, generator=g, requires_grad=True)
        y = torch.randint(0, 4, (64,), generator=g)
        cem = cem_fast.CEMLoss(num_classes=4, backend="torch").refit(z.detach(), y)
        cem(z, y).backward()
        assert torch.isfinite(z.grad).all()
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
