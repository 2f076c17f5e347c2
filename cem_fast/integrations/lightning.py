"""``CEMRefit``: a Lightning callback that refits a ``CEMLoss`` from its feature bank at each epoch end.

Needs ``lightning`` (``pip install cem_fast[lightning]``). The module's ``training_step`` calls the loss as
usual (``loss = ce + lam * self.cem(z, y)``); the loss, built with ``feature_bank=...``, keeps the features
it sees, and this callback calls ``cem.end_epoch()`` once the epoch's last step is done.
"""

from __future__ import annotations

from typing import Optional

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    from pytorch_lightning import Callback

from ..loss import CEMLoss


class CEMRefit(Callback):
    """Refit ``cem`` (or the module's attribute ``attr``) at each training epoch end and log its SNR."""

    def __init__(self, cem: Optional[CEMLoss] = None, attr: str = "cem", log: bool = True):
        super().__init__()
        if cem is not None and not isinstance(cem, CEMLoss):
            raise TypeError(f"cem must be a CEMLoss or None, got {type(cem).__name__}")
        self.cem, self.attr, self.log = cem, attr, log

    def _loss(self, pl_module) -> CEMLoss:
        cem = self.cem if self.cem is not None else getattr(pl_module, self.attr, None)
        if not isinstance(cem, CEMLoss):
            raise TypeError(f"CEMRefit found no CEMLoss at module.{self.attr}; pass cem=... explicitly")
        return cem

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        cem = self._loss(pl_module)
        cem.end_epoch()
        if self.log and cem.last_snr is not None:
            pl_module.log("cem_snr", cem.last_snr, on_epoch=True, rank_zero_only=True)
