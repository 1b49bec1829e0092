"""Triton helpers shared by the forward and backward shared-prefix attention kernels.

Scores live in log2 units: ``s2 = (softmax_scale * log2 e) * q.k`` (times the prefix scale), so softmax uses
``exp2``. A query row's ``lse`` is stored in natural log; the backward reloads it as ``lse2 = lse * log2 e``
with ``+inf`` for rows that see no key, which makes every probability of such a row ``exp2(-inf) = 0``.
The optional prefix bias (an additive natural-log logit) enters the log2 scores as ``bias * log2 e``
(:func:`key_bias2`), after the softmax / prefix scale, so the saved lse includes it.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def seq_bounds(CU, b, Lq, Lk, IS_VARLEN: tl.constexpr):
    """``(row0, Lq_b, Lk_b)``: first packed row of sequence ``b`` and its query / key lengths."""
    if IS_VARLEN:
        start = tl.load(CU + b)
        n = tl.load(CU + b + 1) - start
        return start.to(tl.int64), n, n
    else:
        return (b * 0).to(tl.int64), Lq, Lk


@triton.jit
def prefix_len(PLEN, e, P, HAS_PLEN: tl.constexpr):
    """Real length of bank entry ``e``: ``PLEN[e]`` clamped to ``[0, P]`` with ``HAS_PLEN``, else ``P``."""
    if HAS_PLEN:
        return tl.minimum(tl.maximum(tl.load(PLEN + e).to(tl.int32), 0), P)
    else:
        return P


@triton.jit
def seq_key_range(start_r, Lk_b, shift, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):
    """``(full, hi)`` for packed rows ``[start_r, start_r + BLOCK_M)``: sequence keys ``[0, full)`` are visible to
    every row (no bound / causal mask), ``[full, hi)`` need the masks, keys ``>= hi`` are seen by no row.

    The rows cover positions ``[p_lo, p_hi] = [start_r // GROUP, (start_r + BLOCK_M - 1) // GROUP]``; causally
    position ``i`` sees ``j <= i + shift``, so ``hi = min(Lk_b, p_hi + 1 + shift)`` and ``full`` is
    ``p_lo + shift + 1`` rounded down to a multiple of ``BLOCK_N`` (both clipped to ``[0, Lk_b]``).
    """
    if CAUSAL:
        if GROUP == 1:  # unpacked rows (PACK_GQA = False): the expressions of the classic kernel
            hi = tl.minimum(Lk_b, start_r + BLOCK_M + shift)
            full = tl.minimum(tl.maximum(start_r + shift + 1, 0) // BLOCK_N, Lk_b // BLOCK_N) * BLOCK_N
        else:
            hi = tl.minimum(Lk_b, (start_r + BLOCK_M - 1) // GROUP + 1 + shift)
            full = tl.minimum(tl.maximum(start_r // GROUP + shift + 1, 0) // BLOCK_N, Lk_b // BLOCK_N) * BLOCK_N
    else:
        hi = Lk_b
        full = (Lk_b // BLOCK_N) * BLOCK_N
    return full, hi


@triton.jit
def packed_rows(start_r, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(pos, g)`` of packed rows ``r = start_r + arange(BLOCK_M)``: ``pos = r // GROUP``, ``g = r % GROUP``.

    Packed row ``r`` of KV head ``hk`` is query position ``pos`` of query head ``hk * GROUP + g`` (position-major,
    so a tile reads each K/V tile once for the whole group; ``GROUP = 1`` gives ``pos = r``, ``g = 0``).
    """
    r = start_r + tl.arange(0, BLOCK_M)
    return r // GROUP, r % GROUP


@triton.jit
def _tile_mask(live, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """In-bounds mask of a (len(live), D_PAD) tile; the head-dim test is compiled only when D is padded."""
    if HEAD_DIM == D_PAD:
        return live[:, None]
    else:
        return live[:, None] & (tl.arange(0, D_PAD) < HEAD_DIM)[None, :]


@triton.jit
def load_tile(base, row_off, live, s_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Tile ``x[r, d] = base[row_off[r] + d * s_d]`` of shape (len(row_off), D_PAD); zero where ``live[r]`` is
    false or ``d >= HEAD_DIM``. ``base`` holds the 64-bit offsets; ``row_off`` (per-row pointers) is 32-bit."""
    ptrs = base + row_off[:, None] + tl.arange(0, D_PAD)[None, :] * s_d
    return tl.load(ptrs, mask=_tile_mask(live, HEAD_DIM, D_PAD), other=0.0)


@triton.jit
def store_tile(base, x, row_off, live, s_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """``base[row_off[r] + d * s_d] = x[r, d]`` for live rows and ``d < HEAD_DIM`` (cast to ``base``'s type)."""
    ptrs = base + row_off[:, None] + tl.arange(0, D_PAD)[None, :] * s_d
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=_tile_mask(live, HEAD_DIM, D_PAD))


@triton.jit
def load_rows(base, rows, n_rows, s_row, s_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Tile ``base[rows, :D_PAD]`` of shape (len(rows), D_PAD); zero outside ``[0, n_rows) x [0, HEAD_DIM)``.

    ``base`` already holds the 64-bit (batch, head, first row) offset; in-slice offsets are 32-bit.
    """
    ptrs = base + rows[:, None] * s_row + tl.arange(0, D_PAD)[None, :] * s_d
    return tl.load(ptrs, mask=_tile_mask(rows < n_rows, HEAD_DIM, D_PAD), other=0.0)


@triton.jit
def store_rows(base, x, rows, n_rows, s_row, s_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """``base[rows, :HEAD_DIM] = x`` for rows in ``[0, n_rows)`` (cast to the element type of ``base``)."""
    ptrs = base + rows[:, None] * s_row + tl.arange(0, D_PAD)[None, :] * s_d
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=_tile_mask(rows < n_rows, HEAD_DIM, D_PAD))


@triton.jit
def load_lse2(LSE, row_off, live):
    """``lse * log2 e`` at ``LSE + row_off`` (float32); ``+inf`` for rows not ``live`` or with ``lse = -inf``."""
    lse = tl.load(LSE + row_off, mask=live, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def key_scale(SC, cols, n_cols, s_c):
    """Prefix scale ``s_j`` of key columns ``cols`` as float32 (0 past ``n_cols``)."""
    return tl.load(SC + cols * s_c, mask=cols < n_cols, other=0.0).to(tl.float32)


@triton.jit
def key_bias2(PB, cols, n_cols):
    """Prefix bias of key columns ``cols`` in the scores' log2 units (``bias * log2 e``, float32; 0 past
    ``n_cols``). ``PB`` points at the entry's row of the contiguous float32 (N, P) ``prefix_bias``."""
    return tl.load(PB + cols, mask=cols < n_cols, other=0.0) * LOG2E


@triton.jit
def mask_scores(s, pos, offs_n, n_keys, shift, KPM, s_mn,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """Set invisible entries of the (BLOCK_M, BLOCK_N) score tile to -inf.

    ``pos``: the query position of each row. ``MASKED`` tiles check the key bound (and, with ``CAUSAL``,
    ``j <= pos + shift``); ``HAS_KPM`` applies the key padding mask to every tile.
    """
    if MASKED:
        keep = (offs_n < n_keys)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= pos[:, None] + shift)
        s = tl.where(keep, s, float("-inf"))
    if HAS_KPM:
        real = tl.load(KPM + offs_n * s_mn, mask=offs_n < n_keys, other=0)
        s = tl.where((real != 0)[None, :], s, float("-inf"))
    return s
