"""Backend choice for the two hot operations (assignment + statistics, and the backward gather).

Backends: ``reference`` (float64 loops, for tests only, see ``cem_fast.reference``), ``torch``
(vectorised PyTorch, any device), ``cpp`` (C++/OpenMP, CPU tensors), ``cuda`` (CUDA C++, CUDA tensors),
``triton`` (Triton, CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``). ``"auto"`` picks the
fastest available for the tensor's device; the environment variable ``CEM_FAST_BACKEND`` forces one.
A backend that fails to build or load warns once and falls back to ``torch``.
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache

import torch

BACKENDS = ("torch", "cpp", "cuda", "triton")
_MODULES = {name: f"cem_fast.backends.{name}_backend" for name in BACKENDS}
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}
ENV_VAR = "CEM_FAST_BACKEND"


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    return name


@lru_cache(maxsize=None)
def _module_if_available(name: str, device_type: str):
    try:
        module = importlib.import_module(_MODULES[name])
        ok = module.is_available(device_type)
    except Exception as exc:  # a build failure, a missing compiler, no triton...
        warnings.warn(f"cem_fast: backend {name!r} is unavailable ({type(exc).__name__}: {exc}); "
                      f"falling back to 'torch'", RuntimeWarning, stacklevel=3)
        return None
    return module if ok else None


def resolve(name: str, device: torch.device) -> str:
    """The backend that will run for ``name`` (``'auto'`` or a backend) on ``device``."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (name, os.environ.get(ENV_VAR) or None, device_type)
    if key not in _RESOLVED:  # a plain dict, not lru_cache: torch.compile traces this on every loss evaluation
        _RESOLVED[key] = _resolve(*key)
    return _RESOLVED[key]


_RESOLVED: dict = {}


def _resolve(name: str, forced, device_type: str) -> str:
    name = _check_name(name)
    if forced:
        name = _check_name(forced)
    candidates = _AUTO_ORDER.get(device_type, ("torch",)) if name == "auto" else (name,)
    for cand in candidates:
        if cand == "torch" or _module_if_available(cand, device_type) is not None:
            return cand
    if name != "auto":
        warnings.warn(f"cem_fast: backend {name!r} cannot run on {device_type} tensors; using 'torch'",
                      RuntimeWarning, stacklevel=2)
    return "torch"


def get(name: str):
    """The module of a resolved backend name."""
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


_LOADED: dict = {}
