"""Shared-prefix attention on Triton (GPU, or the CPU interpreter with ``TRITON_INTERPRET=1``).

Semantics and shapes: :mod:`ltuning.kernels.reference`. Dense: q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D); packed:
q (T, Hq, D), k/v (T, Hkv, D) with ``cu_seqlens`` (B+1,). The bank (N, Hkv, P, D) is read in place by every
kernel (no expanded per-sequence copy); its gradient is reduced inside the prefix dK/dV kernel over the sequences
that use each entry (see :mod:`ltuning.kernels.triton.bwd`). Both functions are differentiable w.r.t.
q, k, v, bank_k, bank_v, prefix_scale, and through ``lse`` as well as ``o``. The optional ``prefix_lengths`` (N,)
(right-padded banks) is read by the kernels too: positions past an entry's length are skipped or masked and get
exactly zero gradient; without it the kernels compile exactly as before (``HAS_PLEN = False``). So is the
optional ``prefix_bias`` (N, P) (an additive logit per bank token, e.g. ``log m`` for a token standing for m
identical ones of a deduplicated bank): passed as a contiguous float32 copy, added to the prefix scores of the
forward, dQ and prefix dK/dV kernels (so lse includes it and the backward recomputes P with it); a constant
with no gradient; without it the kernels compile exactly as before (``HAS_PBIAS = False``).

Triton is imported lazily, so importing this module never requires it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..validation import KernelInputError, check_inputs, check_values

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_available() -> bool:
    """Triton importable and a target to run on: CUDA, or the interpreter (``TRITON_INTERPRET=1``)."""
    try:
        from .configs import interpreting
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreting()


def _alloc(shape, dtype, device):
    """Every kernel output is allocated here (uninitialised: each element is written by exactly one program)."""
    return torch.empty(shape, dtype=dtype, device=device)


def prefix_splits(B, N, Hkv, P, num_sms):
    """Chunks each bank entry's sequence list is split into by the prefix dK/dV kernel (1 when ``num_sms = 0``).

    Aims at ~2 waves of ``num_sms`` programs (prefix blocks of 64 keys); bounded by the mean number of sequences
    per used entry, so the fp32 partials ``(splits, N, Hkv, P, D)`` never exceed a per-sequence prefix copy.
    """
    used = max(1, min(N, B))
    busy = used * Hkv * -(-P // 64)
    return max(1, min(B // used, -(-2 * num_sms // busy)))


def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


@dataclass(frozen=True)
class _Meta:
    B: int
    Hq: int
    Hkv: int
    Lq: int  # max query length (varlen: max_seqlen)
    Lk: int
    P: int
    N: int
    D: int
    causal: bool
    sm_scale: float
    varlen: bool


def _s4(t, m: _Meta):
    """(batch, head, row, dim) strides of a (B, H, L, D) tensor, or of a packed (T, H, D) one (batch stride 0)."""
    return (0, t.stride(1), t.stride(0), t.stride(2)) if m.varlen else tuple(t.stride())


def _s3(t, m: _Meta):
    """(batch, head, row) strides of a (B, H, L) tensor or a packed (T, H) one."""
    return (0, t.stride(1), t.stride(0)) if m.varlen else tuple(t.stride())


def _consts(m: _Meta, q, kpm, scale, plen, pbias):
    import triton
    from .configs import len_bucket
    return dict(GROUP=m.Hq // m.Hkv, HEAD_DIM=m.D, D_PAD=max(16, triton.next_power_of_2(m.D)),
                HAS_PREFIX=m.P > 0, HAS_KPM=kpm is not None, HAS_SCALE=scale is not None, CAUSAL=m.causal,
                IS_VARLEN=m.varlen, HAS_PLEN=plen is not None, HAS_PBIAS=pbias is not None,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                PACK_GQA=pack_gqa(m.Hq // m.Hkv, m.Lq)), \
        len_bucket(max(m.Lq, m.Lk))


def _ptr(t, q):
    """``t``, or ``q`` standing in for an absent tensor the kernel never touches."""
    return t if t is not None else q


def _bank_args(bank_k, bank_v, idx, plen, pbias, kpm, scale, q):
    """Kernel pointers + strides of the optional inputs (``q`` and zero strides stand in for absent ones; the
    prefix bias is contiguous (N, P): no strides)."""
    ptrs = tuple(_ptr(t, q) for t in (bank_k, bank_v, idx, plen, pbias, kpm, scale))
    strides = (*(bank_k.stride() if bank_k is not None else (0,) * 4),
               *(bank_v.stride() if bank_v is not None else (0,) * 4),
               *(kpm.stride() if kpm is not None else (0, 0)), *(scale.stride() if scale is not None else (0, 0)))
    return ptrs, strides


PACK_MAX_LQ = 64


def pack_gqa(group: int, max_lq: int) -> bool:
    """Whether the forward and dQ kernels pack the GQA group into the query tile (``PACK_GQA``): ``group > 1`` and
    the (max) query length at most :data:`PACK_MAX_LQ` = 64, where one program per query head would hold a single
    64- or 128-row tile, mostly empty for short queries (rule and reason: :mod:`ltuning.kernels.triton.fwd`).
    The tests monkeypatch this function to force either tiling."""
    return group > 1 and max_lq <= PACK_MAX_LQ


def _rows_grid(m: _Meta, pack: bool):
    """Grid of the forward and dQ kernels and its head count: packed, ``(B * Hkv, cdiv(Lq * GROUP, BLOCK_M))``
    (blocks of (position, query head of the KV group) rows); else ``(B * Hq, cdiv(Lq, BLOCK_M))``."""
    import triton
    heads, rows = (m.Hkv, m.Lq * (m.Hq // m.Hkv)) if pack else (m.Hq, m.Lq)
    return (lambda meta: (m.B * heads, triton.cdiv(rows, meta["BLOCK_M"]))), heads


def _forward(q, k, v, bank_k, bank_v, idx, plen, pbias, kpm, scale, cu, m: _Meta):
    from .fwd import fwd_kernel
    o = _alloc(q.shape, q.dtype, q.device)
    lse = _alloc(q.shape[:-1], torch.float32, q.device)
    consts, bucket = _consts(m, q, kpm, scale, plen, pbias)
    (bk, bv, ix, pl, pb, km, sc), bstr = _bank_args(bank_k, bank_v, idx, plen, pbias, kpm, scale, q)
    grid, heads = _rows_grid(m, consts["PACK_GQA"])
    fwd_kernel[grid](
        q, k, v, bk, bv, ix, pl, pb, km, sc, _ptr(cu, q), o, lse, *_s4(q, m), *_s4(k, m), *_s4(v, m), *bstr,
        *_s4(o, m), *_s3(lse, m), heads, m.Lq, m.Lk, m.P, m.sm_scale * math.log2(math.e), bucket, **consts)
    return o, lse


def _backward(ctx, do, dlse):
    import triton
    from .bwd import dkdv_seq_kernel, dq_kernel, preprocess_kernel
    q, k, v, bank_k, bank_v, scale, idx, plen, pbias, kpm, cu, o, lse = ctx.saved_tensors
    cu = _ptr(cu, q)
    m: _Meta = ctx.meta
    need = ctx.needs_input_grad
    if do is None:
        do = torch.zeros_like(o)
    consts, bucket = _consts(m, q, kpm, scale, plen, pbias)
    qk_scale = m.sm_scale * math.log2(math.e)
    delta = _alloc(lse.shape, torch.float32, q.device)
    pre_block = 16 if consts["D_PAD"] <= 16 else 64
    preprocess_kernel[(m.B * m.Hq, triton.cdiv(m.Lq, pre_block))](
        o, do, _ptr(dlse, lse), cu, delta, *_s4(o, m), *_s4(do, m),
        *(_s3(dlse, m) if dlse is not None else (0, 0, 0)), *_s3(lse, m), m.Hq, m.Lq,
        HEAD_DIM=m.D, D_PAD=consts["D_PAD"], HAS_DLSE=dlse is not None, IS_VARLEN=m.varlen, BLOCK_M=pre_block)
    (bk, bv, ix, pl, pb, km, sc), bstr = _bank_args(bank_k, bank_v, idx, plen, pbias, kpm, scale, q)
    dq = dk = dv = dbk = dbv = dsc = None
    if need[0]:
        dq = _alloc(q.shape, q.dtype, q.device)
        grid, heads = _rows_grid(m, consts["PACK_GQA"])
        dq_kernel[grid](
            q, k, v, bk, bv, ix, pl, pb, km, sc, cu, do, lse, delta, dq, *_s4(q, m), *_s4(k, m), *_s4(v, m), *bstr,
            *_s4(do, m), *_s3(lse, m), *_s4(dq, m), heads, m.Lq, m.Lk, m.P, m.sm_scale, qk_scale, bucket, **consts)
    if need[1] or need[2]:
        dk = _alloc(k.shape, k.dtype, k.device)
        dv = _alloc(v.shape, v.dtype, v.device)
        seq_consts = {c: consts[c] for c in ("GROUP", "HEAD_DIM", "D_PAD", "HAS_KPM", "CAUSAL", "IS_VARLEN",
                                             "DOT_PREC")}
        dkdv_seq_kernel[lambda meta: (m.B * m.Hkv, triton.cdiv(m.Lk, meta["BLOCK_N"]))](
            q, k, v, km, cu, do, lse, delta, dk, dv, *_s4(q, m), *_s4(k, m), *_s4(v, m), *bstr[8:10],
            *_s4(do, m), *_s3(lse, m), *_s4(dk, m), m.Hkv, m.Lq, m.Lk, m.sm_scale, qk_scale, bucket, **seq_consts)
    if m.P and (need[3] or need[4] or need[5]):
        dbk, dbv, dsc = _bank_backward(q, bank_k, bank_v, scale, idx, plen, pbias, cu, do, lse, delta, m,
                                       consts, qk_scale)
    return dq, dk, dv, dbk, dbv, dsc


def _bank_backward(q, bank_k, bank_v, scale, idx, plen, pbias, cu, do, lse, delta, m: _Meta, consts, qk_scale):
    """d(bank_k), d(bank_v), d(prefix_scale): sequences grouped by entry with a stable sort (no host sync)."""
    import triton
    from .bwd import dkdv_prefix_kernel
    from .configs import len_bucket
    perm = torch.argsort(idx, stable=True).to(torch.int32)
    seg = torch.zeros(m.N + 1, dtype=torch.int32, device=q.device)
    seg[1:] = torch.cumsum(torch.bincount(idx, minlength=m.N), 0)
    split = prefix_splits(m.B, m.N, m.Hkv, m.P, _num_sms(q.device))
    part_k = _alloc((split, m.N, m.Hkv, m.P, m.D), torch.float32, q.device)
    part_v = _alloc((split, m.N, m.Hkv, m.P, m.D), torch.float32, q.device)
    dsc_part = _alloc((m.B, m.Hkv, m.P), torch.float32, q.device) if scale is not None else part_k
    pre_consts = {c: consts[c] for c in ("GROUP", "HEAD_DIM", "D_PAD", "HAS_SCALE", "IS_VARLEN", "HAS_PLEN",
                                         "HAS_PBIAS", "DOT_PREC")}
    dkdv_prefix_kernel[lambda meta: (m.N * m.Hkv, triton.cdiv(m.P, meta["BLOCK_N"]), split)](
        q, bank_k, bank_v, _ptr(plen, q), _ptr(pbias, q), _ptr(scale, q), cu, do, lse, delta, perm, seg, part_k,
        part_v, dsc_part,
        *_s4(q, m), *bank_k.stride(), *bank_v.stride(), *(scale.stride() if scale is not None else (0, 0)),
        *_s4(do, m), *_s3(lse, m), *part_k.stride(), *(dsc_part.stride() if scale is not None else (0, 0, 0)),
        m.Hkv, m.Lq, m.P, split, m.sm_scale, qk_scale, len_bucket(m.Lq), **pre_consts)
    dbk = part_k.sum(0).to(bank_k.dtype)
    dbv = part_v.sum(0).to(bank_v.dtype)
    dsc = dsc_part.sum(1).to(scale.dtype) if scale is not None else None
    return dbk, dbv, dsc


class _PrefixAttention(torch.autograd.Function):
    """(o, lse) = prefix attention; gradients w.r.t. q, k, v, bank_k, bank_v, prefix_scale (through o and lse).

    ``plen`` (int32 prefix lengths, or None) and ``pbias`` (float32 (N, P) prefix bias, or None: a constant) get
    no gradient, like ``idx``, ``kpm`` and ``cu``."""

    @staticmethod
    def forward(ctx, q, k, v, bank_k, bank_v, scale, idx, kpm, cu, plen, pbias, meta):
        o, lse = _forward(q, k, v, bank_k, bank_v, idx, plen, pbias, kpm, scale, cu, meta)
        ctx.save_for_backward(q, k, v, bank_k, bank_v, scale, idx, plen, pbias, kpm, cu, o, lse)
        ctx.meta = meta
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        return (*_backward(ctx, do, dlse), None, None, None, None, None, None)


def _prefix_inputs(bank_k, bank_v, prefix_idx, prefix_scale, prefix_lengths, prefix_bias, P):
    """Bank, int64 index, scale, int32 lengths and the contiguous float32 (N, P) bias (each None when not given)
    when the prefix is non-empty, else Nones.

    The kernels clamp each length to ``[0, P]``, as the reference's ``arange(P) < length`` does. The bias is
    detached: a constant (its entries past an entry's length are never read)."""
    if not P:
        return None, None, None, None, None, None
    plen = prefix_lengths.to(torch.int32).contiguous() if prefix_lengths is not None else None
    pbias = prefix_bias.detach().to(torch.float32).contiguous() if prefix_bias is not None else None
    return bank_k, bank_v, prefix_idx.to(torch.int64).contiguous(), prefix_scale, plen, pbias


def prefix_attention_triton(
    q, k, v, bank_k=None, bank_v=None, prefix_idx=None, *, key_padding_mask=None, causal=False,
    prefix_scale=None, softmax_scale=None, prefix_lengths=None, prefix_bias=None,
):
    """Dense shared-prefix attention; returns ``(o (B, Hq, Lq, D) in q's dtype, lse (B, Hq, Lq) float32)``.

    ``prefix_lengths`` (N,) int32/int64: real length of each (right-padded) bank entry; None = all P tokens.
    ``prefix_bias`` (N, P) floating, finite: additive logit of each bank token (after the softmax scale; no
    gradient); None = no bias."""
    # everything, index values included (on a GPU: one small reduction and one sync), before any launch
    B, Hq, Lq, D, Hkv, Lk, P, _ = check_inputs(
        q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask=key_padding_mask, prefix_scale=prefix_scale,
        prefix_lengths=prefix_lengths, prefix_bias=prefix_bias, softmax_scale=softmax_scale, dtypes=_DTYPES,
        where="prefix_attention_triton")
    sm_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if B * Hq * Lq == 0:
        return q.new_zeros(q.shape), q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
    bank_k, bank_v, idx, scale, plen, pbias = _prefix_inputs(bank_k, bank_v, prefix_idx, prefix_scale,
                                                             prefix_lengths, prefix_bias, P)
    kpm = key_padding_mask.to(torch.bool).view(torch.uint8) if key_padding_mask is not None else None
    meta = _Meta(B, Hq, Hkv, Lq, Lk, P, bank_k.shape[0] if P else 0, D, bool(causal), float(sm_scale), False)
    return _PrefixAttention.apply(q, k, v, bank_k, bank_v, scale, idx, kpm, None, plen, pbias, meta)


def prefix_attention_varlen_triton(
    q, k, v, cu_seqlens, bank_k=None, bank_v=None, prefix_idx=None, *, max_seqlen=None, causal=False,
    prefix_scale=None, softmax_scale=None, prefix_lengths=None, prefix_bias=None,
):
    """Packed form: q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (B+1,); returns ``(o (T, Hq, D), lse (T, Hq))``.

    ``prefix_lengths`` (N,), ``prefix_bias`` (N, P): as in :func:`prefix_attention_triton`.
    ``max_seqlen`` sizes the grid; when omitted it is read from ``cu_seqlens`` (one device-to-host sync).
    """
    B, Hq, T, D, Hkv, _, P, _ = check_inputs(
        q, k, v, bank_k, bank_v, prefix_idx, prefix_scale=prefix_scale, prefix_lengths=prefix_lengths,
        prefix_bias=prefix_bias, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        varlen=True, dtypes=_DTYPES, values=False, where="prefix_attention_varlen_triton")
    # index values and the longest sequence: one small reduction and one host transfer (one sync on a GPU)
    longest = check_values(prefix_idx if bank_k is not None else None, bank_k.shape[0] if bank_k is not None else 0,
                           prefix_lengths, P, cu_seqlens, T, max_seqlen, where="prefix_attention_varlen_triton")
    # values=False skipped the bias's finiteness too (check_inputs tests it only with values=True): a second sync,
    # as in the dense path
    if prefix_bias is not None and prefix_bias.numel() and not bool(torch.isfinite(prefix_bias).all()):
        raise KernelInputError("prefix_attention_varlen_triton: prefix_bias values must be finite (a masked bank "
                               "token is one past prefix_lengths)")
    max_seqlen = longest if max_seqlen is None else max_seqlen
    sm_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cu = cu_seqlens.to(dtype=torch.int32).contiguous()
    if T * Hq == 0 or B == 0:
        return q.new_zeros(q.shape), q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
    bank_k, bank_v, idx, scale, plen, pbias = _prefix_inputs(bank_k, bank_v, prefix_idx, prefix_scale,
                                                             prefix_lengths, prefix_bias, P)
    meta = _Meta(B, Hq, Hkv, int(max_seqlen), int(max_seqlen), P, bank_k.shape[0] if P else 0, D, bool(causal),
                 float(sm_scale), True)
    return _PrefixAttention.apply(q, k, v, bank_k, bank_v, scale, idx, None, cu, plen, pbias, meta)
