"""Drop-in attention for Hugging Face models through transformers' attention-function registry.

``enable(model)`` registers the ``"ltuning"`` attention implementation (an ``AttentionInterface`` function
plus an ``AttentionMaskInterface`` entry that hands the attention function the plain 2-D key-padding mask
instead of a materialised 4-D mask) and switches ``model`` to it; no modelling code is copied. The prefix of
the current forward travels as the keyword argument ``ltuning_prefix=PrefixInputs(...)``, which transformers
passes untouched down to every attention call (so gradient checkpointing and ``torch.compile`` see it too).
Without it the function computes ordinary attention (same kernels, P = 0).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..kernels import prefix_attention, prefix_attention_varlen

IMPL_NAME = "ltuning"


@dataclass
class PrefixInputs:
    """The prefix for one forward: per-layer banks ``keys[l]``/``values[l]`` (N, Hkv, P, D), shared by all rows;
    ``index`` (B,) selects the entry of each row; ``scales[l]`` optional (B, P) per-row gates; ``backend``;
    ``lengths`` optional (N,) real length of each entry of a right-padded bank (same for every layer); ``bias``
    optional (N, P) additive logit of each bank token (same for every layer; the kernels' ``prefix_bias``)."""
    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]
    index: torch.Tensor
    scales: Optional[Sequence[Optional[torch.Tensor]]] = None
    backend: str = "auto"
    lengths: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None


class KVCapture:
    """Receives each layer's own keys/values during one forward: ``capture[layer_idx] = (key, value)``, read back
    as ``capture.kv`` ({layer_idx: (K, V)}). Not a dict on purpose: module hooks that rebuild the dicts and
    dataclasses of a layer's keyword arguments (FSDP2's pre-forward hook does, once they hold tensors that need
    grad) would hand the next layers a copy, and their K/V would never reach the caller."""

    def __init__(self):
        self.kv = {}

    def __setitem__(self, layer: int, key_value) -> None:
        self.kv[layer] = key_value


def ltuning_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              ltuning_prefix: Optional[PrefixInputs] = None, ltuning_capture=None,
                              ltuning_cu_seqlens: Optional[torch.Tensor] = None, **kwargs):
    """AttentionInterface function: q (B, Hq, L, D), k/v (B, Hkv, Lk, D) -> (out (B, L, Hq, D), None).

    ``ltuning_cu_seqlens`` (R+1,) int: the forward is packed (:mod:`ltuning.models.packing`): B = 1 and the L
    positions are R sequences side by side, sequence r at positions ``cu[r]:cu[r+1]``; each attends only to its
    own tokens (and row r's bank entry), through the packed kernel (:func:`ltuning.kernels.prefix_attention_varlen`).

    ``attention_mask`` is the 2-D key-padding mask (B, Lk) bool or None (see :func:`_mask_2d`). Attention
    dropout is not applied: ltuning keeps the frozen base in eval mode. ``ltuning_capture``: a :class:`KVCapture`
    (or a dict) that receives ``{layer_idx: (key, value)}`` (the layer's own K/V, after RoPE), e.g. to turn a text
    into a prefix; under FSDP2 (:func:`ltuning.distributed.shard_frozen_base`) through
    :func:`ltuning.distributed.gather_in_backward`.
    ``PrefixInputs.scales`` may be any object indexable by layer (computed lazily during the forward).
    """
    if ltuning_capture is not None:
        owner = module.__dict__.get("_ltuning_fsdp_layer")  # set by ltuning.distributed.shard_frozen_base
        if owner is None:
            ltuning_capture[module.layer_idx] = (key, value)
        else:
            from ..distributed import gather_in_backward
            ltuning_capture[module.layer_idx] = gather_in_backward(owner, key, value)
    if attention_mask is not None and attention_mask.dim() != 2:
        if ltuning_prefix is not None:
            raise ValueError("ltuning prefix attention takes a 2-D padding mask, not a prepared 4-D mask")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    causal = bool(getattr(module, "is_causal", False))
    bank_k = bank_v = idx = scale = lengths = bias = None
    backend = "auto"
    if ltuning_prefix is not None:
        layer = module.layer_idx
        bank_k, bank_v, idx = ltuning_prefix.keys[layer], ltuning_prefix.values[layer], ltuning_prefix.index
        if ltuning_prefix.scales is not None:
            scale = ltuning_prefix.scales[layer]
        backend = ltuning_prefix.backend
        lengths = ltuning_prefix.lengths
        bias = ltuning_prefix.bias
        if bank_k is not None and bank_k.dtype != query.dtype:
            bank_k, bank_v = bank_k.to(query.dtype), bank_v.to(query.dtype)
    if key.dtype != query.dtype or value.dtype != query.dtype:  # autocast: rotary promotes q, k but not v
        key, value = key.to(query.dtype), value.to(query.dtype)  # (the kernels take one q/k/v dtype)
    if ltuning_cu_seqlens is not None:
        if query.shape[0] != 1 or attention_mask is not None or scale is not None and scale.shape[0] != \
                ltuning_cu_seqlens.shape[0] - 1:
            raise ValueError("ltuning packed attention: expected one packed row (B = 1), no padding mask and "
                             "per-sequence prefix gates")
        out = prefix_attention_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                      ltuning_cu_seqlens, bank_k, bank_v, idx, causal=causal, prefix_scale=scale,
                                      softmax_scale=scaling, prefix_lengths=lengths, prefix_bias=bias,
                                      backend=backend)
        return out.unsqueeze(0), None  # (1, T, Hq, D)
    out = prefix_attention(query, key, value, bank_k, bank_v, idx, key_padding_mask=attention_mask, causal=causal,
                           prefix_scale=scale, softmax_scale=scaling, prefix_lengths=lengths, prefix_bias=bias,
                           backend=backend)
    return out.transpose(1, 2), None


