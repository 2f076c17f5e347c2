"""k-means for all classes at once (segmented by class), with k-means++, random and warm starts.

One host synchronisation per Lloyd iteration (the convergence test, ``torch.equal``). Distances use the
matmul expansion ``|x|^2 - 2 x.mu + |mu|^2``: on the GPU one GEMM against all centroids in row chunks, on
the CPU the rows sorted by class once and one small GEMM per class, so a refit on 50,000 x 2048 features is
a few GEMMs per iteration. The per-cluster sums are deterministic on every device: ``index_add_`` on the
CPU (a serial loop there), a one-hot GEMM in row chunks elsewhere (``index_add_`` would use float atomics
on a GPU); counts are integer sums, exact in any order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

_CHUNK_ROWS = 8192


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [C, m, D]
    assign: torch.Tensor  # [N] flat cluster index c * m + j
    counts: torch.Tensor  # [C * m]
    iterations: int
    sq_dist: torch.Tensor  # [N] squared distance of each row to its centroid (GEMM expansion, >= 0)


def _row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1).square()  # much faster on the CPU than (x * x).sum(1)


def repeated_centroids(centroids: torch.Tensor, group: int) -> torch.Tensor:
    """``[K]`` bool: centroid ``k`` equals (bitwise) an earlier one of its group of ``group`` consecutive rows.

    A class with fewer rows than clusters gets repeated centroids. Every row is exactly as near to each copy,
    but the GEMM's rounding differs per output column (a few ulps, e.g. MKL's float64 GEMV on AMD CPUs), so the
    argmin would pick a copy by rounding noise. Callers skip the repeats: ties go to the lowest index.
    No host synchronisation; ``group - 1`` comparisons of ``[K / group, j, D]``.
    """
    K, D = centroids.shape
    c = centroids.reshape(K // group, group, D)
    rep = torch.zeros(K // group, group, dtype=torch.bool, device=centroids.device)
    for j in range(1, group):
        rep[:, j] = (c[:, :j] == c[:, j : j + 1]).all(2).any(1)
    return rep.reshape(K)


def _centroid_sq_norms(centroids: torch.Tensor, m: int) -> torch.Tensor:
    """``|mu|^2`` per centroid, ``inf`` for a repeat of an earlier centroid of its class (never the nearest)."""
    return (centroids * centroids).sum(1).masked_fill(repeated_centroids(centroids, m), float("inf"))


def nearest(
    x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest of the ``m`` centroids of each row's class (``centroids [C*m, D]``), one GEMM per row chunk.

    Returns the flat index and ``|mu|^2 - 2 x.mu`` at it (the squared distance less ``|x|^2``).
    """
    c_sq = _centroid_sq_norms(centroids, m)
    idx, part = [], []
    for s in range(0, x.shape[0], _CHUNK_ROWS):
        xs = x[s : s + _CHUNK_ROWS]
        d2 = c_sq[None, :] - 2.0 * (xs @ centroids.t())  # [b, K]
        cols = labels[s : s + _CHUNK_ROWS, None] * m + torch.arange(m, device=x.device)[None]
        best, j = d2.gather(1, cols).min(1, keepdim=True)
        idx.append(cols.gather(1, j).squeeze(1))
        part.append(best.squeeze(1))
    if not idx:
        return torch.zeros(0, dtype=torch.int64, device=x.device), x.new_zeros(0)
    return torch.cat(idx), torch.cat(part)


