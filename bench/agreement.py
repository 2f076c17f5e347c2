"""Whether a backend's ``assign_stats`` is right, allowing different choices only at measured near-ties.

Two correct implementations may pick different clusters for a row whose two nearest candidates are equally
far within rounding. So the statistics are checked against float64 sums recomputed from the backend's own
assignment, and the assignment against float64 distances: every row's choice must be a nearest candidate
within ``tie_rel`` (relative to its distance), and where it differs from another assignment, the two
candidates' float64 distances must be that close (a near-tie, counted and reported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def candidate_d2(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int, class_conditional: bool):
    """float64 squared distances ``[B, cand]`` of each row to its candidate clusters, and their flat indices."""
    z64, c64 = z.double(), centroids.double()
    if class_conditional:
        cand = labels[:, None].long() * m + torch.arange(m, device=z.device)[None, :]
    else:
        cand = torch.arange(centroids.shape[0], device=z.device).expand(z.shape[0], -1)
    d2 = torch.stack([((z64 - c64[cand[:, j]]) ** 2).sum(1) for j in range(cand.shape[1])], 1)
    return d2, cand


def stats_from(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor):
    """float64 counts ``[K]`` and squared deviations ``[K, D]`` of the rows given by ``assign`` (-1: none)."""
    K, D = centroids.shape
    keep = assign >= 0
    a = torch.where(keep, assign, torch.zeros_like(assign))
    w = keep.double()
    diff = (z.double() - centroids.double()[a]) * w[:, None]
    onehot = (a[None, :] == torch.arange(K, device=z.device)[:, None]).double() * w[None, :]
    return onehot.sum(1), onehot @ (diff * diff)


@dataclass
class Agreement:
    rows: int
    not_nearest: int  # rows whose choice is farther than the nearest candidate beyond tie_rel
    differ: int  # rows assigned differently from ``other`` (0 when no other is given)
    differ_not_tied: int  # of those, rows where the two candidates are not a near-tie
    counts_exact: bool  # counts equal float64 counts of the backend's own assignment
    sqdev_rel_err: float  # max |sqdev - float64 sqdev| / max(|float64 sqdev|) over clusters

    def ok(self, sqdev_tol: float) -> bool:
        return (
            self.not_nearest == 0
            and self.differ_not_tied == 0
            and self.counts_exact
            and self.sqdev_rel_err <= sqdev_tol
        )

    def describe(self) -> str:
        counts = "exact" if self.counts_exact else "WRONG"
        return (
            f"{self.rows} rows: {self.not_nearest} not nearest, {self.differ} assigned differently "
            f"({self.differ - self.differ_not_tied} at near-ties), counts {counts}, "
            f"sqdev rel err {self.sqdev_rel_err:.1e}"
        )


def check_assign_stats(
    out, z, labels, centroids, m, class_conditional, other_assign=None, tie_rel: float = 1e-4
) -> Agreement:
    """Judge ``out = (assign, counts, sqdev)`` of a backend (see the module docstring)."""
    assign, counts, sqdev = out
    d2, cand = candidate_d2(z, labels, centroids, m, class_conditional)
    best = d2.min(1).values
    slack = tie_rel * best + 1e-12
    col = assign[:, None] == cand
    valid = col.any(1)
    chosen = torch.where(valid, (d2 * col).sum(1), torch.full_like(best, float("inf")))
    not_nearest = int((chosen > best + slack).sum())
    differ = differ_not_tied = 0
    if other_assign is not None:
        mask = other_assign != assign
        differ = int(mask.sum())
        if differ:
            ocol = other_assign[:, None] == cand
            other = torch.where(ocol.any(1), (d2 * ocol).sum(1), torch.full_like(best, float("inf")))
            differ_not_tied = int(((chosen - other).abs() > slack)[mask].sum())
    c64, s64 = stats_from(z, assign, centroids)
    counts_exact = bool(torch.equal(counts.double(), c64))
    scale = float(s64.abs().max().clamp_min(1e-30))
    err = float((sqdev.double() - s64).abs().max()) / scale
    return Agreement(z.shape[0], not_nearest, differ, differ_not_tied, counts_exact, err)
