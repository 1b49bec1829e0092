"""Triton helpers shared by the forward and backward shared-prefix attention kernels.

Scores live in log2 units: ``s2 = (softmax_scale * log2 e) * q.k`` (times the prefix scale), so softmax uses
``exp2``. A query row's ``lse`` is stored in natural log; the backward reloads it as ``lse2 = lse * log2 e``
with ``+inf`` for rows that see no key, which makes every probability of such a row ``exp2(-inf) = 0``.
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
def _tile_mask(rows, n_rows, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """In-bounds mask of a (len(rows), D_PAD) tile; the head-dim test is compiled only when D is padded."""
    if HEAD_DIM == D_PAD:
        return (rows < n_rows)[:, None]
    else:
        return (rows < n_rows)[:, None] & (tl.arange(0, D_PAD) < HEAD_DIM)[None, :]


@triton.jit
def load_rows(base, rows, n_rows, s_row, s_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Tile ``base[rows, :D_PAD]`` of shape (len(rows), D_PAD); zero outside ``[0, n_rows) x [0, HEAD_DIM)``.

    ``base`` already holds the 64-bit (batch, head, first row) offset; in-slice offsets are 32-bit.
    """
    ptrs = base + rows[:, None] * s_row + tl.arange(0, D_PAD)[None, :] * s_d
    return tl.load(ptrs, mask=_tile_mask(rows, n_rows, HEAD_DIM, D_PAD), other=0.0)


@triton.jit
def store_rows(base, x, rows, n_rows, s_row, s_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """``base[rows, :HEAD_DIM] = x`` for rows in ``[0, n_rows)`` (cast to the element type of ``base``)."""
    ptrs = base + rows[:, None] * s_row + tl.arange(0, D_PAD)[None, :] * s_d
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=_tile_mask(rows, n_rows, HEAD_DIM, D_PAD))


@triton.jit
def load_lse2(LSE, rows, n_rows, s_l):
    """``lse * log2 e`` of ``rows`` (float32); ``+inf`` for rows outside ``[0, n_rows)`` or with ``lse = -inf``."""
    lse = tl.load(LSE + rows * s_l, mask=rows < n_rows, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def key_scale(SC, cols, n_cols, s_c):
    """Prefix scale ``s_j`` of key columns ``cols`` as float32 (0 past ``n_cols``)."""
    return tl.load(SC + cols * s_c, mask=cols < n_cols, other=0.0).to(tl.float32)


@triton.jit
def mask_scores(s, offs_m, offs_n, n_keys, shift, KPM, s_mn,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """Set invisible entries of the (BLOCK_M, BLOCK_N) score tile to -inf.

    ``MASKED`` tiles check the key bound (and, with ``CAUSAL``, ``j <= i + shift``); ``HAS_KPM`` applies the key
    padding mask to every tile.
    """
    if MASKED:
        keep = (offs_n < n_keys)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + shift)
        s = tl.where(keep, s, float("-inf"))
    if HAS_KPM:
        real = tl.load(KPM + offs_n * s_mn, mask=offs_n < n_keys, other=0)
        s = tl.where((real != 0)[None, :], s, float("-inf"))
    return s