def nearest_sorted(
    x: torch.Tensor, bounds: list[int], centroids: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nearest`` for rows sorted by class (class ``c`` in rows ``bounds[c]:bounds[c+1]``): one small GEMM
    per class against its own ``m`` centroids, ``C`` times fewer flops than the one GEMM against all."""
    c_sq = _centroid_sq_norms(centroids, m)
    idx = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    part = x.new_empty(x.shape[0])
    for c in range(len(bounds) - 1):
        s, e = bounds[c], bounds[c + 1]
        if e > s:
            cent = centroids[c * m : (c + 1) * m]
            best, j = (c_sq[c * m : (c + 1) * m][None, :] - 2.0 * (x[s:e] @ cent.t())).min(1)
            idx[s:e] = j + c * m
            part[s:e] = best
    return idx, part


def _per_class_argmin(key: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """For each class the index of its row with the smallest key (``N`` where the class has no row)."""
    n = key.shape[0]
    best = torch.full((num_classes,), float("inf"), dtype=key.dtype, device=key.device)
    best = best.scatter_reduce(0, labels, key, reduce="amin")
    idx = torch.where(key == best[labels], torch.arange(n, device=key.device), torch.full_like(labels, n))
    return torch.full((num_classes,), n, dtype=torch.int64, device=key.device).scatter_reduce(
        0, labels, idx, reduce="amin"
    )


def _random_init(x, labels, num_classes, m, generator):
    """``m`` distinct random members per class (repeating members when a class has fewer than ``m``)."""
    key = torch.rand(x.shape[0], generator=generator, device=x.device if generator is None else generator.device).to(
        x.device
    )
    order = torch.argsort(key)
    order = order[torch.argsort(labels[order], stable=True)]
    counts = cluster_counts(labels, num_classes)
    start = torch.cumsum(counts, 0) - counts
    j = torch.arange(m, device=x.device)
    pick = start[:, None] + j[None] % counts.clamp_min(1)[:, None]  # [C, m]
    return x[order[pick.clamp_max(x.shape[0] - 1)]], counts


def _kmeanspp_init(x, labels, num_classes, m, generator, x_sq):
    """k-means++ (D^2 sampling) within every class at once, with an exponential race per class.

    Each row's distance to a new centre comes from one ``[N, C]`` GEMM (``|x|^2 - 2 x.c + |c|^2``); the
    chosen rows are set to exactly 0 so that rounding never lets a centre be drawn twice.
    """
    n = x.shape[0]
    dev = x.device

    def uniform():
        return (
            torch.rand(
                n, generator=generator, device=dev if generator is None else generator.device, dtype=torch.float64
            )
            .to(dev)
            .clamp_min(1e-300)
        )

    def sq_dist_to(rows):  # rows [C] -> [N]
        centres = x[rows]
        cross = (x @ centres.t()).gather(1, labels[:, None]).squeeze(1)
        d = (x_sq - 2.0 * cross + x_sq[rows][labels]).clamp_min(0)
        return d.index_fill(0, rows, 0.0)

    first = _per_class_argmin(uniform(), labels, num_classes).clamp_max(n - 1)
    chosen = [first]
    d2 = sq_dist_to(first)
    for _ in range(1, m):
        key = -torch.log(uniform()) / d2.to(torch.float64)  # Exp(1)/w: min ~ P proportional to w
        nxt = _per_class_argmin(key, labels, num_classes).clamp_max(n - 1)
        chosen.append(nxt)
        d2 = torch.minimum(d2, sq_dist_to(nxt))
    return x[torch.stack(chosen, 1)], cluster_counts(labels, num_classes)


def kmeans(
    x: torch.Tensor,
    labels: Optional[torch.Tensor],
    num_classes: int,
    m: int,
    *,
    init: str = "kmeans++",
    centroids: Optional[torch.Tensor] = None,
    max_iter: int = 50,
    generator: Optional[torch.Generator] = None,
    segmented: Optional[bool] = None,
    segment_sums: Optional[str] = None,
) -> KMeansResult:
    """Lloyd's k-means with ``m`` clusters inside each class, all classes at once.

    Args:
        x: features ``[N, D]`` (float32 or float64).
        labels: int64 ``[N]`` in ``[0, num_classes)``; ``None`` clusters all rows together
            (then ``num_classes`` groups of ``m`` are one group of ``num_classes * m``).
        init: ``"kmeans++"``, ``"random"`` (m random members per class) or ``"warm"`` (start from ``centroids``).
        centroids: ``[num_classes, m, D]`` previous centroids: the warm start, and the fallback for
            classes with no rows (otherwise those get the mean of all rows, with a warning).
        max_iter: Lloyd iterations at most; stops early when no assignment changes.
        segmented: sort the rows by class once and run one small GEMM per class (default on the CPU,
            where it saves a factor ``num_classes`` of flops); otherwise one GEMM against all centroids
            (few launches, the GPU default).
        segment_sums: how the per-cluster sums of a Lloyd step are formed: ``"index_add"`` (the CPU default,
            serial and deterministic there) or ``"matmul"`` (one-hot GEMMs in row chunks: deterministic on a
            GPU, where ``index_add_`` uses float atomics; the default off the CPU). See ``cluster_sums``.

    The only host synchronisation inside the Lloyd loop is the convergence test, once per iteration.
    """
    if init not in ("kmeans++", "random", "warm"):
        raise ValueError(f"init must be 'kmeans++', 'random' or 'warm', got {init!r}")
    if init == "warm" and centroids is None:
        raise ValueError("init='warm' needs centroids")
    C, mm = (num_classes, m) if labels is not None else (1, num_classes * m)
    lab = labels if labels is not None else torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    D = x.shape[1]
    x_sq = _row_sq_norms(x)
    prev = centroids.reshape(C, mm, D).to(x) if centroids is not None else None
    if init == "warm":
        cent, class_counts = prev.clone(), cluster_counts(lab, C)
    elif init == "random":
        cent, class_counts = _random_init(x, lab, C, mm, generator)
    else:
        cent, class_counts = _kmeanspp_init(x, lab, C, mm, generator, x_sq)
    absent = class_counts == 0
    if bool(absent.any()):
        fill = prev if prev is not None else x.mean(0).expand(C, mm, D)
        if prev is None:
            warnings.warn(
                f"cem_fast: {int(absent.sum())} class(es) have no features in this refit; "
                "their centroids are set to the mean of all features",
                RuntimeWarning,
                stacklevel=3,
            )
        cent = torch.where(absent[:, None, None], fill, cent)
    flat = cent.reshape(C * mm, D).contiguous()

    if segmented is None:
        segmented = x.device.type == "cpu" and C > 1
    if segment_sums is None:
        segment_sums = default_sum_method(x)
    elif segment_sums not in ("index_add", "matmul"):
        raise ValueError(f"segment_sums must be 'index_add' or 'matmul', got {segment_sums!r}")
    order = None
    if segmented:
        order = torch.argsort(lab, stable=True)
        bounds = [0] + torch.cumsum(class_counts, 0).tolist()
        xs, xs_sq = x[order], x_sq[order]
        find = lambda centres: nearest_sorted(xs, bounds, centres, mm)  # noqa: E731
    else:
        xs, xs_sq = x, x_sq
        find = lambda centres: nearest(xs, lab, centres, mm)  # noqa: E731
    assign, part = find(flat)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        sums, counts = cluster_sums(xs, assign, C * mm, segment_sums)
        flat = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], flat)
        new_assign, part = find(flat)
        if torch.equal(new_assign, assign):  # the iteration's one host synchronisation
            break
        assign = new_assign
    # ``part`` always belongs to ``flat`` and ``assign`` (the loop's last nearest is what it keeps).
    counts = cluster_counts(assign, C * mm).to(x.dtype)
    sq_dist = (xs_sq + part).clamp_min(0)
    if order is not None:
        assign = torch.empty_like(assign).index_copy_(0, order, assign)
        sq_dist = torch.empty_like(sq_dist).index_copy_(0, order, sq_dist)
    return KMeansResult(flat.reshape(num_classes, m, D), assign, counts, iterations, sq_dist)


def cluster_counts(assign: torch.Tensor, K: int) -> torch.Tensor:
    """int64 ``[K]`` members per cluster, without a host synchronisation (``bincount`` reads its input's
    maximum on the host); integer sums, so exact in any order."""
    return torch.zeros(K, dtype=torch.int64, device=assign.device).scatter_add_(0, assign, torch.ones_like(assign))


def default_sum_method(x: torch.Tensor) -> str:
    """How ``cluster_sums`` sums deterministically on ``x``'s device: ``index_add_`` is a serial loop on the CPU,
    float atomics elsewhere (there, one-hot GEMMs in row chunks)."""
    return "index_add" if x.device.type == "cpu" else "matmul"


def cluster_sums(
    x: torch.Tensor, assign: torch.Tensor, K: int, method: str = "matmul"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums ``[K, D]`` of the rows of ``x`` and member counts ``[K]`` (in ``x``'s dtype),
    deterministic and without a host synchronisation.

    ``"matmul"``: a one-hot ``[K, rows]`` GEMM per chunk of rows, chunks added in order (no float atomics);
    ``"index_add"``: ``index_add_`` (deterministic on the CPU only, where it is a serial loop).
    """
    counts = cluster_counts(assign, K).to(x.dtype)
    if method == "index_add":
        return torch.zeros(K, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assign, x), counts
    ids = torch.arange(K, device=x.device)[:, None]
    sums = x.new_zeros(K, x.shape[1])
    for s in range(0, x.shape[0], _CHUNK_ROWS):
        onehot = (assign[None, s : s + _CHUNK_ROWS] == ids).to(x.dtype)
        sums = sums + onehot @ x[s : s + _CHUNK_ROWS]
    return sums, counts
