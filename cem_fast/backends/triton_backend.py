"""Triton backend: nearest-centroid assignment, per-cluster statistics and the backward gather.

Same contract as ``torch_backend`` (the vectorised reference):

* ``assign_stats(z, labels, centroids, m, class_conditional, use_atomics=False) -> (assign, counts, sqdev)``
* ``scatter_grad(z, assign, centroids, coef) -> dz``
* ``is_available(device=None) -> bool``

plus the full-covariance pair ``cluster_second_moments`` / ``matrix_grad`` / ``second_moments_grad``.

Design (no host synchronisation anywhere, no float atomics unless ``use_atomics=True``):

1. ``_assign_kernel``: one program per ``BLOCK_B`` rows. Candidates (the ``m`` clusters of the row's
   class, or all ``K``) are scored ``BLOCK_K`` at a time on a ``[BLOCK_B, BLOCK_K, BLOCK_D]`` tile, so
   each ``z`` tile is read once per candidate block; the squared differences are summed in the
   accumulation dtype in a fixed order, the running minimum keeps the lowest index on ties.
2. Statistics, deterministic: a stable sort of ``assign`` groups the rows by cluster and
   ``searchsorted`` gives each cluster's segment bounds (both device-side, fixed shapes); then
   ``_segment_sqdev_kernel`` runs one program per (cluster, D block) that walks its segment in a
   fixed order. Rows are re-read from ``z`` (cheaper than writing and re-reading a ``[B, D]``
   buffer of per-row squared deviations).
   ``use_atomics=True``: the assignment kernel adds the squared deviations straight into
   ``sqdev``/``counts`` with ``atomic_add`` (one pass, not bitwise reproducible).
3. ``_scatter_grad_kernel``: one program per (row block, D block), elementwise.

Rows whose label is outside ``[0, K/m)`` (class-conditional only) cannot be rejected without a host
sync; they get ``assign = -1``, count in no cluster and receive a zero gradient. Callers validate labels.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int32, torch.int64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# =========================================================================== kernels

if triton is not None:
    # Reductions go through ``tl.reduce`` with Triton's own combine functions (exactly what ``tl.sum``
    # and ``tl.min(..., return_indices=True)`` lower to) instead of calling ``tl.sum``/``tl.min``:
    # those wrappers are themselves @jit functions, fixed to compiled mode when triton is imported
    # without TRITON_INTERPRET, which would make an interpreted copy of these kernels unusable in a
    # process that has already imported triton (e.g. a test suite that also runs GPU tests).
    _sum_combine = tl.standard._sum_combine
    _argmin_combine = tl.standard._argmin_combine_tie_break_left    # ties -> lowest index

    @triton.jit
    def _assign_kernel(z_ptr, labels_ptr, cent_ptr, assign_ptr, sqdev_ptr, counts_ptr,
                       B, D, K, M, num_classes,
                       stride_zb, stride_zd, stride_cb, stride_cd,
                       CLASS_COND: tl.constexpr, ATOMIC_STATS: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        acc_dtype = cent_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zb
        if CLASS_COND:
            lab = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            valid = row_ok & (lab >= 0) & (lab < num_classes)
            base = tl.where(valid, lab * M, 0)
            n_cand = M
        else:
            valid = row_ok
            base = tl.full([BLOCK_B], 0, tl.int64)
            n_cand = K

        best_d = tl.full([BLOCK_B], float("inf"), acc_dtype)
        best_j = tl.full([BLOCK_B], 0, tl.int64)
        for k0 in range(0, n_cand, BLOCK_K):
            j = k0 + tl.arange(0, BLOCK_K)
            j_ok = j < n_cand
            dist = tl.full([BLOCK_B, BLOCK_K], 0, acc_dtype)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = d < D
                zt = tl.load(z_rows + d[None, :] * stride_zd, mask=row_ok[:, None] & d_ok[None, :],
                             other=0.0).to(acc_dtype)
                if CLASS_COND:
                    # each row has its own m candidates: a gather from the (L2-resident) centroids
                    cidx = base[:, None] + j[None, :]
                    c_ok = valid[:, None] & j_ok[None, :]
                    mu = tl.load(cent_ptr + cidx[:, :, None] * stride_cb + d[None, None, :] * stride_cd,
                                 mask=c_ok[:, :, None] & d_ok[None, None, :], other=0.0)
                else:
                    # the same candidates for every row: load the tile once, broadcast over rows
                    mu = tl.load(cent_ptr + j.to(tl.int64)[:, None] * stride_cb + d[None, :] * stride_cd,
                                 mask=j_ok[:, None] & d_ok[None, :], other=0.0)[None, :, :]
                diff = zt[:, None, :] - mu
                dist += tl.reduce(diff * diff, 2, _sum_combine)
            dist = tl.where(j_ok[None, :], dist, float("inf"))
            jj = tl.broadcast_to(tl.arange(0, BLOCK_K)[None, :], (BLOCK_B, BLOCK_K))
            blk_d, blk_j = tl.reduce((dist, jj), 1, _argmin_combine)
            better = blk_d < best_d          # strict: an earlier (lower-index) block wins ties
            best_d = tl.where(better, blk_d, best_d)
            best_j = tl.where(better, k0 + blk_j.to(tl.int64), best_j)

        a = base + best_j
        tl.store(assign_ptr + rows, tl.where(valid, a, -1), mask=row_ok)

        if ATOMIC_STATS:
            a_safe = tl.where(valid, a, 0)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                msk = valid[:, None] & (d < D)[None, :]
                zt = tl.load(z_rows + d[None, :] * stride_zd, mask=msk, other=0.0).to(acc_dtype)
                mu = tl.load(cent_ptr + a_safe[:, None] * stride_cb + d[None, :] * stride_cd, mask=msk, other=0.0)
                diff = zt - mu
                tl.atomic_add(sqdev_ptr + a_safe[:, None] * D + d[None, :], diff * diff, mask=msk)
            tl.atomic_add(counts_ptr + a_safe, tl.full([BLOCK_B], 1.0, acc_dtype), mask=valid)

    @triton.jit
    def _segment_sqdev_kernel(z_ptr, cent_ptr, perm_ptr, starts_ptr, sqdev_ptr, counts_ptr,
                              D, stride_zb, stride_zd, stride_cb, stride_cd,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        acc_dtype = cent_ptr.dtype.element_ty
        k = tl.program_id(0)
        pd = tl.program_id(1)
        start = tl.load(starts_ptr + k)
        end = tl.load(starts_ptr + k + 1)
        d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        mu = tl.load(cent_ptr + k.to(tl.int64) * stride_cb + d * stride_cd, mask=d_ok, other=0.0)
        acc = tl.full([BLOCK_R, BLOCK_D], 0, acc_dtype)
        for r0 in range(start, end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_ok = r < end
            row = tl.load(perm_ptr + r, mask=r_ok, other=0)
            msk = r_ok[:, None] & d_ok[None, :]
            zt = tl.load(z_ptr + row[:, None] * stride_zb + d[None, :] * stride_zd, mask=msk, other=0.0)
            diff = tl.where(msk, zt.to(acc_dtype) - mu[None, :], 0.0)
            acc += diff * diff
        tl.store(sqdev_ptr + k.to(tl.int64) * D + d, tl.reduce(acc, 0, _sum_combine), mask=d_ok)
        if pd == 0:
            tl.store(counts_ptr + k, (end - start).to(acc_dtype))

    @triton.jit
    def _scatter_grad_kernel(z_ptr, assign_ptr, cent_ptr, coef_ptr, dz_ptr,
                             B, D, K,
                             stride_zb, stride_zd, stride_cb, stride_cd, stride_kb, stride_kd,
                             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        acc_dtype = cent_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < B
        d_ok = d < D
        a = tl.load(assign_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        a_ok = (a >= 0) & (a < K)
        a = tl.where(a_ok, a, 0)
        msk = (row_ok & a_ok)[:, None] & d_ok[None, :]
        zt = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_zb + d[None, :] * stride_zd, mask=msk, other=0.0)
        mu = tl.load(cent_ptr + a[:, None] * stride_cb + d[None, :] * stride_cd, mask=msk, other=0.0)
        c = tl.load(coef_ptr + a[:, None] * stride_kb + d[None, :] * stride_kd, mask=msk, other=0.0)
        g = c * (zt.to(acc_dtype) - mu)
        tl.store(dz_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], g.to(dz_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _second_moments_kernel(z_ptr, cent_ptr, perm_ptr, starts_ptr, out_ptr,
                               D, stride_zb, stride_zd, stride_cb, stride_cd,
                               BLOCK_R: tl.constexpr, BLOCK_DD: tl.constexpr, USE_DOT: tl.constexpr):
        # program (k, bi, bj) with bi <= bj computes the block sum_r x_r[di] x_r[dj]^T of cluster k
        # and mirrors it: only the upper block triangle is computed.
        acc_dtype = cent_ptr.dtype.element_ty
        k = tl.program_id(0)
        bi = tl.program_id(1)
        bj = tl.program_id(2)
        if bi <= bj:
            start = tl.load(starts_ptr + k)
            end = tl.load(starts_ptr + k + 1)
            di = bi * BLOCK_DD + tl.arange(0, BLOCK_DD)
            dj = bj * BLOCK_DD + tl.arange(0, BLOCK_DD)
            ci = tl.load(cent_ptr + k.to(tl.int64) * stride_cb + di * stride_cd, mask=di < D, other=0.0)
            cj = tl.load(cent_ptr + k.to(tl.int64) * stride_cb + dj * stride_cd, mask=dj < D, other=0.0)
            acc = tl.full([BLOCK_DD, BLOCK_DD], 0, acc_dtype)
            for r0 in range(start, end, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < end
                row = tl.load(perm_ptr + r, mask=r_ok, other=0)
                mi = r_ok[:, None] & (di < D)[None, :]
                mj = r_ok[:, None] & (dj < D)[None, :]
                xi = tl.load(z_ptr + row[:, None] * stride_zb + di[None, :] * stride_zd, mask=mi, other=0.0)
                xj = tl.load(z_ptr + row[:, None] * stride_zb + dj[None, :] * stride_zd, mask=mj, other=0.0)
                xi = tl.where(mi, xi.to(acc_dtype) - ci[None, :], 0.0)
                xj = tl.where(mj, xj.to(acc_dtype) - cj[None, :], 0.0)
                if USE_DOT:
                    acc += tl.dot(tl.trans(xi), xj, input_precision="ieee")
                else:
                    acc += tl.reduce(xi[:, :, None] * xj[:, None, :], 0, _sum_combine)
            if bi == bj:
                acc = 0.5 * (acc + tl.trans(acc))   # exactly symmetric diagonal blocks
            base = out_ptr + k.to(tl.int64) * D * D
            tl.store(base + di[:, None] * D + dj[None, :], acc, mask=(di < D)[:, None] & (dj < D)[None, :])
            if bi < bj:
                tl.store(base + dj[:, None] * D + di[None, :], tl.trans(acc),
                         mask=(dj < D)[:, None] & (di < D)[None, :])

    @triton.jit
    def _matrix_grad_kernel(z_ptr, cent_ptr, coef_ptr, perm_ptr, starts_ptr, dz_ptr, scale_ptr,
                            D, stride_zb, stride_zd, stride_cb, stride_cd,
                            BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr,
                            USE_DOT: tl.constexpr):
        # program (k, n-block): for the rows of cluster k, dz[:, n] = scale * X @ coef[k][n, :]^T
        # (a grouped GEMM over the cluster-sorted rows; X = z - mu[k]).
        acc_dtype = cent_ptr.dtype.element_ty
        k = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < D
        start = tl.load(starts_ptr + k)
        end = tl.load(starts_ptr + k + 1)
        g_base = coef_ptr + k.to(tl.int64) * D * D
        scale = tl.load(scale_ptr)   # a Python float argument is passed as fp32
        for r0 in range(start, end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_ok = r < end
            row = tl.load(perm_ptr + r, mask=r_ok, other=0)
            acc = tl.full([BLOCK_R, BLOCK_N], 0, acc_dtype)
            for d0 in range(0, D, BLOCK_KD):
                dk = d0 + tl.arange(0, BLOCK_KD)
                dk_ok = dk < D
                mx = r_ok[:, None] & dk_ok[None, :]
                x = tl.load(z_ptr + row[:, None] * stride_zb + dk[None, :] * stride_zd, mask=mx, other=0.0)
                mu = tl.load(cent_ptr + k.to(tl.int64) * stride_cb + dk * stride_cd, mask=dk_ok, other=0.0)
                x = tl.where(mx, x.to(acc_dtype) - mu[None, :], 0.0)
                # gT[dk, n] = coef[k, n, dk]
                gT = tl.load(g_base + n[None, :] * D + dk[:, None], mask=dk_ok[:, None] & n_ok[None, :], other=0.0)
                if USE_DOT:
                    acc += tl.dot(x, gT, input_precision="ieee")
                else:
                    acc += tl.reduce(x[:, :, None] * gT[None, :, :], 1, _sum_combine)
            acc = acc * scale
            tl.store(dz_ptr + row[:, None] * D + n[None, :], acc.to(dz_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & n_ok[None, :])


# =========================================================================== availability


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernels_interpreted() -> bool:
    """Whether the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_assign_kernel, InterpretedFunction)