def capture_kv(base, *, with_output: bool = False, **forward_kwargs):
    """One forward ``base(**forward_kwargs)`` (``use_cache=False`` unless given) that records every layer's own
    keys/values, after RoPE: a list with one ``(K, V)`` per layer in layer order, K/V (B, Hkv, L, D) in the
    forward's dtype (grad flows through them if the forward tracks it). ``with_output=True`` returns
    ``(kv, output)``, the forward's output too. Needs the ltuning attention enabled on ``base`` (:func:`enable`)."""
    capture = KVCapture()  # not a dict: see KVCapture
    forward_kwargs.setdefault("use_cache", False)
    out = base(**forward_kwargs, ltuning_capture=capture)
    captured = capture.kv
    if not captured:
        raise RuntimeError("capture_kv needs the ltuning attention enabled on the base model")
    kv = [captured[i] for i in sorted(captured)]
    return (kv, out) if with_output else kv


def _mask_2d(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
             **kwargs):
    """AttentionMaskInterface entry: the (B, kv_length) bool padding mask, or None when nothing is padded."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register() -> None:
    """Register the ``"ltuning"`` attention implementation with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL_NAME, ltuning_attention_forward)
    AttentionMaskInterface.register(IMPL_NAME, _mask_2d)


def enable(model, fused_ops="auto") -> None:
    """Switch ``model`` (and its sub-models) to the ltuning attention; remembers the previous implementation.

    ``fused_ops``: the fused RMSNorm / SwiGLU / rotary CPU kernels (:func:`ltuning.models.fused_ops.enable_fused_ops`).
    ``"auto"``: on for a Llama-family model on the CPU unless ``LTUNING_FUSED_OPS=0`` (otherwise left as they are);
    ``True``: on (``ValueError`` if the model is not a Llama-family model on the CPU); ``False``: off."""
    if fused_ops not in ("auto", True, False):
        raise ValueError(f"fused_ops must be 'auto', True or False, not {fused_ops!r}")
    from .families import DECODER_TYPES
    fits = (getattr(model.config, "model_type", None) in DECODER_TYPES
            and next(model.parameters()).device.type == "cpu")
    if fused_ops is True and not fits:
        raise ValueError(f"fused_ops=True needs a Llama-family model on the CPU, not a "
                         f"{getattr(model.config, 'model_type', None)!r} model on "
                         f"{next(model.parameters()).device.type}")
    register()
    if getattr(model, "_ltuning_prev_attn", None) is None:
        model._ltuning_prev_attn = model.config._attn_implementation
    model.set_attn_implementation(IMPL_NAME)
    from .fused_ops import disable_fused_ops, enable_fused_ops
    if fused_ops is True or (fused_ops == "auto" and fits and os.environ.get("LTUNING_FUSED_OPS", "1") != "0"):
        enable_fused_ops(model)
    elif fused_ops is False:
        disable_fused_ops(model)


def disable(model) -> None:
    """Restore the attention implementation ``model`` had before :func:`enable` (and undo the fused kernels)."""
    from .fused_ops import disable_fused_ops
    disable_fused_ops(model)
    prev = getattr(model, "_ltuning_prev_attn", None)
    if prev is not None:
        model.set_attn_implementation(prev)
        model._ltuning_prev_attn = None
