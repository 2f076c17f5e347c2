"""Data-parallel CEM: one packed all-reduce of the per-cluster statistics per step (like SyncBatchNorm)."""

from __future__ import annotations

import torch


def world_size(process_group) -> int:
    if process_group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(process_group)


def all_reduce_sum(counts: torch.Tensor, stat: torch.Tensor, process_group):
    """Sum ``counts [K]`` and ``stat [K, ...]`` over the ranks of ``process_group`` in one collective."""
    import torch.distributed as dist

    K = counts.shape[0]
    packed = torch.cat([counts[:, None], stat.reshape(K, -1)], dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
    return packed[:, 0].contiguous(), packed[:, 1:].reshape(stat.shape)


def all_gather_rows(x: torch.Tensor, process_group) -> torch.Tensor:
    """Concatenate ``x [n_r, ...]`` from all ranks (ranks may hold different ``n_r``, including 0)."""
    import torch.distributed as dist

    if process_group is None:
        return x
    ws = dist.get_world_size(process_group)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n, group=process_group)
    sizes = [int(s.item()) for s in sizes]
    top = max(sizes)
    padded = x.new_zeros((top,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    chunks = [torch.zeros_like(padded) for _ in range(ws)]
    dist.all_gather(chunks, padded.contiguous(), group=process_group)
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)], dim=0)
