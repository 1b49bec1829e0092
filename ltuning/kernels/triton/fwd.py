"""Forward Triton kernel of shared-prefix attention (FlashAttention-2 structure; GQA group optionally packed into
the query tile, constexpr ``PACK_GQA``).

Two tilings of the query rows, chosen by the launcher (one kernel, constexpr branches):

* ``PACK_GQA = False`` (one program per query head, the classic layout): grid ``(B * Hq, cdiv(Lq, BLOCK_M))``; a
  program owns ``BLOCK_M`` positions of one (sequence ``b``, query head ``h``) and reads K/V of KV head
  ``h // GROUP``.
* ``PACK_GQA = True``: grid ``(B * Hkv, cdiv(Lq * GROUP, BLOCK_M))``; a program owns ``BLOCK_M`` packed rows of one
  (sequence ``b``, KV head ``hk``); packed row ``r`` (``0 <= r < Lq_b * GROUP``) is

      query position  i = r // GROUP   of query head   h = hk * GROUP + r % GROUP      (GROUP = Hq // Hkv)

  (position-major, as the CPU kernel; FlashAttention-3's PackGQA). q is loaded and o / lse are stored through
  per-row offsets ``(r % GROUP) * s_h + (r // GROUP) * s_m``; the causal mask, the key-padding mask and the
  "past Lq_b" bound use the position ``i``.

The large grid axis comes first (axes 1 and 2 are capped at 65535); row blocks run last-first so the heaviest
causal blocks start first. The program streams first the ``P`` prefix keys of bank entry ``prefix_idx[b]`` (read
straight from the shared bank: no per-sequence copy; only its first ``prefix_lengths[prefix_idx[b]]`` when lengths
are given), then the sequence's own keys of its KV head, with an online softmax in exp2 and fp32 accumulators::

    m' = max(m, rowmax s2);  l = l * 2^(m - m') + rowsum 2^(s2 - m');  acc = acc * 2^(m - m') + 2^(s2 - m') @ v~
    o = acc / l,  lse = (m + log2 l) / log2 e      (rows with l = 0: o = 0, lse = -inf)

where ``s2 = softmax_scale * log2(e) * s_j * q.k_j (+ log2(e) * prefix_bias[e, j])`` and ``v~_j = s_j v_j``
(``s_j = 1`` and no bias off the prefix; the bias only with ``HAS_PBIAS``).
Sequence tiles fully inside the key range and the causal band of the tile's positions skip the bound / causal
masks (the short prefix always takes the masked path).

When to pack (:func:`ltuning.kernels.triton.prefix_attention.pack_gqa`): ``PACK_GQA = GROUP > 1 and Lq <= 64``
(varlen: ``max_seqlen``). With short queries one program per query head holds a single, mostly empty tile (the
tuned tiles have 64 or 128 rows; one-pass label scoring has ``Lq ~ 12``, ``GROUP = 3``, a ~970-key bank: 12 live
rows of 64) and reads every bank / K / V tile ``GROUP`` times, once per query head of the group; packed, one
program per KV head reads each tile once for the group and fills ``GROUP * Lq`` rows (36). Past 64 positions the
per-head tiles are full anyway: packing would still read each K/V tile as often (same number of programs x tiles)
and only shrink the causal diagonal band by ``GROUP``, while its per-row position / head vectors stay live through
the key loops and raise register pressure -- ptxas spills in configurations that are spill-free unpacked (head dim
128, long-sequence training; measured offline, GPU speed unmeasured: :mod:`ltuning.kernels.triton.configs`). So
long queries keep the classic tiling, whose code (and register / spill profile) is the one before packing.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (LOG2E, key_bias2, key_scale, load_rows, load_tile, mask_scores, packed_rows, prefix_len,
                     seq_bounds, seq_key_range, store_rows, store_tile)
from .configs import autotune


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, s_kn, s_kd, s_vn, s_vd, KPM, s_mn, SC, s_sc, PB,
               lo, hi, n_keys, pos, shift, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Online-softmax update of ``(acc, m_i, l_i)`` with key blocks ``[lo, hi)`` of one key source; ``pos`` is
    the query position of each row (causal mask). ``HAS_BIAS``: key column ``j`` gains ``PB[j] * log2 e``."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(K, offs_n, n_keys, s_kn, s_kd, HEAD_DIM, D_PAD).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if HAS_SCALE:
            sc = key_scale(SC, offs_n, n_keys, s_sc)
            s = s * (qk_scale * sc)[None, :]
        else:
            s = s * qk_scale
        if HAS_BIAS:
            s = s + key_bias2(PB, offs_n, n_keys)[None, :]
        s = mask_scores(s, pos, offs_n, n_keys, shift, KPM, s_mn, MASKED, CAUSAL, HAS_KPM)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_SCALE:
            p = p * sc[None, :]
        v = load_rows(V, offs_n, n_keys, s_vn, s_vd, HEAD_DIM, D_PAD).to(q.dtype)
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@autotune("fwd")
@triton.jit
def fwd_kernel(
    Q, K, V, BANK_K, BANK_V, IDX, PLEN, PBIAS, KPM, SCALE, CU, O, LSE,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_bkn, s_bkh, s_bkp, s_bkd, s_bvn, s_bvh, s_bvp, s_bvd, s_mb, s_mn, s_sb, s_sp,
    s_ob, s_oh, s_om, s_od, s_lb, s_lh, s_lm,
    Hgrid, Lq, Lk, P, qk_scale, LEN_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_PREFIX: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SCALE: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_PLEN: tl.constexpr, HAS_PBIAS: tl.constexpr, DOT_PREC: tl.constexpr, PACK_GQA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """o and lse of one tile. ``PACK_GQA``: ``BLOCK_M`` packed rows of (sequence b, KV head hk), i.e. rows
    ``(i, h)`` with ``h`` in ``hk * GROUP + [0, GROUP)``, grid ``(B * Hkv, cdiv(Lq * GROUP, BLOCK_M))``; otherwise
    ``BLOCK_M`` positions of (sequence b, query head h), grid ``(B * Hq, cdiv(Lq, BLOCK_M))``. ``Hgrid`` is the
    head count of grid axis 0 (Hkv or Hq). ``LEN_BUCKET`` is only an autotune key.

    ``HAS_PLEN``: entry ``e`` holds ``prefix_len(PLEN, e, P)`` real tokens; only those are streamed (the rest are
    masked like keys past the end of the bank). ``HAS_PBIAS``: prefix column ``j`` of entry ``e`` gains the
    logit ``PBIAS[e * P + j]`` (contiguous float32 (N, P)), in log2 units ``* log2 e``; lse includes it.
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest causal blocks first
    b = pid_bh // Hgrid
    if PACK_GQA:
        hk = pid_bh % Hgrid
        h = hk * GROUP  # first query head of the group
    else:
        h = pid_bh % Hgrid
        hk = h // GROUP
    row0, Lq_b, Lk_b = seq_bounds(CU, b, Lq, Lk, IS_VARLEN)
    if PACK_GQA:
        n_rows = Lq_b * GROUP
    else:
        n_rows = Lq_b
    start_m = pid_m * BLOCK_M
    if start_m < n_rows:
        b64 = b.to(tl.int64)
        if PACK_GQA:
            pos, g = packed_rows(start_m, GROUP, BLOCK_M)
            live = pos < Lq_b
            q = load_tile(Q + b64 * s_qb + h * s_qh + row0 * s_qm, g * s_qh + pos * s_qm, live, s_qd,
                          HEAD_DIM, D_PAD)
        else:
            pos = start_m + tl.arange(0, BLOCK_M)
            q = load_rows(Q + b64 * s_qb + h * s_qh + row0 * s_qm, pos, Lq_b, s_qm, s_qd, HEAD_DIM, D_PAD)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        shift = Lk_b - Lq_b
        if HAS_PREFIX:
            e = tl.load(IDX + b).to(tl.int64)
            bk = BANK_K + e * s_bkn + hk * s_bkh
            bv = BANK_V + e * s_bvn + hk * s_bvh
            sc = SCALE + b64 * s_sb
            n_pre = prefix_len(PLEN, e, P, HAS_PLEN)
            acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, bk, bv, s_bkp, s_bkd, s_bvp, s_bvd, KPM, s_mn, sc, s_sp,
                                       PBIAS + e * P, 0, n_pre, n_pre, pos, shift, qk_scale, True, False, False,
                                       HAS_SCALE, HAS_PBIAS, HEAD_DIM, D_PAD, BLOCK_N, DOT_PREC)
        full, hi = seq_key_range(start_m, Lk_b, shift, GROUP if PACK_GQA else 1, BLOCK_M, BLOCK_N, CAUSAL)
        kk = K + b64 * s_kb + hk * s_kh + row0 * s_kn
        vv = V + b64 * s_vb + hk * s_vh + row0 * s_vn
        kpm = KPM + b64 * s_mb
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, kk, vv, s_kn, s_kd, s_vn, s_vd, kpm, s_mn, SCALE, s_sp,
                                   PBIAS, 0, full, Lk_b, pos, shift, qk_scale, False, CAUSAL, HAS_KPM, False, False,
                                   HEAD_DIM, D_PAD, BLOCK_N, DOT_PREC)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, kk, vv, s_kn, s_kd, s_vn, s_vd, kpm, s_mn, SCALE, s_sp,
                                   PBIAS, full, hi, Lk_b, pos, shift, qk_scale, True, CAUSAL, HAS_KPM, False, False,
                                   HEAD_DIM, D_PAD, BLOCK_N, DOT_PREC)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        lse = (m_i + tl.math.log2(l_safe)) / LOG2E
        if PACK_GQA:
            store_tile(O + b64 * s_ob + h * s_oh + row0 * s_om, o, g * s_oh + pos * s_om, live, s_od,
                       HEAD_DIM, D_PAD)
            tl.store(LSE + b64 * s_lb + h * s_lh + row0 * s_lm + g * s_lh + pos * s_lm, lse, mask=live)
        else:
            store_rows(O + b64 * s_ob + h * s_oh + row0 * s_om, o, pos, Lq_b, s_om, s_od, HEAD_DIM, D_PAD)
            tl.store(LSE + b64 * s_lb + h * s_lh + (row0 + pos) * s_lm, lse, mask=pos < Lq_b)
