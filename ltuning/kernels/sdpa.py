"""Shared-prefix attention through PyTorch's ``scaled_dot_product_attention`` over ``cat(bank[idx], K)``.

This is what PEFT-style prefix tuning runs (the prefix expanded per row and concatenated every layer); it is
the portable fallback when no fused kernel applies. Same semantics and return value as
:func:`ltuning.kernels.reference.prefix_attention_reference`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference import prefix_attention_reference, row_prefix_lengths, visible_mask
from .validation import check_inputs


def prefix_attention_sdpa(
    q, k, v, bank_k=None, bank_v=None, prefix_idx=None, *, key_padding_mask=None, causal=False,
    prefix_scale=None, softmax_scale=None, prefix_lengths=None, prefix_bias=None,
):
    """SDPA over the materialised ``[bank[idx] ; K]``. Returns ``(o, lse)``; lse is recomputed cheaply."""
    B, Hq, Lq, D, Hkv, Lk, P, _ = check_inputs(
        q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask=key_padding_mask, prefix_scale=prefix_scale,
        prefix_lengths=prefix_lengths, prefix_bias=prefix_bias, softmax_scale=softmax_scale,
        where="prefix_attention_sdpa")
    mask = None
    rows = row_prefix_lengths(prefix_lengths, prefix_idx, P)
    if causal or key_padding_mask is not None or rows is not None:
        mask = visible_mask(B, Lq, Lk, P, key_padding_mask, causal, q.device, rows)[:, None]
        if (P == 0 or rows is not None) and not bool(mask.any(-1).all()):
            # a query row with no visible key: SDPA would return NaN; the reference defines it as 0
            return prefix_attention_reference(q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask=key_padding_mask,
                                              causal=causal, prefix_scale=prefix_scale, softmax_scale=softmax_scale,
                                              prefix_lengths=prefix_lengths, prefix_bias=prefix_bias)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    kk, vv = k, v
    if P:
        pk = bank_k[prefix_idx.long()].to(k.dtype)
        pv = bank_v[prefix_idx.long()].to(v.dtype)
        if prefix_scale is not None:
            s = prefix_scale.to(k.dtype)[:, None, :, None]
            pk, pv = pk * s, pv * s
        kk = torch.cat([pk, k], dim=2)
        vv = torch.cat([pv, v], dim=2)
    if P and prefix_bias is not None:  # an additive float mask: 0 / -inf for visibility, plus the prefix bias
        add = torch.zeros(B, 1, Lq, P + Lk, dtype=q.dtype, device=q.device)
        if mask is not None:
            add = add.masked_fill(~mask, float("-inf"))
        bias = prefix_bias.detach().to(q.dtype)[prefix_idx.long()]
        add[..., :P] += bias[:, None, None, :]
        mask = add
    o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    return o, None
