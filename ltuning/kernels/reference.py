"""Plain-PyTorch reference for shared-prefix attention: the test oracle of every fast kernel.

Semantics (shared by the C++ kernel, the Triton kernels and the SDPA fallback)::

    q            (B, Hq, Lq, D)      queries
    k, v         (B, Hkv, Lk, D)     the sequence's own keys / values, Hq % Hkv == 0 (GQA:
                                     query head h reads KV head h // (Hq // Hkv))
    bank_k/v     (N, Hkv, P, D)      prefix bank shared by all sequences (N entries, P tokens each),
                                     or None for P = 0
    prefix_idx   (B,) int            which bank entry sequence b uses
    key_padding_mask (B, Lk) bool    True = real key, False = padding (None: no padding)
    causal       bool                query i sees sequence key j iff j <= i + (Lk - Lq) (bottom-right);
                                     the prefix is always visible
    prefix_scale (B, P) float        optional per-(sequence, prefix-token) scale s (APT gates): prefix
                                     token j enters as key s_j * K_j and value s_j * V_j
    prefix_lengths (N,) int          optional real length of each bank entry (right-padded banks, e.g. label
                                     texts of unequal token counts): sequence b sees prefix tokens
                                     j < prefix_lengths[idx[b]] only; the rest get no probability and no gradient
    softmax_scale float              default 1 / sqrt(D)

    S   = softmax_scale * q @ [s * bank_k[idx[b]] ; k_b]^T      (masked entries -> -inf)
    lse = logsumexp(S, -1)                                       (B, Hq, Lq) float32
    o   = softmax(S) @ [s * bank_v[idx[b]] ; v_b]                (B, Hq, Lq, D), dtype of q

A query row that sees no key at all (P = 0 and every key padded / causally hidden) gives o = 0 and
lse = -inf. The reference materialises the concatenation per row; it is slow on purpose.
"""
from __future__ import annotations

import math

import torch