def is_available(device_type=None) -> bool:
    """Triton is importable and can run on ``device_type`` (CUDA, or any device under ``TRITON_INTERPRET=1``).

    ``device_type`` is a device, a device-type string or ``None`` (= "is there a CUDA device").
    """
    if triton is None:
        return False
    if _interpret_requested() and kernels_interpreted():
        return True
    if kernels_interpreted():   # built for the interpreter, which has since been switched off
        return False
    if device_type is not None and torch.device(device_type).type != "cuda":
        return False
    return torch.cuda.is_available()


# =========================================================================== argument checks


def _check_tensor(name: str, t, ndim: int):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_device(name: str, t: torch.Tensor, device: torch.device):
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but z is on {device}")


def _check_z(z) -> None:
    _check_tensor("z", z, 2)
    if z.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"z must be float16/bfloat16/float32/float64, got {z.dtype}")
    if z.shape[1] < 1:
        raise ValueError("z must have at least one feature column (D >= 1)")
    if triton is None:
        raise RuntimeError("the Triton backend needs the 'triton' package")
    if z.device.type != "cuda" and not (_interpret_requested() and kernels_interpreted()):
        raise ValueError(f"z must be a CUDA tensor for the Triton backend (got {z.device}); "
                         f"CPU tensors need TRITON_INTERPRET=1 set before triton is imported")


