"""Triton backend: nearest-centroid assignment, per-cluster statistics, the fused diagonal forward and the
backward gather.

Same contract as ``torch_backend`` (the vectorised reference), plus the fused entry points:

* ``assign_stats(z, labels, centroids, m, class_conditional, use_atomics=False) -> (assign, counts, sqdev)``
* ``forward_diag(z, labels, centroids, pi, variance, args, update_state=False)
  -> (loss, coef, new_pi, new_var, assign)`` (``args`` a ``KernelArgs``, as for ``cpp_backend.forward_diag``)
* ``scatter_grad(z, assign, centroids, coef, grad_out=None, factor=1.0) -> dz``
* ``is_available(device_type=None) -> bool`` (a device-type string, a device or ``None``)

plus the full-covariance pair ``cluster_second_moments`` / ``matrix_grad`` / ``second_moments_grad``.

Kernels of one diagonal forward+backward (every variant: four launches, no host sync, no float atomics
unless ``use_atomics=True``, no zero-fill, no sort):

1. ``_assign_partial_kernel``: program ``p`` owns a contiguous range of rows. Phase 1 scores each row's
   candidates (the ``m`` clusters of its class, or all ``K``) ``BLOCK_K`` at a time on a
   ``[BLOCK_B, BLOCK_K, BLOCK_D]`` tile, running minimum with ties to the lowest index, and writes ``assign``.
   Phase 2 (after a CTA barrier) re-reads its rows and writes its partial statistics of every cluster,
   ``pcount [P, K]`` and ``psq [P, K, D]``, as a one-hot ``tl.dot`` (IEEE products) in a fixed order.
2. ``_reduce_epilogue_kernel``, grid (cluster, D block): sums the ``P`` partials in a fixed order, then does
   the variant's math (``cem_fast.variants.official`` / ``paper_diag``) and writes ``coef``, the new
   variance (in place when asked), the new pi (to a scratch) and one loss partial per program.
   ``assign_stats`` uses it with a plain epilogue (``sqdev``, ``counts``).
3. ``_finish_kernel`` (one program): the loss as a fixed-order sum of the partials; copies the new pi in place.
   official-trained: ``_trained_finish_kernel`` (one program) does that variant's per-cluster math instead
   (scalar variances, the hinge, the authors' index bug); past 2048 classes x clusters it is not fused.
4. ``_scatter_grad_kernel`` (backward): ``dz = factor * grad_out * coef[a] * (z - mu[a])`` with ``grad_out``
   read on the device and ``coef`` ``[K, D]`` or ``[K, 1]`` broadcast in the kernel.

The batch size is never specialised (``do_not_specialize``): a ragged last batch does not recompile.
Rows whose label is outside ``[0, K/m)`` (class-conditional only) cannot be rejected without a host
sync; they get ``assign = -1``, count in no cluster and receive a zero gradient. Callers validate labels.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

# absolute: tests load a private copy of this file outside the package
from cem_fast.backends.contract import KernelArgs, check_kernel_args

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
    _argmin_combine = tl.standard._argmin_combine_tie_break_left  # ties -> lowest index

    @triton.jit
    def _argmin_rows(
        z_rows,
        row_ok,
        labels_ptr,
        rows,
        cent_ptr,
        D,
        K,
        M,
        num_classes,
        stride_zd,
        stride_cb,
        stride_cd,
        CLASS_COND: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """``(assign, valid)`` of a block of rows: the nearest candidate, ties to the lowest index."""
        acc_dtype = cent_ptr.dtype.element_ty
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
                zt = tl.load(z_rows + d[None, :] * stride_zd, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(
                    acc_dtype
                )
                if CLASS_COND:
                    cidx = base[:, None] + j[None, :]
                    c_ok = valid[:, None] & j_ok[None, :]
                    mu = tl.load(
                        cent_ptr + cidx[:, :, None] * stride_cb + d[None, None, :] * stride_cd,
                        mask=c_ok[:, :, None] & d_ok[None, None, :],
                        other=0.0,
                    )
                else:
                    mu = tl.load(
                        cent_ptr + j.to(tl.int64)[:, None] * stride_cb + d[None, :] * stride_cd,
                        mask=j_ok[:, None] & d_ok[None, :],
                        other=0.0,
                    )[None, :, :]
                diff = zt[:, None, :] - mu
                dist += tl.reduce(diff * diff, 2, _sum_combine)
            dist = tl.where(j_ok[None, :], dist, float("inf"))
            jj = tl.broadcast_to(tl.arange(0, BLOCK_K)[None, :], (BLOCK_B, BLOCK_K))
            blk_d, blk_j = tl.reduce((dist, jj), 1, _argmin_combine)
            better = blk_d < best_d
            best_d = tl.where(better, blk_d, best_d)
            best_j = tl.where(better, k0 + blk_j.to(tl.int64), best_j)
        return base + best_j, valid

    @triton.jit(do_not_specialize=["B", "rows_per_prog"])
    def _assign_partial_kernel(
        z_ptr,
        labels_ptr,
        cent_ptr,
        assign_ptr,
        pcount_ptr,
        psq_ptr,
        B,
        D,
        K,
        M,
        num_classes,
        rows_per_prog,
        stride_zb,
        stride_zd,
        stride_cb,
        stride_cd,
        CLASS_COND: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_BS: tl.constexpr,
        BLOCK_KS: tl.constexpr,
        BLOCK_DS: tl.constexpr,
    ):
        # Kernel 1 of the forward. Program p owns rows [p * rows_per_prog, ...): phase 1 assigns them
        # (written to assign), phase 2 re-reads them and writes this program's partial statistics of
        # *every* cluster (zeros included: nothing is zero-filled beforehand):
        #   pcount[p, k] (int32) and psq[p, k, :] = sum over its rows of cluster k of (z - mu_k)^2.
        # Within a program the rows are summed in a fixed order; the programs are summed by kernel 2.
        acc_dtype = cent_ptr.dtype.element_ty
        pid = tl.program_id(0)
        row0 = pid * rows_per_prog
        row_end = tl.minimum(row0 + rows_per_prog, B)
        for r0 in range(row0, row_end, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            row_ok = rows < row_end
            z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zb
            a, valid = _argmin_rows(
                z_rows,
                row_ok,
                labels_ptr,
                rows,
                cent_ptr,
                D,
                K,
                M,
                num_classes,
                stride_zd,
                stride_cb,
                stride_cd,
                CLASS_COND,
                BLOCK_B,
                BLOCK_K,
                BLOCK_D,
            )
            tl.store(assign_ptr + rows, tl.where(valid, a, -1), mask=row_ok)
        # phase 2 reads what other threads of this program wrote: a CTA barrier makes the writes visible
        tl.debug_barrier()
        pbase = pid.to(tl.int64) * K
        for k0 in range(0, K, BLOCK_KS):
            kk = k0 + tl.arange(0, BLOCK_KS)
            k_ok = kk < K
            cnt = tl.full([BLOCK_KS], 0, tl.int32)
            for r0 in range(row0, row_end, BLOCK_BS):
                rows = r0 + tl.arange(0, BLOCK_BS)
                a = tl.load(assign_ptr + rows, mask=rows < row_end, other=-1)
                cnt += tl.reduce((a[:, None] == kk[None, :]).to(tl.int32), 0, _sum_combine)
            tl.store(pcount_ptr + pbase + kk, cnt, mask=k_ok)
            for d0 in range(0, D, BLOCK_DS):
                d = d0 + tl.arange(0, BLOCK_DS)
                d_ok = d < D
                acc = tl.full([BLOCK_KS, BLOCK_DS], 0, acc_dtype)
                for r0 in range(row0, row_end, BLOCK_BS):
                    rows = r0 + tl.arange(0, BLOCK_BS)
                    r_ok = rows < row_end
                    a = tl.load(assign_ptr + rows, mask=r_ok, other=-1)
                    in_blk = (a >= k0) & (a < k0 + BLOCK_KS)  # rows of this block of clusters
                    msk = in_blk[:, None] & d_ok[None, :]
                    zt = tl.load(
                        z_ptr + rows.to(tl.int64)[:, None] * stride_zb + d[None, :] * stride_zd, mask=msk, other=0.0
                    )
                    mu = tl.load(
                        cent_ptr + tl.where(in_blk, a, 0)[:, None] * stride_cb + d[None, :] * stride_cd,
                        mask=msk,
                        other=0.0,
                    )
                    diff = tl.where(msk, zt.to(acc_dtype) - mu, 0.0)
                    hit = (a[:, None] == kk[None, :]).to(acc_dtype)  # [rows, clusters] one-hot
                    acc += tl.dot(tl.trans(hit), diff * diff, input_precision="ieee")
                tl.store(psq_ptr + (pbase + kk)[:, None] * D + d[None, :], acc, mask=k_ok[:, None] & d_ok[None, :])

    @triton.jit(do_not_specialize=["B"])
    def _assign_atomic_kernel(
        z_ptr,
        labels_ptr,
        cent_ptr,
        assign_ptr,
        sqdev_ptr,
        counts_ptr,
        B,
        D,
        K,
        M,
        num_classes,
        stride_zb,
        stride_zd,
        stride_cb,
        stride_cd,
        BLOCK_B: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        CLASS_COND: tl.constexpr,
    ):
        # use_atomics=True: one pass, statistics added straight into zero-filled sqdev / counts
        acc_dtype = cent_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zb
        a, valid = _argmin_rows(
            z_rows,
            row_ok,
            labels_ptr,
            rows,
            cent_ptr,
            D,
            K,
            M,
            num_classes,
            stride_zd,
            stride_cb,
            stride_cd,
            CLASS_COND,
            BLOCK_B,
            BLOCK_K,
            BLOCK_D,
        )
        tl.store(assign_ptr + rows, tl.where(valid, a, -1), mask=row_ok)
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
    def _split_float(hi, lo, dtype: tl.constexpr):
        # a Python float argument arrives as fp32: doubles are passed as hi + lo (about 48 bits)
        one = tl.full([], 1.0, dtype)
        return hi * one + lo * one

    @triton.jit
    def _log1p(x):
        # log(1 + x) accurate for small x (Goldberg): log(u) * x / (u - 1) with u = 1 + x
        u = 1.0 + x
        return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))

    @triton.jit(do_not_specialize=["P"])
    def _reduce_epilogue_kernel(
        pcount_ptr,
        psq_ptr,
        pi_ptr,
        var_ptr,
        var_out_ptr,
        pi_out_ptr,
        coef_ptr,
        lossp_ptr,
        P,
        K,
        D,
        M,
        c_hi,
        c_lo,
        n_hi,
        n_lo,
        scale_hi,
        scale_lo,
        EPILOGUE: tl.constexpr,
        CLASS_COND: tl.constexpr,
        M_PAD: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Kernel 2 of the forward: program (k, D block) sums the P programs' partials in a fixed order,
        # then (EPILOGUE) 0: writes the raw statistics sqdev -> var_out, counts -> pi_out;
        # 1 (official): coef and the loss partial; 2 (paper, diag): the new variance (var_out may be
        # var itself: each element is read and written by this program only), the new pi (pi_out, a
        # scratch: other programs still read pi[k]), coef and the loss partial.
        # c = sigma^2 + 1e-6 (official) or sigma^2 (paper); n = dataset size; scale = 1/D or 1.
        acc_dtype = psq_ptr.dtype.element_ty
        k = tl.program_id(0)
        pd = tl.program_id(1)
        cls = k // M
        j = tl.arange(0, M_PAD)
        j_ok = j < M
        pp = tl.arange(0, BLOCK_P)
        own = tl.full([M_PAD], 0, tl.int32)  # counts of the clusters of k's class
        for p0 in range(0, P, BLOCK_P):
            p = p0 + pp
            t = tl.load(
                pcount_ptr + p.to(tl.int64)[:, None] * K + (cls * M + j)[None, :],
                mask=(p < P)[:, None] & j_ok[None, :],
                other=0,
            )
            own += tl.reduce(t, 0, _sum_combine)
        n_k = tl.reduce(tl.where(j == k - cls * M, own, 0), 0, _sum_combine).to(acc_dtype)
        n_cls = tl.reduce(own, 0, _sum_combine).to(acc_dtype)
        d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        sq = tl.full([BLOCK_D], 0, acc_dtype)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + pp
            t = tl.load(
                psq_ptr + (p.to(tl.int64)[:, None] * K + k) * D + d[None, :],
                mask=(p < P)[:, None] & d_ok[None, :],
                other=0.0,
            )
            sq += tl.reduce(t, 0, _sum_combine)
        kd = k.to(tl.int64) * D + d
        if EPILOGUE == 0:
            tl.store(var_out_ptr + kd, sq, mask=d_ok)
            if pd == 0:
                tl.store(pi_out_ptr + k, n_k)
        elif EPILOGUE == 3:  # official-trained: the block's share of each cluster's sum of sqdev
            tl.store(lossp_ptr + k * tl.num_programs(1) + pd, tl.reduce(sq, 0, _sum_combine))
        else:
            # batch size and classes present, from every cluster's count (2-D tiles: program x class)
            batch = tl.full([], 0, tl.int32)
            present = tl.full([], 0, tl.int32)
            cc = tl.arange(0, BLOCK_C)
            for c0 in range(0, K // M, BLOCK_C):
                c = c0 + cc
                c_ok = c < K // M
                per_class = tl.full([BLOCK_C], 0, tl.int32)
                for p0 in range(0, P, BLOCK_P):
                    p = p0 + pp
                    row = pcount_ptr + p[:, None] * K + (c * M)[None, :]
                    msk = (p < P)[:, None] & c_ok[None, :]
                    for jj in range(0, M):
                        per_class += tl.reduce(tl.load(row + jj, mask=msk, other=0), 0, _sum_combine)
                batch += tl.reduce(per_class, 0, _sum_combine)
                present += tl.reduce((per_class > 0).to(tl.int32), 0, _sum_combine)
            batch_f = batch.to(acc_dtype)
            c_const = _split_float(c_hi, c_lo, acc_dtype)
            scale = _split_float(scale_hi, scale_lo, acc_dtype)
            n_safe = tl.maximum(n_k, 1.0)
            if EPILOGUE == 1:
                if CLASS_COND:
                    num_p = tl.maximum(present.to(acc_dtype), 1.0)
                    group = n_cls
                else:
                    num_p = tl.full([], 1.0, acc_dtype)
                    group = batch_f
                weight = tl.where(n_k > 0, n_k / tl.maximum(group, 1.0), 0.0)
                arg = sq / n_safe + c_const
                logs = tl.where(d_ok, tl.log(arg), 0.0)
                tl.store(
                    lossp_ptr + k * tl.num_programs(1) + pd, weight * tl.reduce(logs, 0, _sum_combine) / (num_p * D)
                )
                tl.store(coef_ptr + kd, (weight / (num_p * D * n_safe)) / arg, mask=d_ok)
            else:
                N = _split_float(n_hi, n_lo, acc_dtype)
                pi_k = tl.load(pi_ptr + k).to(acc_dtype)
                pi_new = (pi_k * (N - batch_f) + n_k) / N
                alpha = tl.where(n_k > 0, tl.minimum(tl.maximum(n_k / (pi_new * N), 0.0), 1.0), 0.0)
                v = tl.load(var_ptr + kd, mask=d_ok, other=0.0)
                v_new = tl.where(n_k > 0, (1 - alpha) * v + alpha * (sq / n_safe), v)
                tl.store(var_out_ptr + kd, v_new, mask=d_ok)
                half_logdet = 0.5 * tl.reduce(tl.where(d_ok, _log1p(v_new / c_const), 0.0), 0, _sum_combine)
                part = scale * pi_new * half_logdet
                if pd == 0:
                    tiny = tl.where(pi_new > 0, pi_new, 1.0)
                    part += scale * tl.where(pi_new > 0, -pi_new * tl.log(tiny), 0.0)
                    tl.store(pi_out_ptr + k, pi_new)
                tl.store(lossp_ptr + k * tl.num_programs(1) + pd, part)
                tl.store(coef_ptr + kd, (scale * 0.5 * pi_new * alpha / n_safe) / (v_new + c_const), mask=d_ok)

    @triton.jit
    def _finish_kernel(
        lossp_ptr, loss_ptr, pi_src_ptr, pi_dst_ptr, n_parts, K, COPY_PI: tl.constexpr, BLOCK: tl.constexpr
    ):
        # Kernel 3 of the forward (one program): the loss as a fixed-order sum of kernel 2's partials,
        # and (COPY_PI) the new pi copied into the state in place.
        acc = tl.full([BLOCK], 0, lossp_ptr.dtype.element_ty)
        for i0 in range(0, n_parts, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            acc += tl.load(lossp_ptr + i, mask=i < n_parts, other=0.0)
        tl.store(loss_ptr, tl.reduce(acc, 0, _sum_combine))
        if COPY_PI:
            for k0 in range(0, K, BLOCK):
                kk = k0 + tl.arange(0, BLOCK)
                tl.store(pi_dst_ptr + kk, tl.load(pi_src_ptr + kk, mask=kk < K), mask=kk < K)

    @triton.jit(do_not_specialize=["P"])
    def _trained_finish_kernel(
        lossp_ptr,
        pcount_ptr,
        pi_ptr,
        var_ptr,
        coef_ptr,
        loss_ptr,
        n_parts,
        P,
        K,
        M,
        D,
        t_hi,
        t_lo,
        n_hi,
        n_lo,
        CLASS_COND: tl.constexpr,
        INDEX_BUG: tl.constexpr,
        LOG_ENTROPY: tl.constexpr,
        K_PAD: tl.constexpr,
        C_PAD: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        # Kernel 3 of official-trained (one program; cem_fast.variants.official_trained with a scalar
        # variance per cluster): per-cluster sums of kernel 2's partials, then loss and coef [K, 1].
        # t = the hinge threshold, n = dataset_size / num_classes.
        acc_dtype = lossp_ptr.dtype.element_ty
        kk = tl.arange(0, K_PAD)
        k_ok = kk < K
        nd = n_parts // K
        rs = tl.full([K_PAD], 0, acc_dtype)
        for pd in range(0, nd):
            rs += tl.load(lossp_ptr + kk * nd + pd, mask=k_ok, other=0.0)
        cnt = tl.full([K_PAD], 0, tl.int32)
        pp = tl.arange(0, BLOCK_P)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + pp
            t = tl.load(pcount_ptr + p[:, None] * K + kk[None, :], mask=(p < P)[:, None] & k_ok[None, :], other=0)
            cnt += tl.reduce(t, 0, _sum_combine)
        n = cnt.to(acc_dtype)
        C = K // M
        cc = tl.arange(0, C_PAD)
        member = ((kk // M)[None, :] == cc[:, None]) & k_ok[None, :]  # [class, cluster]
        class_n = tl.reduce(tl.where(member, n[None, :], 0.0), 1, _sum_combine)
        if CLASS_COND:
            num_p = tl.maximum(tl.reduce(((class_n > 0) & (cc < C)).to(acc_dtype), 0, _sum_combine), 1.0)
        else:
            num_p = tl.full([], 1.0, acc_dtype)
        idx = kk
        if INDEX_BUG:  # variants.index_bug_rows: class c reads the row of the class of sorted sample rank(c)
            rank = tl.associative_scan(((class_n > 0) & (cc < C)).to(tl.int32), 0, _sum_combine) - 1
            ends = tl.associative_scan(class_n, 0, _sum_combine)
            r = tl.maximum(rank, 0).to(acc_dtype)
            below = (ends[None, :] <= r[:, None]) & (cc < C)[None, :]  # searchsorted(right=True)
            src = tl.minimum(tl.reduce(below.to(tl.int32), 1, _sum_combine), C - 1)
            src_k = tl.reduce(tl.where(member, src[:, None], 0), 0, _sum_combine)
            idx = src_k * M + kk % M
        p_k = tl.load(pi_ptr + idx, mask=k_ok, other=1.0).to(acc_dtype)
        v_k = tl.load(var_ptr + idx, mask=k_ok, other=0.0).to(acc_dtype)
        present = (n > 0) & k_ok
        n_safe = tl.maximum(n, 1.0)
        s = rs / (n_safe * D)
        lam = 10.0 * n / (p_k * _split_float(n_hi, n_lo, acc_dtype))  # TRAINED_LAMBDA_SCALE
        lam = tl.where(lam >= 1, 0.99, lam)  # TRAINED_LAMBDA_CAP
        lam = tl.where(present, lam, 0.0)
        v = lam * s + (1 - lam) * v_k
        if LOG_ENTROPY:
            arg = tl.log(v + 0.01) - _split_float(t_hi, t_lo, acc_dtype)  # TRAINED_GAMMA
            term = p_k * tl.maximum(arg, 0.0)
            dterm = tl.where(arg > 0, p_k / (v + 0.01), 0.0)
        else:
            term = p_k * (v + 0.001)  # TRAINED_LINEAR_EPS
            dterm = p_k
        tl.store(loss_ptr, tl.reduce(tl.where(present, term, 0.0), 0, _sum_combine) / num_p)
        tl.store(coef_ptr + kk, tl.where(present, dterm * lam / (n_safe * D), 0.0) / num_p, mask=k_ok)

    @triton.jit(do_not_specialize=["B"])
    def _scatter_grad_kernel(
        z_ptr,
        assign_ptr,
        cent_ptr,
        coef_ptr,
        gout_ptr,
        dz_ptr,
        factor,
        B,
        D,
        K,
        stride_zb,
        stride_zd,
        stride_cb,
        stride_cd,
        stride_kb,
        stride_kd,
        HAS_GOUT: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # dz = factor * grad_out * coef[a] * (z - mu[a]) (the backward: kernel 4)
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
        if HAS_GOUT:
            # the same rounding as coef * (grad_out * factor) computed in PyTorch first
            c = c * (tl.load(gout_ptr).to(acc_dtype) * factor)
        else:
            c = c * factor  # exact for the default 1.0
        g = c * (zt.to(acc_dtype) - mu)
        tl.store(
            dz_ptr + rows.to(tl.int64)[:, None] * D + d[None, :],
            g.to(dz_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )

    @triton.jit(do_not_specialize=["B"])
    def _segments_kernel(assign_ptr, perm_ptr, starts_ptr, B, K, K_PAD: tl.constexpr, BLOCK: tl.constexpr):
        # One program: a stable counting sort of the rows by cluster (rows with assign -1 first), and the
        # segment bounds starts[k] .. starts[k + 1]. Replaces sort + arange + searchsorted (three launches).
        kk = tl.arange(0, K_PAD)
        cnt = tl.full([K_PAD], 0, tl.int32)
        for r0 in range(0, B, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            a = tl.load(assign_ptr + rows, mask=rows < B, other=-2)
            cnt += tl.reduce((a[:, None] == kk[None, :]).to(tl.int32), 0, _sum_combine)
        n_invalid = B - tl.reduce(cnt, 0, _sum_combine)
        run = tl.associative_scan(cnt, 0, _sum_combine) - cnt + n_invalid  # each segment's start
        tl.store(starts_ptr + kk, run, mask=kk < K)
        tl.store(starts_ptr + K, B)
        inv_run = tl.full([], 0, tl.int32)
        for r0 in range(0, B, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            row_ok = rows < B
            a = tl.load(assign_ptr + rows, mask=row_ok, other=-2)
            hit = (a[:, None] == kk[None, :]).to(tl.int32)
            rank = tl.associative_scan(hit, 0, _sum_combine) - hit  # earlier rows of the cluster
            pos = tl.reduce(hit * (run[None, :] + rank), 1, _sum_combine)
            bad = (row_ok & ((a < 0) | (a >= K))).to(tl.int32)
            pos = tl.where(bad > 0, inv_run + tl.associative_scan(bad, 0, _sum_combine) - bad, pos)
            tl.store(perm_ptr + pos, rows, mask=row_ok)
            run += tl.reduce(hit, 0, _sum_combine)
            inv_run += tl.reduce(bad, 0, _sum_combine)

    @triton.jit
    def _second_moments_kernel(
        z_ptr,
        cent_ptr,
        perm_ptr,
        starts_ptr,
        out_ptr,
        D,
        stride_zb,
        stride_zd,
        stride_cb,
        stride_cd,
        BLOCK_R: tl.constexpr,
        BLOCK_DD: tl.constexpr,
        USE_DOT: tl.constexpr,
    ):
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
                row = tl.load(perm_ptr + r, mask=r_ok, other=0).to(tl.int64)
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
                acc = 0.5 * (acc + tl.trans(acc))  # exactly symmetric diagonal blocks
            base = out_ptr + k.to(tl.int64) * D * D
            tl.store(base + di[:, None] * D + dj[None, :], acc, mask=(di < D)[:, None] & (dj < D)[None, :])
            if bi < bj:
                tl.store(
                    base + dj[:, None] * D + di[None, :], tl.trans(acc), mask=(dj < D)[:, None] & (di < D)[None, :]
                )

    @triton.jit
    def _matrix_grad_kernel(
        z_ptr,
        cent_ptr,
        coef_ptr,
        perm_ptr,
        starts_ptr,
        dz_ptr,
        scale_hi,
        scale_lo,
        D,
        stride_zb,
        stride_zd,
        stride_cb,
        stride_cd,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_KD: tl.constexpr,
        USE_DOT: tl.constexpr,
    ):
        # program (k, n-block): for the rows of cluster k, dz[:, n] = scale * X @ coef[k][n, :]^T
        # (a grouped GEMM over the cluster-sorted rows; X = z - mu[k]). The last k (= K) writes the zero
        # gradient of the rows outside every cluster (perm[:starts[0]]), so dz needs no zero-fill.
        acc_dtype = cent_ptr.dtype.element_ty
        k = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < D
        if k == tl.num_programs(0) - 1:
            for r0 in range(0, tl.load(starts_ptr), BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < tl.load(starts_ptr)
                row = tl.load(perm_ptr + r, mask=r_ok, other=0).to(tl.int64)
                tl.store(
                    dz_ptr + row[:, None] * D + n[None, :],
                    tl.full([BLOCK_R, BLOCK_N], 0, dz_ptr.dtype.element_ty),
                    mask=r_ok[:, None] & n_ok[None, :],
                )
        else:
            start = tl.load(starts_ptr + k)
            end = tl.load(starts_ptr + k + 1)
            g_base = coef_ptr + k.to(tl.int64) * D * D
            scale = _split_float(scale_hi, scale_lo, acc_dtype)
            for r0 in range(start, end, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < end
                row = tl.load(perm_ptr + r, mask=r_ok, other=0).to(tl.int64)
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
                tl.store(
                    dz_ptr + row[:, None] * D + n[None, :],
                    acc.to(dz_ptr.dtype.element_ty),
                    mask=r_ok[:, None] & n_ok[None, :],
                )


# =========================================================================== availability


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernels_interpreted() -> bool:
    """Whether the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_assign_partial_kernel, InterpretedFunction)


