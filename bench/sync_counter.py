"""Count host synchronisations: on a GPU with ``torch.cuda.set_sync_debug_mode``, on the CPU by the ops that
would synchronise on a GPU.

On the CPU nothing synchronises, so ``SyncCounter`` counts the operations that would: every ``aten`` op
that reads a device value on the host (``item``, ``bool``, ``int``, ``float`` all become
``_local_scalar_dense``; ``torch.equal``; ``bincount``, ``nonzero``, ``unique``, ``masked_select`` and boolean
indexing size their output from the data) and ``Tensor.tolist``. It cannot see a sync hidden inside an ATen
kernel (``torch.cholesky_inverse`` checking its status on the host): only the GPU count can.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = (
    "aten._local_scalar_dense",
    "aten.equal",
    "aten.bincount",
    "aten.nonzero",
    "aten.unique",
    "aten._unique",
    "aten.masked_select",
    "aten.repeat_interleave.Tensor",
)


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class SyncCounter(TorchDispatchMode):
    """Records, in ``seen``, each op inside its ``with`` block that reads a device value on the host."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNCING_OPS) or (name.startswith("aten.index.Tensor") and _bool_index(args)):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.seen.append("Tensor.tolist")
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


@contextlib.contextmanager
def host_syncs(device):
    """A list that fills with one entry per host synchronisation inside the block: CUDA's sync debug
    warnings on a CUDA device, ``SyncCounter``'s ops elsewhere."""
    if torch.device(device).type != "cuda":
        with SyncCounter() as counter:
            yield counter.seen
        return
    seen = []
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")
    seen += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