def _check_centroids(centroids, z: torch.Tensor) -> None:
    _check_tensor("centroids", centroids, 2)
    _check_device("centroids", centroids, z.device)
    acc = accumulation_dtype(z.dtype)
    if centroids.dtype != acc:
        raise TypeError(f"centroids must be {acc} for z of dtype {z.dtype}, got {centroids.dtype}")
    if centroids.shape[1] != z.shape[1]:
        raise ValueError(f"centroids has D={centroids.shape[1]} but z has D={z.shape[1]}")
    if centroids.shape[0] < 1:
        raise ValueError("centroids must hold at least one cluster")


def _check_assign(assign, z: torch.Tensor) -> None:
    _check_tensor("assign", assign, 1)
    _check_device("assign", assign, z.device)
    if assign.dtype != torch.int64:
        raise TypeError(f"assign must be int64, got {assign.dtype}")
    if assign.shape[0] != z.shape[0]:
        raise ValueError(f"assign has {assign.shape[0]} entries but z has {z.shape[0]} rows")


def _segments(assign: torch.Tensor, K: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by cluster (stable) and the ``K + 1`` segment bounds; device-side, fixed shapes."""
    keys, perm = torch.sort(assign, stable=True)
    bounds = torch.arange(K + 1, device=assign.device, dtype=keys.dtype)
    starts = torch.searchsorted(keys, bounds)   # rows with assign = -1 sort first and fall outside
    return perm, starts


# =========================================================================== launchers


def _on_z_device(fn):
    """Triton launches on the *current* CUDA device and its current stream, not on the tensors' device."""
    @functools.wraps(fn)
    def launcher(z, *args, **kwargs):
        if isinstance(z, torch.Tensor) and z.device.type == "cuda":
            with torch.cuda.device(z.device):
                return fn(z, *args, **kwargs)
        return fn(z, *args, **kwargs)
    return launcher


def _assign_blocks(cand: int, D: int, class_conditional: bool, acc: torch.dtype):
    block_k = min(_next_pow2(cand), 16)
    block_b = 16 if (block_k <= 2 or not class_conditional) else 8
    budget = 4096 if acc == torch.float32 else 2048      # elements of the [B, K, D] tile (registers)
    if class_conditional and block_k < 16:
        budget //= 2      # the per-row gather also holds a 64-bit address per element (ptxas -v: no spills)
    block_d = max(16, min(128 if acc == torch.float32 else 64, budget // (block_b * block_k)))
    return block_b, block_k, min(block_d, max(16, _next_pow2(D)))


@_on_z_device
def assign_stats(z: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, m: int,
                 class_conditional: bool, use_atomics: bool = False):
    """Nearest centroid per row and the per-cluster counts and squared deviations.

    Returns ``assign [B]`` int64 (cluster ``c * m + j``; ties to the lowest index), ``counts [K]``
    and ``sqdev [K, D]`` (sum over members of ``(z - mu)^2``) in the accumulation dtype.
    ``use_atomics=True`` accumulates with ``atomic_add`` in one pass (faster, not bitwise reproducible).
    """
    _check_z(z)
    _check_centroids(centroids, z)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive int, got {m!r}")
    if not isinstance(class_conditional, bool):
        raise TypeError(f"class_conditional must be a bool, got {type(class_conditional).__name__}")
    if not isinstance(use_atomics, bool):
        raise TypeError(f"use_atomics must be a bool, got {type(use_atomics).__name__}")
    _check_tensor("labels", labels, 1)
    _check_device("labels", labels, z.device)
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    B, D = z.shape
    K = centroids.shape[0]
    if not class_conditional and labels.shape[0] != B:
        labels = torch.zeros(B, dtype=torch.int64, device=z.device)  # unused by the kernel: a placeholder
    if labels.shape[0] != B:
        raise ValueError(f"labels has {labels.shape[0]} entries but z has {B} rows")
    if class_conditional and K % m != 0:
        raise ValueError(f"centroids has K={K} rows, not a multiple of m={m}")

    acc = centroids.dtype
    counts = torch.zeros(K, dtype=acc, device=z.device)
    sqdev = torch.zeros(K, D, dtype=acc, device=z.device)
    assign = torch.empty(B, dtype=torch.int64, device=z.device)
    if B == 0:
        return assign, counts, sqdev
    labels = labels.contiguous()
    cand = m if class_conditional else K
    block_b, block_k, block_d = _assign_blocks(cand, D, class_conditional, acc)
    _assign_kernel[(triton.cdiv(B, block_b),)](
        z, labels, centroids, assign, sqdev, counts,
        B, D, K, m, K // m,
        z.stride(0), z.stride(1), centroids.stride(0), centroids.stride(1),
        CLASS_COND=class_conditional, ATOMIC_STATS=use_atomics,
        BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
    if use_atomics:
        return assign, counts, sqdev

    perm, starts = _segments(assign, K)
    # rows per program step ~ the mean segment length, so small segments waste few lanes
    block_r = max(4, min(32, _next_pow2(max(1, B // K))))
    block_dr = max(16, min(_next_pow2(D), (4096 if acc == torch.float32 else 2048) // block_r, 256))
    _segment_sqdev_kernel[(K, triton.cdiv(D, block_dr))](
        z, centroids, perm, starts, sqdev, counts,
        D, z.stride(0), z.stride(1), centroids.stride(0), centroids.stride(1),
        BLOCK_R=block_r, BLOCK_D=block_dr, num_warps=4)
    return assign, counts, sqdev


def _check_coef_kd(coef, z: torch.Tensor, centroids: torch.Tensor) -> None:
    _check_tensor("coef", coef, 2)
    _check_device("coef", coef, z.device)
    K, D = centroids.shape
    if coef.dtype != centroids.dtype:
        raise TypeError(f"coef must be {centroids.dtype} (the centroids' dtype), got {coef.dtype}")
    if coef.shape[0] != K or coef.shape[1] not in (1, D):
        raise ValueError(f"coef must be [K, D] = [{K}, {D}] or [K, 1], got {tuple(coef.shape)}")


@_on_z_device
def scatter_grad(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, coef: torch.Tensor,
                 grad_out: Optional[torch.Tensor] = None, factor: float = 1.0) -> torch.Tensor:
    """``dz[i] = coef[a_i] * (z_i - mu[a_i])`` in ``z``'s dtype (``coef`` is ``[K, D]`` or ``[K, 1]``)."""
    _check_z(z)
    _check_centroids(centroids, z)
    _check_assign(assign, z)
    _check_coef_kd(coef, z, centroids)
    coef = coef * (factor if grad_out is None else grad_out * factor)   # placeholder for the fused-kernel branch
    B, D = z.shape
    K = centroids.shape[0]
    dz = torch.empty(B, D, dtype=z.dtype, device=z.device)
    if B == 0:
        return dz
    block_d = min(128, max(16, _next_pow2(D)))
    block_b = max(1, 2048 // block_d)
    stride_kd = 0 if coef.shape[1] == 1 else coef.stride(1)
    assign = assign.contiguous()      # the kernel reads assign[i] at assign_ptr + i
    _scatter_grad_kernel[(triton.cdiv(B, block_b), triton.cdiv(D, block_d))](
        z, assign, centroids, coef, dz, B, D, K,
        z.stride(0), z.stride(1), centroids.stride(0), centroids.stride(1), coef.stride(0), stride_kd,
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4)
    return dz


# --------------------------------------------------------------------------- full covariance

_DD_BLOCK = 32     # D tile of the second-moment blocks (tl.dot needs >= 16)
_ROW_BLOCK = 16


def _full_cov_blocks(D: int, acc: torch.dtype) -> tuple[dict, dict]:
    """Tiles of ``_second_moments_kernel`` and ``_matrix_grad_kernel``. fp64 has no ``tl.dot`` path, and its
    broadcast products get smaller tiles so that nothing spills (ptxas -v, sm_90)."""
    f64 = acc == torch.float64
    moments = dict(BLOCK_R=4 if f64 else _ROW_BLOCK, BLOCK_DD=_DD_BLOCK, USE_DOT=not f64)
    grad = dict(BLOCK_R=_ROW_BLOCK, BLOCK_N=min(32 if f64 else 64, max(16, _next_pow2(D))),
                BLOCK_KD=8 if f64 else 32, USE_DOT=not f64)
    return moments, grad


@_on_z_device
def cluster_second_moments(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor,
                           K: Optional[int] = None) -> torch.Tensor:
    """``[K, D, D]``: per cluster the sum over members of ``(z_i - mu)(z_i - mu)^T`` (accumulation dtype).

    A grouped matmul over the rows sorted by cluster; exactly symmetric. Rows with ``assign = -1``
    are ignored. fp32 uses full-precision (non-TF32) products.
    """
    _check_z(z)
    _check_centroids(centroids, z)
    _check_assign(assign, z)
    if K is None:
        K = centroids.shape[0]
    if isinstance(K, bool) or not isinstance(K, int) or K != centroids.shape[0]:
        raise ValueError(f"K must equal centroids.shape[0] = {centroids.shape[0]}, got {K!r}")
    B, D = z.shape
    out = torch.zeros(K, D, D, dtype=centroids.dtype, device=z.device)
    if B == 0:
        return out
    perm, starts = _segments(assign, K)
    nb = triton.cdiv(D, _DD_BLOCK)
    _second_moments_kernel[(K, nb, nb)](
        z, centroids, perm, starts, out, D, z.stride(0), z.stride(1),
        centroids.stride(0), centroids.stride(1), **_full_cov_blocks(D, centroids.dtype)[0], num_warps=4)
    return out


@_on_z_device
def matrix_grad(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, coef: torch.Tensor,
                scale: float = 1.0) -> torch.Tensor:
    """``dz[i] = scale * coef[a_i] @ (z_i - mu[a_i])`` in ``z``'s dtype, ``coef [K, D, D]``.

    Rows with ``assign = -1`` get a zero gradient.
    """
    _check_z(z)
    _check_centroids(centroids, z)
    _check_assign(assign, z)
    K, D = centroids.shape
    _check_tensor("coef", coef, 3)
    _check_device("coef", coef, z.device)
    if coef.dtype != centroids.dtype:
        raise TypeError(f"coef must be {centroids.dtype} (the centroids' dtype), got {coef.dtype}")
    if tuple(coef.shape) != (K, D, D):
        raise ValueError(f"coef must be [K, D, D] = [{K}, {D}, {D}], got {tuple(coef.shape)}")
    coef = coef.contiguous()
    B = z.shape[0]
    dz = torch.zeros(B, D, dtype=z.dtype, device=z.device)
    if B == 0:
        return dz
    perm, starts = _segments(assign, K)
    blocks = _full_cov_blocks(D, centroids.dtype)[1]
    scale_t = torch.full((1,), float(scale), dtype=centroids.dtype, device=z.device)
    _matrix_grad_kernel[(K, triton.cdiv(D, blocks["BLOCK_N"]))](
        z, centroids, coef, perm, starts, dz, scale_t, D,
        z.stride(0), z.stride(1), centroids.stride(0), centroids.stride(1), **blocks, num_warps=4)
    return dz


def second_moments_grad(z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor,
                        grad_moments: torch.Tensor) -> torch.Tensor:
    """Backward of ``cluster_second_moments`` for a symmetric upstream gradient ``G [K, D, D]``:
    ``dz[i] = 2 * G[a_i] @ (z_i - mu[a_i])``."""
    return matrix_grad(z, assign, centroids, grad_moments, scale=2.0)