def _check(q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask, prefix_scale, prefix_lengths=None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or v.shape != k.shape or Dk != D:
        raise ValueError(f"k and v must be (B={B}, Hkv, Lk, D={D}); got {tuple(k.shape)}, {tuple(v.shape)}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    P = 0
    if bank_k is not None:
        if bank_v is None or bank_k.shape != bank_v.shape or bank_k.dim() != 4:
            raise ValueError("bank_k and bank_v must both be (N, Hkv, P, D)")
        if bank_k.shape[1] != Hkv or bank_k.shape[3] != D:
            raise ValueError(f"bank must be (N, Hkv={Hkv}, P, D={D}); got {tuple(bank_k.shape)}")
        if prefix_idx is None or prefix_idx.shape != (B,):
            raise ValueError(f"prefix_idx must be a (B={B},) integer tensor")
        P = bank_k.shape[2]
    if key_padding_mask is not None and key_padding_mask.shape != (B, Lk):
        raise ValueError(f"key_padding_mask must be (B={B}, Lk={Lk}); got {tuple(key_padding_mask.shape)}")
    if prefix_scale is not None and prefix_scale.shape != (B, P):
        raise ValueError(f"prefix_scale must be (B={B}, P={P}); got {tuple(prefix_scale.shape)}")
    check_prefix_lengths(prefix_lengths, bank_k)
    return B, Hq, Lq, D, Hkv, Lk, P


def check_prefix_lengths(prefix_lengths, bank_k) -> None:
    """``prefix_lengths`` is None or an (N,) integer tensor, N = bank entries (0 without a bank)."""
    if prefix_lengths is None:
        return
    N = bank_k.shape[0] if bank_k is not None else 0
    if prefix_lengths.shape != (N,) or prefix_lengths.is_floating_point():
        raise ValueError(f"prefix_lengths must be an (N={N},) integer tensor; got {tuple(prefix_lengths.shape)} "
                         f"{prefix_lengths.dtype}")


def visible_mask(B, Lq, Lk, P, key_padding_mask=None, causal=False, device=None, row_prefix_lengths=None):
    """Boolean (B, Lq, P + Lk): True where query i may attend to key j of [prefix ; sequence].

    ``row_prefix_lengths`` (B,): the prefix tokens row b sees (``prefix_lengths[prefix_idx]``); None = all P."""
    seq = torch.ones(B, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        seq = seq & (j <= i + (Lk - Lq))[None]
    if key_padding_mask is not None:
        seq = seq & key_padding_mask[:, None, :].to(torch.bool)
    pre = torch.ones(B, Lq, P, dtype=torch.bool, device=device)
    if row_prefix_lengths is not None and P:
        pre = pre & (torch.arange(P, device=device)[None, None, :] < row_prefix_lengths.to(device)[:, None, None])
    return torch.cat([pre, seq], dim=-1)


def row_prefix_lengths(prefix_lengths, prefix_idx, P):
    """(B,) prefix tokens each row sees, or None when every row sees all P."""
    if prefix_lengths is None or not P:
        return None
    return prefix_lengths.to(prefix_idx.device).long()[prefix_idx.long()]


def prefix_attention_reference(
    q, k, v, bank_k=None, bank_v=None, prefix_idx=None, *, key_padding_mask=None, causal=False,
    prefix_scale=None, softmax_scale=None, compute_dtype=None, prefix_lengths=None,
):
    """Reference shared-prefix attention; returns ``(o, lse)``. Differentiable in every float input.

    ``compute_dtype`` (e.g. torch.float64) runs the math in that dtype; the output is cast back to q's dtype.
    """
    B, Hq, Lq, D, Hkv, Lk, P = _check(q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask, prefix_scale,
                                      prefix_lengths)
    out_dtype = q.dtype
    cd = compute_dtype or (torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    g = Hq // Hkv
    kk, vv = k.to(cd), v.to(cd)
    if P:
        pk = bank_k.to(cd)[prefix_idx.long()]  # (B, Hkv, P, D) materialised per row: reference only
        pv = bank_v.to(cd)[prefix_idx.long()]
        if prefix_scale is not None:
            s = prefix_scale.to(cd)[:, None, :, None]
            pk, pv = pk * s, pv * s
        kk = torch.cat([pk, kk], dim=2)
        vv = torch.cat([pv, vv], dim=2)
    kk = kk.repeat_interleave(g, dim=1)
    vv = vv.repeat_interleave(g, dim=1)
    scores = torch.matmul(q.to(cd), kk.transpose(-1, -2)) * scale  # (B, Hq, Lq, P+Lk)
    vis = visible_mask(B, Lq, Lk, P, key_padding_mask, causal, q.device,
                       row_prefix_lengths(prefix_lengths, prefix_idx, P))[:, None]
    scores = scores.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    any_vis = vis.any(-1)
    safe_lse = torch.where(any_vis, lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse[..., None]) * any_vis[..., None]
    o = torch.matmul(probs, vv)
    return o.to(out_dtype), lse.float()


def prefix_attention_varlen_reference(
    q, k, v, cu_seqlens, bank_k=None, bank_v=None, prefix_idx=None, *, causal=False,
    prefix_scale=None, softmax_scale=None, compute_dtype=None, prefix_lengths=None,
):
    """Packed variable-length form: q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (B+1,) int.

    Sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1] (no padding anywhere). Returns o (T, Hq, D) and
    lse (T, Hq) float32. Each sequence is attended exactly as the dense reference with B = 1.
    """
    outs, lses = [], []
    cu = [int(x) for x in cu_seqlens.tolist()]
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        qb = q[s:e].transpose(0, 1)[None]
        kb = k[s:e].transpose(0, 1)[None]
        vb = v[s:e].transpose(0, 1)[None]
        idx = prefix_idx[b:b + 1] if prefix_idx is not None else None
        sc = prefix_scale[b:b + 1] if prefix_scale is not None else None
        o, lse = prefix_attention_reference(
            qb, kb, vb, bank_k, bank_v, idx, causal=causal, prefix_scale=sc,
            softmax_scale=softmax_scale, compute_dtype=compute_dtype, prefix_lengths=prefix_lengths)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
    return torch.cat(outs, 0), torch.cat(lses, 0)