def is_available(device_type=None) -> bool:
    """Triton is importable and can run on ``device_type`` (CUDA, or any device under ``TRITON_INTERPRET=1``).

    ``device_type`` is a device-type string, a device or ``None`` (= "is there a CUDA device").
    """
    if triton is None:
        return False
    if _interpret_requested() and kernels_interpreted():
        return True
    if kernels_interpreted():  # built for the interpreter, which has since been switched off
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
        raise ValueError(
            f"z must be a CUDA tensor for the Triton backend (got {z.device}); "
            f"CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
        )


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


_SEGMENT_TILE = 4096  # elements of the [rows, clusters] one-hot tile of _segments_kernel


def _segments(assign: torch.Tensor, K: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by cluster (stable) and the ``K + 1`` segment bounds (int32); one launch, no sort.

    Rows with ``assign = -1`` come first and fall outside every segment (as with a stable sort). Past 256
    clusters a stable sort of int32 keys instead (``perm`` then int64, as ``torch.sort`` returns it).
    """
    B = assign.shape[0]
    k_pad = _next_pow2(K)
    if k_pad > _SEGMENT_TILE // 16:  # too many clusters for one program's tile: sort (int32 keys)
        keys, perm = torch.sort(assign.to(torch.int32), stable=True)
        starts = torch.searchsorted(keys, torch.arange(K + 1, device=assign.device, dtype=torch.int32), out_int32=True)
        return perm, starts
    perm = torch.empty(B, dtype=torch.int32, device=assign.device)
    starts = torch.empty(K + 1, dtype=torch.int32, device=assign.device)
    _segments_kernel[(1,)](assign, perm, starts, B, K, **_segment_blocks(K), num_warps=4)
    return perm, starts


def _segment_blocks(K: int) -> dict:
    """At most 1024 rows a step: a [4096, 1] tile needs 240 registers with Triton 3.6 (ptxas -v, sm_90)."""
    k_pad = _next_pow2(K)
    return dict(K_PAD=k_pad, BLOCK=min(1024, _SEGMENT_TILE // k_pad))


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
    """``(BLOCK_B, BLOCK_K, BLOCK_D)`` of the assignment: a ``[B, K, D]`` distance tile held in registers."""
    block_k = min(_next_pow2(cand), 16)
    block_b = 16 if (block_k <= 2 or not class_conditional) else 8
    budget = 4096 if acc == torch.float32 else 2048  # elements of the [B, K, D] tile (registers)
    if class_conditional and block_k < 16:
        budget //= 2  # the per-row gather also holds a 64-bit address per element (ptxas -v: no spills)
    block_d = max(16, min(128 if acc == torch.float32 else 64, budget // (block_b * block_k)))
    return block_b, block_k, min(block_d, max(16, _next_pow2(D)))


def _atomic_blocks(cand: int, D: int, class_conditional: bool, acc: torch.dtype):
    """The assignment's tiles in ``_assign_atomic_kernel``: BLOCK_D at most 64 ((16, 1, 128) spills with
    Triton 3.6 for bf16 z, ptxas -v, sm_90)."""
    block_b, block_k, block_d = _assign_blocks(cand, D, class_conditional, acc)
    return block_b, block_k, min(block_d, 64)


def _stats_blocks(K: int, D: int, acc: torch.dtype) -> dict:
    """Tiles of phase 2 of ``_assign_partial_kernel``: a ``[rows, clusters]^T x [rows, D]`` one-hot product
    (``tl.dot`` with IEEE products, fp32 or fp64). Chosen with ``ptxas -v`` for sm_90 so that nothing spills
    with Triton 3.6 or 3.8 (the assignment phase of the same kernel already needs up to ~230 registers)."""
    if acc == torch.float64:
        return dict(BLOCK_BS=16, BLOCK_KS=16, BLOCK_DS=16)
    return dict(BLOCK_BS=16, BLOCK_KS=32, BLOCK_DS=16)


_PARTIAL_BUDGET = 1 << 22  # elements of the per-program partials [P, K, D] (16 MiB in fp32)
_MAX_PROGRAMS = 256


def _programs(B: int, K: int, D: int, unit: int) -> Tuple[int, int]:
    """``(P, rows_per_prog)``: as many programs as the partials' budget allows, each a whole number of units."""
    n_units = max(1, triton.cdiv(B, unit))
    P = min(n_units, _MAX_PROGRAMS, max(1, _PARTIAL_BUDGET // (K * D)))
    rows = triton.cdiv(n_units, P) * unit
    return max(1, triton.cdiv(B, rows)), rows


def _check_stats_args(z, labels, centroids, m, class_conditional):
    _check_z(z)
    _check_centroids(centroids, z)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive int, got {m!r}")
    if not isinstance(class_conditional, bool):
        raise TypeError(f"class_conditional must be a bool, got {type(class_conditional).__name__}")
    K = centroids.shape[0]
    if class_conditional:
        _check_tensor("labels", labels, 1)
        _check_device("labels", labels, z.device)
        if labels.dtype not in _INT_DTYPES:
            raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
        if labels.shape[0] != z.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries but z has {z.shape[0]} rows")
    if K % m != 0:
        raise ValueError(f"centroids has K={K} rows, not a multiple of m={m}")


def _partials(z, labels, centroids, m: int, class_conditional: bool):
    """Kernel 1: ``assign [B]`` int64 and the per-program partials ``pcount [P, K]``, ``psq [P, K, D]``."""
    B, D = z.shape
    K = centroids.shape[0]
    acc = centroids.dtype
    dev = z.device
    assign = torch.empty(B, dtype=torch.int64, device=dev)
    block_b, block_k, block_d = _assign_blocks(m if class_conditional else K, D, class_conditional, acc)
    stats = _stats_blocks(K, D, acc)
    P, rows = _programs(B, K, D, max(block_b, stats["BLOCK_BS"]))
    pcount = torch.empty(P, K, dtype=torch.int32, device=dev)
    psq = torch.empty(P, K, D, dtype=acc, device=dev)
    # unconditional: the kernel never reads labels; any int64 pointer will do
    lab = labels.contiguous() if class_conditional else assign
    _assign_partial_kernel[(P,)](
        z,
        lab,
        centroids,
        assign,
        pcount,
        psq,
        B,
        D,
        K,
        m,
        K // m,
        rows,
        z.stride(0),
        z.stride(1),
        centroids.stride(0),
        centroids.stride(1),
        CLASS_COND=class_conditional,
        BLOCK_B=block_b,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        **stats,
        num_warps=4,
    )
    return assign, pcount, psq


def _split(x: float) -> Tuple[float, float]:
    """``x = hi + lo`` with ``hi`` an fp32 value: Triton passes Python floats as fp32."""
    hi = struct.unpack("f", struct.pack("f", x))[0]  # host arithmetic: no tensor, no device op
    return hi, float(x - hi)


# Without a register cap ptxas aims this small kernel at 32 registers and spills a few bytes for some tiles,
# differently with Triton 3.6 and 3.8 (ptxas -v, sm_90); with maxnreg=64 nothing spills on either.
REDUCE_OPTIONS = dict(num_warps=4, maxnreg=64)


def _reduce_blocks(D: int, m: int, acc: torch.dtype) -> dict:
    m_pad = _next_pow2(m)
    return dict(
        M_PAD=m_pad, BLOCK_P=8, BLOCK_C=32, BLOCK_D=min(256 if acc == torch.float32 else 128, max(16, _next_pow2(D)))
    )


def _reduce(
    pcount,
    psq,
    epilogue: int,
    class_conditional: bool,
    m: int,
    pi=None,
    var=None,
    var_out=None,
    pi_out=None,
    coef=None,
    lossp=None,
    const: float = 0.0,
    dataset_size: float = 1.0,
    scale: float = 1.0,
):
    """Kernel 2 over a grid (K, D blocks); unused pointers get a placeholder (``psq``)."""
    P, K, D = psq.shape
    blocks = _reduce_blocks(D, m, psq.dtype)
    grid = (K, triton.cdiv(D, blocks["BLOCK_D"]))
    pick = [psq if t is None else t for t in (pi, var, var_out, pi_out, coef, lossp)]
    _reduce_epilogue_kernel[grid](
        pcount,
        psq,
        *pick,
        P,
        K,
        D,
        m,
        *_split(const),
        *_split(dataset_size),
        *_split(scale),
        EPILOGUE=epilogue,
        CLASS_COND=class_conditional,
        **blocks,
        **REDUCE_OPTIONS,
    )
    return grid


@_on_z_device
def assign_stats(
    z: torch.Tensor,
    labels: torch.Tensor,
    centroids: torch.Tensor,
    m: int,
    class_conditional: bool,
    use_atomics: bool = False,
):
    """Nearest centroid per row and the per-cluster counts and squared deviations.

    Returns ``assign [B]`` int64 (cluster ``c * m + j``; ties to the lowest index), ``counts [K]``
    and ``sqdev [K, D]`` (sum over members of ``(z - mu)^2``) in the accumulation dtype.
    Two launches (assignment with per-program partials, a fixed-order reduction); ``use_atomics=True``
    accumulates with ``atomic_add`` in one pass instead (faster, not bitwise reproducible).
    """
    if not isinstance(use_atomics, bool):
        raise TypeError(f"use_atomics must be a bool, got {type(use_atomics).__name__}")
    _check_stats_args(z, labels, centroids, m, class_conditional)
    B, D = z.shape
    K = centroids.shape[0]
    acc = centroids.dtype
    if use_atomics:
        counts = torch.zeros(K, dtype=acc, device=z.device)
        sqdev = torch.zeros(K, D, dtype=acc, device=z.device)
        assign = torch.empty(B, dtype=torch.int64, device=z.device)
        if B == 0:
            return assign, counts, sqdev
        block_b, block_k, block_d = _atomic_blocks(m if class_conditional else K, D, class_conditional, acc)
        _assign_atomic_kernel[(triton.cdiv(B, block_b),)](
            z,
            labels.contiguous() if class_conditional else assign,
            centroids,
            assign,
            sqdev,
            counts,
            B,
            D,
            K,
            m,
            K // m,
            z.stride(0),
            z.stride(1),
            centroids.stride(0),
            centroids.stride(1),
            BLOCK_B=block_b,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            CLASS_COND=class_conditional,
            num_warps=4,
        )
        return assign, counts, sqdev
    assign, pcount, psq = _partials(z, labels, centroids, m, class_conditional)
    counts = torch.empty(K, dtype=acc, device=z.device)
    sqdev = torch.empty(K, D, dtype=acc, device=z.device)
    _reduce(pcount, psq, 0, class_conditional, m, var_out=sqdev, pi_out=counts)
    return assign, counts, sqdev


FUSED_VARIANT_CODES = frozenset({0, 1, 2})  # forward_diag is three kernels for these (1: up to 2048 K x C)
_OFFICIAL_EPS = 1e-6  # cem_fast.variants.OFFICIAL_EPS
_TRAINED_TILE = 2048  # official-trained's [classes, clusters] tile (8192 spills)


@_on_z_device
def forward_diag(z, labels, centroids, pi, variance, args: KernelArgs, update_state: bool = False):
    """Statistics and the variant's math (diagonal covariance): ``(loss, coef, pi_new, variance_new, assign)``.

    ``args``: a ``KernelArgs`` (``cem_fast/backends/contract.py``), as for ``cpp_backend.forward_diag``. With
    ``update_state`` the new state is written into ``pi``/``variance`` in place and those same tensors are
    returned. Variant codes: 0 official,
    1 official-trained, 2 paper. For the codes in ``FUSED_VARIANT_CODES`` three kernels, no host sync:
    assignment with per-program partials, a fixed-order reduction whose epilogue writes coef, the new
    variance and the loss partials, and a one-program kernel summing the loss (and copying the new pi).
    ``coef [K, D]`` is ``dL/dsqdev``; the backward is ``scatter_grad(z, assign, centroids, coef, grad, 2.0)``.
    """
    a = check_kernel_args(args)
    variant_code, m, class_conditional, sigma, num_classes = (
        a.variant_code,
        a.m,
        a.class_conditional,
        a.sigma,
        a.num_classes,
    )
    dataset_size, mean_dim = a.dataset_size, a.mean_dim
    if variant_code not in (0, 1, 2):
        raise ValueError(f"variant_code must be 0 (official), 1 (official-trained) or 2 (paper), got {variant_code!r}")
    _check_stats_args(z, labels, centroids, m, class_conditional)
    K, D = centroids.shape
    acc = centroids.dtype
    for name, t in (("pi", pi), ("variance", variance)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if variant_code == 1 and _next_pow2(K) * _next_pow2(K // m) > _TRAINED_TILE:
        return _official_trained_unfused(z, labels, centroids, pi, variance, a)
    if variant_code == 2:
        if pi.numel() != K or variance.numel() != K * D:
            raise ValueError(
                f"pi must hold K={K} and variance K*D={K * D} values, got {pi.numel()} and {variance.numel()}"
            )
        if pi.dtype != acc or variance.dtype != acc:
            raise TypeError(f"pi and variance must be {acc}, got {pi.dtype} and {variance.dtype}")
        _check_device("pi", pi, z.device)
        _check_device("variance", variance, z.device)
    assign, pcount, psq = _partials(z, labels, centroids, m, class_conditional)
    coef = torch.empty(K, D, dtype=acc, device=z.device)
    nd = triton.cdiv(D, _reduce_blocks(D, m, acc)["BLOCK_D"])
    lossp = torch.empty(K * nd, dtype=acc, device=z.device)
    loss = torch.empty((), dtype=acc, device=z.device)
    s2 = float(sigma) ** 2
    if variant_code == 1:
        if pi.numel() != K or variance.numel() != K:
            raise ValueError(f"pi and variance must hold K={K} values each, got {pi.numel()} and {variance.numel()}")
        _reduce(pcount, psq, 3, class_conditional, m, lossp=lossp)
        coef = torch.empty(K, 1, dtype=acc, device=z.device)
        _trained_finish_kernel[(1,)](
            lossp,
            pcount,
            pi.contiguous(),
            variance.contiguous(),
            coef,
            loss,
            K * nd,
            psq.shape[0],
            K,
            m,
            D,
            *_split(float(a.trained_threshold)),
            *_split(float(dataset_size) / num_classes),
            CLASS_COND=class_conditional,
            INDEX_BUG=bool(a.replicate_index_bug),
            LOG_ENTROPY=bool(a.log_entropy),
            K_PAD=_next_pow2(K),
            C_PAD=_next_pow2(K // m),
            BLOCK_P=8,
            num_warps=4,
        )
        return loss, coef, pi, variance, assign
    if variant_code == 0:
        _reduce(pcount, psq, 1, class_conditional, m, coef=coef, lossp=lossp, const=s2 + _OFFICIAL_EPS)
        _finish_kernel[(1,)](lossp, loss, lossp, lossp, K * nd, K, COPY_PI=False, BLOCK=1024)
        return loss, coef, pi, variance, assign
    in_place = update_state and pi.is_contiguous() and variance.is_contiguous()
    pi_c, var_c = pi.contiguous(), variance.contiguous()
    var_out = var_c if in_place else torch.empty_like(var_c)
    pi_new = torch.empty(K, dtype=acc, device=z.device)
    _reduce(
        pcount,
        psq,
        2,
        class_conditional,
        m,
        pi=pi_c,
        var=var_c,
        var_out=var_out,
        pi_out=pi_new,
        coef=coef,
        lossp=lossp,
        const=s2,
        dataset_size=float(dataset_size),
        scale=1.0 / D if mean_dim else 1.0,
    )
    _finish_kernel[(1,)](lossp, loss, pi_new, pi_c, K * nd, K, COPY_PI=in_place, BLOCK=1024)
    if in_place:
        return loss, coef, pi, variance, assign
    pi_out, var_out = pi_new.view(pi.shape), var_out.view(variance.shape)
    if update_state:  # a non-contiguous state: written back with a copy
        pi.copy_(pi_out)
        variance.copy_(var_out)
        return loss, coef, pi, variance, assign
    return loss, coef, pi_out, var_out, assign


def _official_trained_unfused(z, labels, centroids, pi, variance, a: KernelArgs):
    """official-trained past ``_TRAINED_TILE``: ``assign_stats`` then the variant's own math
    (``cem_fast.variants.official_trained.trained_diag``) in PyTorch."""
    from cem_fast.variants import trained_diag

    assign, counts, sqdev = assign_stats(z, labels, centroids, a.m, a.class_conditional)
    loss, coef = trained_diag(
        counts,
        sqdev,
        pi,
        variance,
        m=a.m,
        num_classes=a.num_classes,
        dataset_size=a.dataset_size,
        threshold=a.trained_threshold,
        log_entropy=a.log_entropy,
        replicate_index_bug=a.replicate_index_bug,
        class_conditional=a.class_conditional,
    )
    return loss, coef, pi, variance, assign


def _check_coef_kd(coef, z: torch.Tensor, centroids: torch.Tensor) -> None:
    _check_tensor("coef", coef, 2)
    _check_device("coef", coef, z.device)
    K, D = centroids.shape
    if coef.dtype != centroids.dtype:
        raise TypeError(f"coef must be {centroids.dtype} (the centroids' dtype), got {coef.dtype}")
    if coef.shape[0] != K or coef.shape[1] not in (1, D):
        raise ValueError(f"coef must be [K, D] = [{K}, {D}] or [K, 1], got {tuple(coef.shape)}")


@_on_z_device
def scatter_grad(
    z: torch.Tensor,
    assign: torch.Tensor,
    centroids: torch.Tensor,
    coef: torch.Tensor,
    grad_out: Optional[torch.Tensor] = None,
    factor: float = 1.0,
) -> torch.Tensor:
    """``dz[i] = factor * grad_out * coef[a_i] * (z_i - mu[a_i])`` in ``z``'s dtype, one kernel.

    ``coef`` is ``[K, D]`` or ``[K, 1]`` (broadcast in the kernel); ``grad_out`` an optional 0-dim tensor
    (the loss's upstream gradient) read inside the kernel, so the backward needs no other op.
    """
    _check_z(z)
    _check_centroids(centroids, z)
    _check_assign(assign, z)
    _check_coef_kd(coef, z, centroids)
    if grad_out is not None:
        if not isinstance(grad_out, torch.Tensor) or grad_out.numel() != 1:
            raise ValueError("grad_out must be None or a one-element tensor")
        _check_device("grad_out", grad_out, z.device)
    B, D = z.shape
    K = centroids.shape[0]
    dz = torch.empty(B, D, dtype=z.dtype, device=z.device)
    if B == 0:
        return dz
    block_d = min(128, max(16, _next_pow2(D)))
    block_b = max(1, 2048 // block_d)
    stride_kd = 0 if coef.shape[1] == 1 else coef.stride(1)
    assign = assign.contiguous()  # the kernel reads assign[i] at assign_ptr + i
    _scatter_grad_kernel[(triton.cdiv(B, block_b), triton.cdiv(D, block_d))](
        z,
        assign,
        centroids,
        coef,
        coef if grad_out is None else grad_out,
        dz,
        float(factor),
        B,
        D,
        K,
        z.stride(0),
        z.stride(1),
        centroids.stride(0),
        centroids.stride(1),
        coef.stride(0),
        stride_kd,
        HAS_GOUT=grad_out is not None,
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return dz


# --------------------------------------------------------------------------- full covariance

_DD_BLOCK = 32  # D tile of the second-moment blocks (tl.dot needs >= 16)
_ROW_BLOCK = 16


def _full_cov_blocks(D: int, acc: torch.dtype) -> tuple[dict, dict]:
    """Tiles of ``_second_moments_kernel`` and ``_matrix_grad_kernel``. fp64 has no ``tl.dot`` path, and its
    broadcast products get smaller tiles so that nothing spills (ptxas -v, sm_90)."""
    f64 = acc == torch.float64
    moments = dict(BLOCK_R=4 if f64 else _ROW_BLOCK, BLOCK_DD=_DD_BLOCK, USE_DOT=not f64)
    # fp32 (16, 64, 32) spills with Triton 3.6 (254 registers); (16, 32, 16) needs ~150 with 3.6 and 3.8
    grad = dict(BLOCK_R=_ROW_BLOCK, BLOCK_N=min(32, max(16, _next_pow2(D))), BLOCK_KD=8 if f64 else 16, USE_DOT=not f64)
    return moments, grad


@_on_z_device
def cluster_second_moments(
    z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, K: Optional[int] = None
) -> torch.Tensor:
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
    if B == 0:
        return torch.zeros(K, D, D, dtype=centroids.dtype, device=z.device)
    out = torch.empty(K, D, D, dtype=centroids.dtype, device=z.device)  # the kernel writes every block
    perm, starts = _segments(assign, K)
    nb = triton.cdiv(D, _DD_BLOCK)
    _second_moments_kernel[(K, nb, nb)](
        z,
        centroids,
        perm,
        starts,
        out,
        D,
        z.stride(0),
        z.stride(1),
        centroids.stride(0),
        centroids.stride(1),
        **_full_cov_blocks(D, centroids.dtype)[0],
        num_warps=4,
    )
    return out


@_on_z_device
def matrix_grad(
    z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, coef: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
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
    dz = torch.empty(B, D, dtype=z.dtype, device=z.device)  # every row is written (zeros outside clusters)
    if B == 0:
        return dz
    perm, starts = _segments(assign, K)
    blocks = _full_cov_blocks(D, centroids.dtype)[1]
    _matrix_grad_kernel[(K + 1, triton.cdiv(D, blocks["BLOCK_N"]))](
        z,
        centroids,
        coef,
        perm,
        starts,
        dz,
        *_split(float(scale)),
        D,
        z.stride(0),
        z.stride(1),
        centroids.stride(0),
        centroids.stride(1),
        **blocks,
        num_warps=4,
    )
    return dz


def second_moments_grad(
    z: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor, grad_moments: torch.Tensor
) -> torch.Tensor:
    """Backward of ``cluster_second_moments`` for a symmetric upstream gradient ``G [K, D, D]``:
    ``dz[i] = 2 * G[a_i] @ (z_i - mu[a_i])``."""
    return matrix_grad(z, assign, centroids, grad_moments, scale=2.0)
