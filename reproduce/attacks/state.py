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
