"""Backward Triton kernels of shared-prefix attention (FlashAttention-2 structure, deterministic, no atomics).

With ``R = softmax_scale * q k^T``, scores ``S_ij = s_j R_ij (+ prefix_bias_j)``, ``P = softmax(S)`` (recomputed
from the saved lse, bias included), ``E = dO v^T`` and ``Delta_i = rowsum(dO_i * O_i) - dlse_i``::

    dS = P * (s_j E - Delta)             dq_i = softmax_scale * sum_j dS_ij s_j k_j
    dk_j = softmax_scale * s_j * sum_i dS_ij q_i       dv_j = s_j * sum_i P_ij dO_i
    ds_j = sum_i (dS_ij R_ij + P_ij E_ij)               (prefix keys only; s_j = 1 elsewhere)

The bias (constexpr ``HAS_PBIAS``, prefix keys only) is a constant: it changes P and nothing else, and gets no
gradient.

Kernels: ``preprocess_kernel`` (Delta, a program per query head and block of positions), ``dq_kernel`` (the
forward's tiling, same ``PACK_GQA`` decision: a program per (sequence, query head, block of positions), or with
``PACK_GQA`` per (sequence, KV head, block of packed rows) -- packed row ``r`` is position ``r // GROUP`` of query
head ``hk * GROUP + r % GROUP``, see :mod:`ltuning.kernels.triton.fwd` -- that loops over prefix + sequence keys),
``dkdv_seq_kernel`` (a program per sequence key block and KV head, sums the GROUP query heads and every
query block that can see it: the non-causal case loops over all of them), ``dkdv_prefix_kernel`` (Hydragen
style: a program per (bank entry, KV head, prefix key block, split) folds the queries of every sequence that uses
the entry, taken from a permutation of the sequences sorted by ``prefix_idx``; it writes fp32 partial sums per
split that the host adds in a fixed order, plus ``ds`` per (sequence, KV head) summed over heads on the host).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (key_bias2, key_scale, load_lse2, load_rows, load_tile, mask_scores, packed_rows, prefix_len,
                     seq_bounds, seq_key_range, store_rows, store_tile)
from .configs import autotune


@triton.jit
def preprocess_kernel(O, DO, DLSE, CU, DELTA, s_ob, s_oh, s_om, s_od, s_db, s_dh, s_dm, s_dd,
                      s_gb, s_gh, s_gm, s_lb, s_lh, s_lm, Hq, Lq,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_DLSE: tl.constexpr,
                      IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """``Delta[b, h, rows] = rowsum(dO * O) - dlse`` in fp32; grid ``(B * Hq, cdiv(Lq, BLOCK_M))``."""
    b = tl.program_id(0) // Hq
    h = tl.program_id(0) % Hq
    row0, Lq_b, _ = seq_bounds(CU, b, Lq, Lq, IS_VARLEN)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    b64 = b.to(tl.int64)
    o = load_rows(O + b64 * s_ob + h * s_oh + row0 * s_om, offs_m, Lq_b, s_om, s_od, HEAD_DIM, D_PAD)
    do = load_rows(DO + b64 * s_db + h * s_dh + row0 * s_dm, offs_m, Lq_b, s_dm, s_dd, HEAD_DIM, D_PAD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = (row0 + offs_m).to(tl.int64)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b64 * s_gb + h * s_gh + rows * s_gm, mask=offs_m < Lq_b, other=0.0).to(tl.float32)
    tl.store(DELTA + b64 * s_lb + h * s_lh + rows * s_lm, delta, mask=offs_m < Lq_b)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, K, V, s_kn, s_kd, s_vn, s_vd, KPM, s_mn, SC, s_sc, PB,
              lo, hi, n_keys, pos, shift, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SCALE: tl.constexpr,
              HAS_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """``dq += dS @ (s k)`` (unscaled by softmax_scale) over key blocks ``[lo, hi)`` of one key source; ``pos``
    is the query position of each row (causal mask). ``HAS_BIAS``: key column ``j`` gains ``PB[j] * log2 e``
    (P is recomputed with the bias the forward's lse includes)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(K, offs_n, n_keys, s_kn, s_kd, HEAD_DIM, D_PAD).to(q.dtype)
        v = load_rows(V, offs_n, n_keys, s_vn, s_vd, HEAD_DIM, D_PAD).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if HAS_SCALE:
            sc = key_scale(SC, offs_n, n_keys, s_sc)
            s = s * (qk_scale * sc)[None, :]
            dp = dp * sc[None, :]
        else:
            s = s * qk_scale
        if HAS_BIAS:
            s = s + key_bias2(PB, offs_n, n_keys)[None, :]
        s = mask_scores(s, pos, offs_n, n_keys, shift, KPM, s_mn, MASKED, CAUSAL, HAS_KPM)
        ds = tl.math.exp2(s - lse2[:, None]) * (dp - delta[:, None])
        if HAS_SCALE:
            ds = ds * sc[None, :]
        dq = tl.dot(ds.to(q.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@autotune("dq")
@triton.jit
def dq_kernel(
    Q, K, V, BANK_K, BANK_V, IDX, PLEN, PBIAS, KPM, SCALE, CU, DO, LSE, DELTA, DQ,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_bkn, s_bkh, s_bkp, s_bkd, s_bvn, s_bvh, s_bvp, s_bvd, s_mb, s_mn, s_sb, s_sp,
    s_db, s_dh, s_dm, s_dd, s_lb, s_lh, s_lm, s_gb, s_gh, s_gm, s_gd,
    Hgrid, Lq, Lk, P, sm_scale, qk_scale, LEN_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SCALE: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_PLEN: tl.constexpr, HAS_PBIAS: tl.constexpr, DOT_PREC: tl.constexpr, PACK_GQA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq of one tile; same tiles (``PACK_GQA``: packed rows of (sequence b, KV head hk), grid
    ``(B * Hkv, cdiv(Lq * GROUP, BLOCK_M))``; otherwise positions of (sequence b, query head h), grid
    ``(B * Hq, cdiv(Lq, BLOCK_M))``; ``Hgrid`` = Hkv or Hq), key traversal and masks as the forward kernel.

    Packed: q, dO, lse and Delta rows are loaded and dq rows stored through the per-row offsets
    ``(r % GROUP) * s_h + (r // GROUP) * s_m`` from the group's first query head ``hk * GROUP``.
    """
    b = tl.program_id(0) // Hgrid
    if PACK_GQA:
        hk = tl.program_id(0) % Hgrid
        h = hk * GROUP  # first query head of the group
    else:
        h = tl.program_id(0) % Hgrid
        hk = h // GROUP
    row0, Lq_b, Lk_b = seq_bounds(CU, b, Lq, Lk, IS_VARLEN)
    if PACK_GQA:
        n_rows = Lq_b * GROUP
    else:
        n_rows = Lq_b
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # heaviest causal blocks first
    if start_m < n_rows:
        b64 = b.to(tl.int64)
        if PACK_GQA:
            pos, g = packed_rows(start_m, GROUP, BLOCK_M)
            live = pos < Lq_b
            q = load_tile(Q + b64 * s_qb + h * s_qh + row0 * s_qm, g * s_qh + pos * s_qm, live, s_qd,
                          HEAD_DIM, D_PAD)
            do = load_tile(DO + b64 * s_db + h * s_dh + row0 * s_dm, g * s_dh + pos * s_dm, live, s_dd,
                           HEAD_DIM, D_PAD).to(q.dtype)
            l_base = b64 * s_lb + h * s_lh + row0 * s_lm
            l_off = g * s_lh + pos * s_lm
            lse2 = load_lse2(LSE + l_base, l_off, live)
            delta = tl.load(DELTA + l_base + l_off, mask=live, other=0.0)
        else:
            pos = start_m + tl.arange(0, BLOCK_M)
            q = load_rows(Q + b64 * s_qb + h * s_qh + row0 * s_qm, pos, Lq_b, s_qm, s_qd, HEAD_DIM, D_PAD)
            do = load_rows(DO + b64 * s_db + h * s_dh + row0 * s_dm, pos, Lq_b, s_dm, s_dd, HEAD_DIM, D_PAD)
            do = do.to(q.dtype)
            lse_base = LSE + b64 * s_lb + h * s_lh + row0 * s_lm
            lse2 = load_lse2(lse_base, pos * s_lm, pos < Lq_b)
            delta_ptrs = DELTA + b64 * s_lb + h * s_lh + (row0 + pos) * s_lm
            delta = tl.load(delta_ptrs, mask=pos < Lq_b, other=0.0)
        dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        shift = Lk_b - Lq_b
        if HAS_PREFIX:
            e = tl.load(IDX + b).to(tl.int64)
            bk = BANK_K + e * s_bkn + hk * s_bkh
            bv = BANK_V + e * s_bvn + hk * s_bvh
            sc = SCALE + b64 * s_sb
            n_pre = prefix_len(PLEN, e, P, HAS_PLEN)
            dq = _dq_tiles(dq, q, do, lse2, delta, bk, bv, s_bkp, s_bkd, s_bvp, s_bvd, KPM, s_mn, sc, s_sp,
                           PBIAS + e * P, 0, n_pre, n_pre, pos, shift, qk_scale, True, False, False, HAS_SCALE,
                           HAS_PBIAS, HEAD_DIM, D_PAD, BLOCK_N, DOT_PREC)
        full, hi = seq_key_range(start_m, Lk_b, shift, GROUP if PACK_GQA else 1, BLOCK_M, BLOCK_N, CAUSAL)
        kk = K + b64 * s_kb + hk * s_kh + row0 * s_kn
        vv = V + b64 * s_vb + hk * s_vh + row0 * s_vn
        kpm = KPM + b64 * s_mb
        dq = _dq_tiles(dq, q, do, lse2, delta, kk, vv, s_kn, s_kd, s_vn, s_vd, kpm, s_mn, SCALE, s_sp, PBIAS,
                       0, full, Lk_b, pos, shift, qk_scale, False, CAUSAL, HAS_KPM, False, False,
                       HEAD_DIM, D_PAD, BLOCK_N, DOT_PREC)
        dq = _dq_tiles(dq, q, do, lse2, delta, kk, vv, s_kn, s_kd, s_vn, s_vd, kpm, s_mn, SCALE, s_sp, PBIAS,
                       full, hi, Lk_b, pos, shift, qk_scale, True, CAUSAL, HAS_KPM, False, False,
                       HEAD_DIM, D_PAD, BLOCK_N, DOT_PREC)
        if PACK_GQA:
            store_tile(DQ + b64 * s_gb + h * s_gh + row0 * s_gm, dq * sm_scale, g * s_gh + pos * s_gm, live, s_gd,
                       HEAD_DIM, D_PAD)
        else:
            store_rows(DQ + b64 * s_gb + h * s_gh + row0 * s_gm, dq * sm_scale, pos, Lq_b, s_gm, s_gd,
                       HEAD_DIM, D_PAD)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, s_qm, s_qd, s_dm, s_dd, s_lm,
                lo, hi, n_q, offs_n, shift, qk_scale,
                MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """``dv += P^T dO``, ``dk += dS^T q`` over query blocks ``[lo, hi)``; ``MASKED`` applies ``j <= i + shift``."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_rows(Q, offs_m, n_q, s_qm, s_qd, HEAD_DIM, D_PAD)
        do = load_rows(DO, offs_m, n_q, s_dm, s_dd, HEAD_DIM, D_PAD).to(q.dtype)
        lse2 = load_lse2(LSE, offs_m * s_lm, offs_m < n_q)
        delta = tl.load(DELTA + offs_m * s_lm, mask=offs_m < n_q, other=0.0)
        pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse2[None, :])
        if MASKED:
            pt = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, pt, 0.0)
        dv = tl.dot(pt.to(q.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dk = tl.dot((pt * (dpt - delta[None, :])).to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@autotune("dkdv")
@triton.jit
def dkdv_seq_kernel(
    Q, K, V, KPM, CU, DO, LSE, DELTA, DK, DV,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_mb, s_mn,
    s_db, s_dh, s_dm, s_dd, s_lb, s_lh, s_lm, s_gb, s_gh, s_gn, s_gd,
    Hkv, Lq, Lk, sm_scale, qk_scale, LEN_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv of one sequence key block of KV head ``hk``; grid ``(B * Hkv, cdiv(Lk, BLOCK_N))``.

    Padded keys get exactly zero (their column of P is zero), applied once at the end.
    """
    b = tl.program_id(0) // Hkv
    hk = tl.program_id(0) % Hkv
    row0, Lq_b, Lk_b = seq_bounds(CU, b, Lq, Lk, IS_VARLEN)
    start_n = tl.program_id(1) * BLOCK_N
    if start_n < Lk_b:
        b64 = b.to(tl.int64)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(K + b64 * s_kb + hk * s_kh + row0 * s_kn, offs_n, Lk_b, s_kn, s_kd, HEAD_DIM, D_PAD)
        v = load_rows(V + b64 * s_vb + hk * s_vh + row0 * s_vn, offs_n, Lk_b, s_vn, s_vd, HEAD_DIM, D_PAD)
        dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        shift = Lk_b - Lq_b
        if CAUSAL:
            lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
            full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        else:
            lo = 0
            full = 0
        for g in range(GROUP):
            h = hk * GROUP + g
            qq = Q + b64 * s_qb + h * s_qh + row0 * s_qm
            dd = DO + b64 * s_db + h * s_dh + row0 * s_dm
            row_off = b64 * s_lb + h * s_lh + row0 * s_lm
            ll = LSE + row_off
            de = DELTA + row_off
            dk, dv = _dkdv_tiles(dk, dv, k, v, qq, dd, ll, de, s_qm, s_qd, s_dm, s_dd, s_lm,
                                 lo, full, Lq_b, offs_n, shift, qk_scale, True, HEAD_DIM, D_PAD, BLOCK_M, DOT_PREC)
            dk, dv = _dkdv_tiles(dk, dv, k, v, qq, dd, ll, de, s_qm, s_qd, s_dm, s_dd, s_lm,
                                 full, Lq_b, Lq_b, offs_n, shift, qk_scale, False, HEAD_DIM, D_PAD, BLOCK_M,
                                 DOT_PREC)
        if HAS_KPM:
            real = tl.load(KPM + b64 * s_mb + offs_n * s_mn, mask=offs_n < Lk_b, other=0) != 0
            dk = tl.where(real[:, None], dk, 0.0)
            dv = tl.where(real[:, None], dv, 0.0)
        store_rows(DK + b64 * s_gb + hk * s_gh + row0 * s_gn, dk * sm_scale, offs_n, Lk_b, s_gn, s_gd,
                   HEAD_DIM, D_PAD)
        store_rows(DV + b64 * s_gb + hk * s_gh + row0 * s_gn, dv, offs_n, Lk_b, s_gn, s_gd, HEAD_DIM, D_PAD)


@autotune("dkdv")
@triton.jit
def dkdv_prefix_kernel(
    Q, BANK_K, BANK_V, PLEN, PBIAS, SCALE, CU, DO, LSE, DELTA, PERM, SEG, DBK, DBV, DSC,
    s_qb, s_qh, s_qm, s_qd, s_bkn, s_bkh, s_bkp, s_bkd, s_bvn, s_bvh, s_bvp, s_bvd, s_sb, s_sp,
    s_db, s_dh, s_dm, s_dd, s_lb, s_lh, s_lm, s_gs, s_gn, s_gh, s_gp, s_gd, s_cb, s_ch, s_cp,
    Hkv, Lq, P, SPLIT, sm_scale, qk_scale, LEN_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_SCALE: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_PLEN: tl.constexpr, HAS_PBIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial d(bank) of one (entry, KV head, prefix key block) over split ``pid 2`` of the entry's sequences.

    Grid ``(N * Hkv, cdiv(P, BLOCK_N), SPLIT)``. Sequences ``PERM[SEG[e]:SEG[e+1]]`` use entry ``e``; split ``t``
    takes the ``t``-th of ``SPLIT`` equal chunks. Writes ``DBK/DBV[t, e, hk, keys]`` (fp32, zero for empty
    chunks) and ``DSC[b, hk, keys]`` for each of its sequences ``b``. The prefix is visible to every query, up to
    the entry's length ``n_pre`` with ``HAS_PLEN``: columns ``>= n_pre`` get zero probability, hence exactly zero
    dk, dv, ds (still stored), and a block entirely past ``n_pre`` skips the query loop. ``HAS_PBIAS``: key
    ``j`` of the entry gains the logit ``PBIAS[e * P + j]`` (log2 units ``* log2 e``) in the recomputed P; the
    bias is a constant, so dS, dk, dv and ds keep their form.
    """
    e = tl.program_id(0) // Hkv
    hk = tl.program_id(0) % Hkv
    split = tl.program_id(2)
    seg_lo = tl.load(SEG + e)
    chunk = tl.cdiv(tl.load(SEG + e + 1) - seg_lo, SPLIT)
    lo = seg_lo + split * chunk
    hi = tl.minimum(lo + chunk, tl.load(SEG + e + 1))
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    e64 = e.to(tl.int64)
    n_pre = prefix_len(PLEN, e64, P, HAS_PLEN)
    k = load_rows(BANK_K + e64 * s_bkn + hk * s_bkh, offs_n, n_pre, s_bkp, s_bkd, HEAD_DIM, D_PAD)
    v = load_rows(BANK_V + e64 * s_bvn + hk * s_bvh, offs_n, n_pre, s_bvp, s_bvd, HEAD_DIM, D_PAD)
    k = k.to(Q.dtype.element_ty)
    v = v.to(Q.dtype.element_ty)
    if HAS_PLEN:
        live = offs_n < n_pre
    if HAS_PBIAS:
        pb2 = key_bias2(PBIAS + e64 * P, offs_n, n_pre)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for t in range(lo, hi):
        b64 = tl.load(PERM + t).to(tl.int64)
        row0, Lq_b, _ = seq_bounds(CU, b64, Lq, Lq, IS_VARLEN)
        if HAS_PLEN:
            m_hi = tl.where(start_n < n_pre, Lq_b, 0)  # a block past the entry's length gets zeros only
        else:
            m_hi = Lq_b
        if HAS_SCALE:
            sc = key_scale(SCALE + b64 * s_sb, offs_n, n_pre, s_sp)
            dsc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g in range(GROUP):
            h = hk * GROUP + g
            qq = Q + b64 * s_qb + h * s_qh + row0 * s_qm
            dd = DO + b64 * s_db + h * s_dh + row0 * s_dm
            row_off = b64 * s_lb + h * s_lh + row0 * s_lm
            for start_m in range(0, m_hi, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                q = load_rows(qq, offs_m, Lq_b, s_qm, s_qd, HEAD_DIM, D_PAD)
                do = load_rows(dd, offs_m, Lq_b, s_dm, s_dd, HEAD_DIM, D_PAD).to(q.dtype)
                lse2 = load_lse2(LSE + row_off, offs_m * s_lm, offs_m < Lq_b)
                delta = tl.load(DELTA + row_off + offs_m * s_lm, mask=offs_m < Lq_b, other=0.0)
                rt = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
                et = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                if HAS_SCALE:
                    st = rt * (qk_scale * sc)[:, None]
                else:
                    st = rt * qk_scale
                if HAS_PBIAS:
                    st = st + pb2[:, None]
                pt = tl.math.exp2(st - lse2[None, :])
                if HAS_PLEN:
                    pt = tl.where(live[:, None], pt, 0.0)
                if HAS_SCALE:
                    dst = pt * (et * sc[:, None] - delta[None, :])
                    dsc += tl.sum(dst * rt * sm_scale + pt * et, 1)
                    pt = pt * sc[:, None]
                    dst = dst * sc[:, None]
                else:
                    dst = pt * (et - delta[None, :])
                dv = tl.dot(pt.to(q.dtype), do, dv, input_precision=DOT_PREC)
                dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
        if HAS_SCALE:
            tl.store(DSC + b64 * s_cb + hk * s_ch + offs_n * s_cp, dsc, mask=offs_n < P)
    base = split.to(tl.int64) * s_gs + e64 * s_gn + hk * s_gh
    store_rows(DBK + base, dk * sm_scale, offs_n, P, s_gp, s_gd, HEAD_DIM, D_PAD)
    store_rows(DBV + base, dv, offs_n, P, s_gp, s_gd, HEAD_DIM, D_PAD)
