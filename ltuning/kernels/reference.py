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
    prefix_lengths (N,) int          optional real length (in [0, P]) of each bank entry (right-padded banks,
                                     e.g. label texts of unequal token counts): sequence b sees prefix tokens
                                     j < prefix_lengths[idx[b]] only; the rest get no probability and no gradient
    prefix_bias  (N, P) float        optional additive logit of each bank token of each entry (finite, not
                                     differentiated): S gains bias[idx[b], j] on prefix column j. A deduplicated
                                     bank puts log m_j there: m identical (key, value) tokens attend exactly as
                                     one token whose logit is raised by log m (one-pass label banks,
                                     :meth:`ltuning.methods.lt.LTPrefix.dedup_index`)
    softmax_scale float              default 1 / sqrt(D)

    S   = softmax_scale * q @ [s * bank_k[idx[b]] ; k_b]^T (+ prefix_bias[idx[b]] on the prefix columns)
                                                                 (masked entries -> -inf)
    lse = logsumexp(S, -1)                                       (B, Hq, Lq) float32
    o   = softmax(S) @ [s * bank_v[idx[b]] ; v_b]                (B, Hq, Lq, D), dtype of q

Every entry point validates these shapes, dtypes, devices and index values first
(:func:`ltuning.kernels.validation.check_inputs`). A query row that sees no key at all (P = 0 and every key
padded / causally hidden) gives o = 0 and lse = -inf. The reference materialises the concatenation per row; it is slow on purpose.
"""
from __future__ import annotations

import math

import torch

from .validation import KernelInputError, check_inputs


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
    prefix_scale=None, softmax_scale=None, compute_dtype=None, prefix_lengths=None, prefix_bias=None,
):
    """Reference shared-prefix attention; returns ``(o, lse)``. Differentiable in every float input but
    ``prefix_bias`` (a constant; its gradient is not defined by the kernels).

    ``compute_dtype`` (e.g. torch.float64) runs the math in that dtype; the output is cast back to q's dtype.
    """
    B, Hq, Lq, D, Hkv, Lk, P, _ = check_inputs(
        q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask=key_padding_mask, prefix_scale=prefix_scale,
        prefix_lengths=prefix_lengths, prefix_bias=prefix_bias, softmax_scale=softmax_scale,
        where="prefix_attention_reference")
    if compute_dtype is not None and not compute_dtype.is_floating_point:
        raise KernelInputError(f"prefix_attention_reference: compute_dtype must be floating; got {compute_dtype}")
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
    if P and prefix_bias is not None:
        bias = prefix_bias.detach().to(cd)[prefix_idx.long()]  # (B, P)
        scores = scores + torch.cat([bias, bias.new_zeros(B, Lk)], -1)[:, None, None, :]
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
    prefix_scale=None, softmax_scale=None, compute_dtype=None, prefix_lengths=None, prefix_bias=None,
):
    """Packed variable-length form: q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (B+1,) int.

    Sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1] (no padding anywhere). Returns o (T, Hq, D) and
    lse (T, Hq) float32. Each sequence is attended exactly as the dense reference with B = 1.
    """
    check_inputs(q, k, v, bank_k, bank_v, prefix_idx, prefix_scale=prefix_scale, prefix_lengths=prefix_lengths,
                 prefix_bias=prefix_bias, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, varlen=True,
                 where="prefix_attention_varlen_reference")
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
            softmax_scale=softmax_scale, compute_dtype=compute_dtype, prefix_lengths=prefix_lengths,
            prefix_bias=prefix_bias)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
    return torch.cat(outs, 0), torch.cat(lses, 0)
