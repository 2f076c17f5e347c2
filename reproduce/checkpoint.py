"""Checkpoint files: atomic writes (mode 0644), loads, and re-shaping a model to a (pruned) state_dict.

``save_atomic`` writes to a temporary file in the same directory and ``os.replace``s it over
the target, so a kill mid-write leaves the previous file intact. ``write_json_atomic`` does the
same for JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]
FILE_MODE = 0o644  # run files are shared and copied: readable by others (mkstemp alone gives 0600)


def _atomic_write(path: PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` atomically (tmp file + os.replace)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def write_json_atomic(obj: Any, path: PathLike) -> None:
    """Write ``obj`` as indented JSON atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    _atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict:
    """Load a checkpoint written by ``save_atomic``; FileNotFoundError names the path.

    ``weights_only=False``: our checkpoints hold RNG states (numpy, python) as well as tensors.
    Only load files you wrote yourself.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def reshape_to_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Resize Conv/BatchNorm/Linear layers of ``module`` to the tensor shapes in ``state_dict``.

    Needed to load a channel-pruned encoder (PATROL) into a freshly built model. Only the
    channel counts change; kernel sizes, strides etc. come from the fresh module.
    Returns the names of the resized layers.
    """
    resized = []
    for name, layer in module.named_modules():
        prefix = f"{name}." if name else ""
        w = state_dict.get(prefix + "weight")
        if w is None or not hasattr(layer, "weight") or layer.weight is None:
            continue
        if tuple(w.shape) == tuple(layer.weight.shape):
            continue
        if isinstance(layer, nn.Conv2d):
            groups = layer.groups
            layer.out_channels, layer.in_channels = w.shape[0], w.shape[1] * groups
        elif isinstance(layer, nn.Linear):
            layer.out_features, layer.in_features = w.shape
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.num_features = w.shape[0]
        else:
            raise ValueError(f"cannot resize layer {name!r} of type {type(layer).__name__}")
        for pname, param in list(layer.named_parameters(recurse=False)):
            src = state_dict[prefix + pname]
            setattr(layer, pname, nn.Parameter(torch.empty_like(src, device=param.device, dtype=param.dtype)))
        for bname, buf in list(layer.named_buffers(recurse=False)):
            if buf is not None and prefix + bname in state_dict:
                src = state_dict[prefix + bname]
                layer.register_buffer(bname, torch.empty_like(src, device=buf.device, dtype=buf.dtype))
        resized.append(name)
    return resized
