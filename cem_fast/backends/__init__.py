"""The one place where the backend is chosen, and the contract every backend module implements.

Backends: ``torch`` (vectorised PyTorch, any device), ``cpp`` (C++/OpenMP, CPU tensors), ``cuda`` (CUDA C++,
CUDA tensors), ``triton`` (Triton, CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``); ``reference``
(float64 loops, ``cem_fast.reference``) is for tests only. ``resolve(name, device)`` makes the choice:
``"auto"`` picks the fastest available for the device's type, the environment variable ``CEM_FAST_BACKEND``
forces one, and a backend that fails to build or load, or cannot run on the device, warns once and falls
back to ``torch``. ``get(resolved_name)`` is its module.

Contract (``torch_backend`` is the vectorised reference; shapes there):

* ``is_available(device_type: str) -> bool``
* ``assign_stats(z, labels, centroids, m, class_conditional) -> (assign, counts, sqdev)``
* ``scatter_grad(z, assign, centroids, coef, grad_out=None, factor=1.0) -> dz``:
  ``dz = factor * grad_out * coef[a] * (z - mu[a])``, ``coef`` ``[K, 1]`` or ``[K, D]`` (broadcast by the
  backend), ``grad_out`` an optional 0-dim tensor (the incoming gradient)
* ``cluster_second_moments(z, assign, centroids) -> [K, D, D]`` and
  ``matrix_grad(z, assign, centroids, coef, scale=1.0) -> dz`` (``coef [K, D, D]``): full covariance

Optional, used by ``ops`` when present:

* ``forward_diag(z, labels, centroids, pi, variance, args, update_state=False) -> (loss, coef, new_pi,
  new_variance, assign)`` and ``variant_math(counts, sqdev, pi, variance, args) -> (loss, coef, new_pi,
  new_variance)`` for the variant codes in ``FUSED_VARIANT_CODES``, diagonal covariance; ``args`` is a
  ``KernelArgs`` (``contract.py``, built by ``Variant.kernel_args``). With ``update_state=True`` a backend may
  write the new state into ``pi``/``variance`` and return those same tensors.
* ``factored_matrix_grad(z, assign, centroids, chol, factor) -> dz``: the full-covariance gradient from the
  Cholesky factors (``full_covariance.segmented_full_grad``) without forming ``coef``.
* ``load_error(device_type) -> Optional[str]``: why ``is_available`` is False although the backend applies
  to the device (a failed build), for the one warning.
* ``CHECKS_LABELS = True``: ``assign_stats`` raises ``ValueError`` for a label outside ``[0, K / m)``, so the
  caller need not check the range first.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

from .contract import KernelArgs

__all__ = ["BACKENDS", "ENV_VAR", "KernelArgs", "check_name", "resolve", "get"]

BACKENDS = ("torch", "cpp", "cuda", "triton")
_MODULES = {name: f"cem_fast.backends.{name}_backend" for name in BACKENDS}
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}
ENV_VAR = "CEM_FAST_BACKEND"


def check_name(name) -> str:
    """``name`` if it is ``'auto'`` or a backend (TypeError/ValueError naming ``backend`` otherwise)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    return name


def resolve(name: str, device) -> str:
    """The backend that runs for ``name`` (``'auto'`` or a backend) on ``device`` (a device or its type)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (name, os.environ.get(ENV_VAR) or None, device_type)
    if key not in _RESOLVED:  # a plain dict, not lru_cache: torch.compile traces this on every loss evaluation
        _RESOLVED[key] = _resolve(*key)
    return _RESOLVED[key]


_RESOLVED: dict = {}


def _resolve(name: str, forced: Optional[str], device_type: str) -> str:
    name = check_name(forced) if forced else check_name(name)
    candidates = _AUTO_ORDER.get(device_type, ("torch",)) if name == "auto" else (name,)
    for cand in candidates:
        if cand == "torch" or _available(cand, device_type):
            return cand
    if name != "auto" and _PROBED[(name, device_type)][1] is None:  # a load failure has warned already
        warnings.warn(
            f"cem_fast: backend {name!r} cannot run on {device_type} tensors; using 'torch'",
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"


_PROBED: dict = {}  # (name, device type) -> (runs there, the build or load failure or None)


def _available(name: str, device_type: str) -> bool:
    """Whether backend ``name`` runs on ``device_type``; a build or load failure warns, once."""
    key = (name, device_type)
    if key not in _PROBED:
        ok, error = False, None
        try:
            module = get(name)
            ok = bool(module.is_available(device_type))
            if not ok and hasattr(module, "load_error"):
                error = module.load_error(device_type)
        except Exception as exc:  # a missing compiler, a compile error, no triton...
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            warnings.warn(
                f"cem_fast: backend {name!r} is unavailable ({error}); falling back to 'torch'",
                RuntimeWarning,
                stacklevel=4,
            )
        _PROBED[key] = (ok, error)
    return _PROBED[key][0]


def get(name: str):
    """The module of a backend name (as ``resolve`` returns it)."""
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


_LOADED: dict = {}
