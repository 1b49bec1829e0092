"""Packed (unpadded) forwards: R right-padded rows run as one row of their T real tokens.

A batch of R rows padded to length L costs the per-token layers (the Linears, norms and MLP, most of a forward)
R x L tokens. Packed, it costs T = the sum of the real lengths, so inputs of mixed lengths can share one forward
without paying for padding, and a batch can be planned by its real tokens alone
(:func:`ltuning.batching.plan_batches` with ``packed=True``).

:func:`packed_last_hidden` runs the base once on input ids (1, T), position ids (1, T) (each row's own positions,
exactly those of the padded forward) and ``ltuning_cu_seqlens`` (R+1,): transformers passes that keyword down to
the ltuning attention function (:func:`ltuning.models.attention.ltuning_attention_forward`), which routes the call
to the packed kernel (:func:`ltuning.kernels.prefix_attention_varlen`): sequence r attends to its own tokens
(causally on decoders) and to row r's bank entry only. The last hidden states (1, T, d) are scattered back to
(R, L, d), zeros at the padded positions (which pooling never reads).

The same function as the padded forward, forward and backward (the packed kernel has its own backward, the
scatter back to (R, L, d) is differentiable); results differ by float summation order only (matrix products of
another shape; on one CPU thread they came out bit-identical). Where it applies (:func:`packable`, decided once per
model, and :func:`can_pack`, per batch): a base whose positions come from position ids alone -- a decoder, or a
BERT with absolute position embeddings (its packed row gets each input's own 0..n-1 and, as in the padded forward,
token type 0 everywhere: ltuning never passes token types; a RoBERTa derives positions from the padding index, so it
stays padded) --, the ltuning attention with a packed kernel (the C++ CPU op or Triton; SDPA and the reference have
none; the kernel attends causally on decoders, over the whole sequence on encoders), and no layer hooks that read
the batch's (R, L) shape (LoRA's act per token; APT's gates, FL's and CGC-LoRA's do not).
``LTuningModel.pack_inputs`` starts as :func:`packable`, so training and inference pack by default where they can;
the serving engine sets it per adapter.
"""
from __future__ import annotations

import torch

from .attention import IMPL_NAME


PER_TOKEN_HOOK_METHODS = ("lora",)  # methods whose layer hooks act on each token alone


def packable(model) -> bool:
    """Whether ``model`` (an ``LTuningModel``) can run packed at all (module docstring): a decoder or an absolute-
    position BERT, an attention backend with a packed kernel on the model's device, and no layer hooks but
    per-token ones."""
    from ..kernels import resolve_backend
    if not (model.info.causal or positions_are_ids(model.base)):
        return False
    try:
        backend = resolve_backend(model.config.backend, model.head.weight.device.type)
    except (ValueError, RuntimeError):
        return False
    hooked = bool(getattr(model.method, "_hook_handles", None))
    return backend in ("cpu", "triton") and (not hooked or model.config.method in PER_TOKEN_HOOK_METHODS)


def positions_are_ids(base) -> bool:
    """An encoder whose embeddings read absolute positions 0..L-1 from ``position_ids`` (BERT), so a packed row
    with each input's own positions is the padded forward."""
    cfg = base.config
    return cfg.model_type == "bert" and getattr(cfg, "position_embedding_type", "absolute") == "absolute"


def can_pack(model, mask: torch.Tensor) -> bool:
    """Whether ``model`` (an ``LTuningModel``) runs this (R, L) bool ``mask``'s batch packed: its
    ``pack_inputs`` flag is on (:func:`packable` decided it) and some position is padding (with or without
    autograd)."""
    return bool(getattr(model, "pack_inputs", False)) and not bool(mask.all())


def cu_seqlens(mask: torch.Tensor) -> torch.Tensor:
    """(R+1,) int32 offsets of each row's real tokens in the packed row (row-major order of ``mask``'s True)."""
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = mask.sum(1).cumsum(0)
    return cu


def packed_last_hidden(base, input_ids: torch.Tensor, mask: torch.Tensor, position_ids=None,
                       **kwargs) -> torch.Tensor:
    """``base``'s last hidden states (R, L, d) for ``input_ids`` (R, L) with real-token ``mask`` (R, L) bool, run as
    one packed row (module docstring). ``position_ids``: (R or 1, L) as the padded forward would take them
    (default: 0..L-1 in every row). ``kwargs`` go to the base (e.g. ``ltuning_prefix``, whose per-row index and
    gates then apply per sequence)."""
    R, L = input_ids.shape
    if mask.shape != (R, L) or mask.dtype != torch.bool:
        raise ValueError(f"packed_last_hidden: mask must be ({R}, {L}) bool, got {tuple(mask.shape)} {mask.dtype}")
    if getattr(base.config, "_attn_implementation", None) != IMPL_NAME:
        raise ValueError(f"packed_last_hidden needs the ltuning attention enabled on the base "
                         f"(ltuning.models.enable); it runs {base.config._attn_implementation!r}, which would let "
                         f"the packed sequences attend to each other")
    dev = input_ids.device
    pos = torch.arange(L, device=dev)[None] if position_ids is None else position_ids.to(dev)
    pos = pos.expand(R, L)[mask]
    out = base(input_ids=input_ids[mask][None], position_ids=pos[None], attention_mask=None, use_cache=False,
               ltuning_cu_seqlens=cu_seqlens(mask), **kwargs)
    h = out.last_hidden_state[0]
    full = h.new_zeros(R, L, h.shape[-1])
    full[mask] = h
    return full
