"""Resumable attack state: load a per-epoch checkpoint and check it belongs to this attack."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

__all__ = ["load_resumable"]


def load_resumable(path: Path, fmt: str, protocol: dict) -> Optional[dict]:
    """Return the checkpoint at ``path`` (None if absent) after checking its format and protocol.

    A checkpoint written under other hyper-parameters or data sizes cannot be
    continued faithfully (the LR schedule and splits differ), so that is an error.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != fmt:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a {fmt} checkpoint (found {found!r})")
    if state["protocol"] != protocol:
        raise ValueError(
            f"{path} was written with a different attack protocol; delete {path.parent} "
            f"(or pass --fresh) to restart.\n saved: {state['protocol']}\n now:   {protocol}"
        )
    return state


def check_config(cfg, *, positive_ints=(), positive=(), nonnegative=()) -> None:
    """The shared checks of an attack config: each name's value must be a positive int, a positive
    number or a number >= 0; ``val_fraction`` in (0, 1) and ``num_samples`` a non-negative int always."""
    for name in positive_ints:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)!r}")
    for name in nonnegative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {cfg.val_fraction!r}")
    if not isinstance(cfg.num_samples, int) or cfg.num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative int, got {cfg.num_samples!r}")
