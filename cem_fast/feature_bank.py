"""A bounded per-class reservoir of one epoch's features, for the end-of-epoch refit of ``CEMLoss``."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import checks


class FeatureBank:
    """Keeps at most ``per_class`` feature rows of each class, a uniform sample of what it was shown.

    ``add(z, labels)`` each step (detached copies; rows in any float dtype are kept as they come), then
    ``features()`` gives ``(x [n, D], y [n])`` in arrival order. While no class is over its quota every
    row is kept, so the refit sees exactly the concatenated epoch. Past the quota a class keeps a uniform
    random sample of its rows (reservoir sampling, seeded). ``seen`` counts every row offered since the
    last ``clear()``: the epoch size, which sets the paper variant's streaming rate.
    Memory: at most ``num_classes * per_class * D`` elements of the features' dtype (``nbytes``).
    ``add`` reads the labels on the host: one device synchronisation per call for GPU tensors.
    """

    def __init__(self, num_classes: int, per_class: int = 5000, seed: int = 0):
        self.num_classes = checks.positive_int("num_classes", num_classes)
        self.per_class = checks.positive_int("per_class", per_class)
        self._rng = np.random.default_rng(int(seed))
        self.clear()

    def clear(self) -> None:
        """Forget every row (call at the start of an epoch; ``CEMLoss.end_epoch`` does)."""
        self._rows: list[Optional[torch.Tensor]] = [None] * self.num_classes  # [capacity, D] per class
        self._stamp: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in range(self.num_classes)]
        self._seen_class = np.zeros(self.num_classes, dtype=np.int64)
        self._dim: Optional[int] = None
        self.seen = 0

    def __len__(self) -> int:
        return int(np.minimum(self._seen_class, self.per_class).sum())

    @property
    def nbytes(self) -> int:
        return sum(0 if r is None else r.numel() * r.element_size() for r in self._rows)

    @torch.no_grad()
    def add(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """Offer the rows ``z [B, ...]`` with class ``labels [B]``."""
        x = checks.features("z", z).detach()
        B = x.shape[0]
        y = checks.labels("labels", labels, B, self.num_classes, x.device, validate=True)
        if self._dim is None:
            self._dim = x.shape[1]
        elif x.shape[1] != self._dim:
            raise ValueError(f"z has {x.shape[1]} features per sample but the bank holds {self._dim}")
        if B == 0:
            return
        y_host = y.cpu().numpy()
        for c in np.unique(y_host):
            rows = np.flatnonzero(y_host == c)
            self._add_class(int(c), x[torch.from_numpy(rows).to(x.device)], self.seen + rows)
        self.seen += B

    def _add_class(self, c: int, x: torch.Tensor, stamps: np.ndarray) -> None:
        start = int(self._seen_class[c])
        self._seen_class[c] += x.shape[0]
        index = start + np.arange(x.shape[0])  # each row's position in its class's stream
        kept = min(start, self.per_class)
        fresh = index < self.per_class  # slots still empty: keep the row
        if fresh.any():
            n_new = int(fresh.sum())
            self._reserve(c, kept + n_new, x)
            self._rows[c][kept : kept + n_new] = x[:n_new]
            self._stamp[c] = np.concatenate([self._stamp[c], stamps[:n_new]])
        # Algorithm R: the row with stream position i replaces a uniform slot j <= i when j < per_class.
        for i in np.flatnonzero(~fresh):
            j = int(self._rng.integers(0, index[i] + 1))
            if j < self.per_class:
                self._rows[c][j] = x[i]
                self._stamp[c][j] = stamps[i]

    def _reserve(self, c: int, n: int, like: torch.Tensor) -> None:
        rows = self._rows[c]
        if rows is not None and rows.shape[0] >= n:
            return
        cap = min(self.per_class, max(n, 2 * (0 if rows is None else rows.shape[0]), 64))
        grown = like.new_empty((cap, like.shape[1]))
        if rows is not None:
            grown[: rows.shape[0]] = rows
        self._rows[c] = grown

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [n, D], y [n])``: the kept rows in the order they arrived."""
        parts = [(c, r[: len(s)]) for c, (r, s) in enumerate(zip(self._rows, self._stamp)) if r is not None]
        if not parts:
            raise ValueError("the feature bank is empty: add(z, labels) at least one batch first")
        x = torch.cat([r for _, r in parts])
        y = torch.cat([torch.full((r.shape[0],), c, dtype=torch.int64, device=r.device) for c, r in parts])
        order = torch.from_numpy(np.argsort(np.concatenate([self._stamp[c] for c, _ in parts]), kind="stable"))
        order = order.to(x.device)
        return x[order], y[order]
