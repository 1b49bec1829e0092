"""How a method's output enters the frozen model: one function per ``Method.kind``, then pooling.

Notation: R rows of input ids (R, L) with a (R, L) bool mask of real tokens; row r uses bank entry
``entry_index[r]`` (N entries; N = K for label-conditioned methods, else 1); d = hidden size; per layer the
attention has Hkv key/value heads of size D. Every function returns ``(hidden (R, L', d), mask (R, L'), offset)``:
the last hidden states, the mask over those L' positions and where the input starts in them (pooling reads
the input's positions only).

* ``"none"`` (:func:`plain`): the base as it is (a method that hooks the layers changes it from inside).
* ``"prefix"`` (:func:`prefix`): the method's bank, per layer keys/values (N, Hkv, P, D), reaches every attention
  call as :class:`ltuning.models.PrefixInputs` (entry index per row, optional (R, P) gates, optional (N,) real
  entry lengths); the input's positions start at 0, or after the entry (``position_offset="prefix"``).
* ``"prompt"`` on decoders (:func:`prompt_as_prefix`): a soft prompt p_e (n tokens, entry e of the bank
  (N, n, d)) comes before the input and causal attention never lets it see the input, so its per-layer
  keys/values are the same for every row that uses entry e. They are computed ONCE per forward, by one pass of
  the N bank entries (:func:`prompt_bank_kv`: N x n tokens, the layers' own K/V after RoPE), and the R rows then
  attend to them as a shared prefix (gradient reduced over rows inside the kernel), with positions
  n..n+L-1, as in ``[p_e ; x]``. Same result as the concatenation (tested), for N x n + R x L tokens instead of
  R x (n + L).
* ``"prompt"`` on encoders (:func:`prompt_concat`; bidirectional: the prompt sees the input):
  ``inputs_embeds = [p_e ; E(x)]`` (R, n + L, d).
"""
from __future__ import annotations

import torch

from ..models import PrefixInputs, capture_kv
from ..models.packing import can_pack, packed_last_hidden


def run_base(model, input_ids, mask, **kwargs):
    """The base's last hidden states (R, L, d) on ``input_ids`` (R, L) with real-token ``mask`` (R, L) bool;
    packed (one row of the real tokens, :mod:`ltuning.models.packing`) where :func:`can_pack` allows it."""
    if can_pack(model, mask):
        return packed_last_hidden(model.base, input_ids, mask, **kwargs)
    return model.base(input_ids=input_ids, attention_mask=mask, use_cache=False, **kwargs).last_hidden_state


def plain(model, input_ids, mask, entry_index):
    """Kind ``"none"``: the (hooked) base on the input alone."""
    return run_base(model, input_ids, mask), mask, 0


def prefix(model, input_ids, mask, entry_index):
    """Kind ``"prefix"``: the method's bank (per layer (N, Hkv, P, D)) as the shared prefix of every row."""
    L = input_ids.shape[1]
    dev = input_ids.device
    keys, values = model.inference_cached("prefix", model.method.prefix)
    P = keys[0].shape[2]
    scales = model.method.prefix_scales()
    lengths = model.method.prefix_lengths()
    kwargs = {"ltuning_prefix": PrefixInputs(keys, values, entry_index, scales, model.config.backend, lengths)}
    if model.config.position_offset == "prefix":  # the input continues after its own prefix
        start = P if lengths is None else lengths.to(dev)[entry_index][:, None]
        kwargs["position_ids"] = torch.arange(L, device=dev)[None] + start
    return run_base(model, input_ids, mask, **kwargs), mask, 0


def prompt_bank_kv(base, prompts, pmask):
    """One forward of the prompt bank: ``prompts`` (N, n, d), ``pmask`` (N, n) bool -> ``(keys, values, lengths)``,
    per-layer (N, Hkv, n, D) lists of the layers' own K/V (after RoPE) and lengths (N,) of a right-padded bank
    (None when every entry has n real tokens)."""
    kv = capture_kv(base, inputs_embeds=prompts.to(base.get_input_embeddings().weight.dtype), attention_mask=pmask)
    lengths = None if bool(pmask.all()) else pmask.sum(-1)
    return [k for k, _ in kv], [v for _, v in kv], lengths


def prompt_as_prefix(model, input_ids, mask, entry_index):
    """Kind ``"prompt"`` on decoders: the prompt bank prefilled once, then a shared prefix (module docstring)."""
    L = input_ids.shape[1]
    dev = input_ids.device
    prompts, pmask = model.method.prompts()
    n = prompts.shape[1]
    keys, values, lengths = prompt_bank_kv(model.base, prompts, pmask.to(dev))
    kwargs = {"ltuning_prefix": PrefixInputs(keys, values, entry_index, None, model.config.backend, lengths),
              "position_ids": torch.arange(L, device=dev)[None] + n}
    return run_base(model, input_ids, mask, **kwargs), mask, 0


def prompt_concat(model, input_ids, mask, entry_index):
    """Kind ``"prompt"`` on encoders: ``[p_e ; E(x)]`` (R, n + L, d) with mask ``[m_e ; mask]``; offset n."""
    prompts, pmask = model.method.prompts()
    emb = model.base.get_input_embeddings()(input_ids)
    pe = prompts[entry_index].to(emb.dtype)
    full_mask = torch.cat([pmask[entry_index].to(input_ids.device), mask], dim=1)
    out = model.base(inputs_embeds=torch.cat([pe, emb], dim=1), attention_mask=full_mask, use_cache=False)
    return out.last_hidden_state, full_mask, pe.shape[1]


def prompt(model, input_ids, mask, entry_index):
    """Kind ``"prompt"``: as a shared prefix where the model allows it (``model.prompt_as_prefix``), else
    concatenated."""
    run = prompt_as_prefix if model.prompt_as_prefix else prompt_concat
    return run(model, input_ids, mask, entry_index)


INJECTIONS = {"none": plain, "prefix": prefix, "prompt": prompt}


def inject(model, input_ids, mask, entry_index):
    """Run the frozen base with ``model.method``'s contribution (by ``method.kind``):
    ``(hidden (R, L', d), mask (R, L'), offset)``."""
    kind = model.method.kind
    if kind not in INJECTIONS:
        raise ValueError(f"method kind must be one of {sorted(INJECTIONS)}, not {kind!r}")
    return INJECTIONS[kind](model, input_ids, mask, entry_index)


def pool(h, full_mask, input_mask, offset: int, pooling: str) -> torch.Tensor:
    """(R, d) of hidden states h (R, L', d): ``"last"`` = the last real position of ``full_mask`` (R, L');
    ``"cls"`` = position ``offset`` (the input's first token); ``"mean"`` = the mean over the input's real tokens
    (``input_mask`` (R, L) at positions offset..)."""
    if pooling == "last":
        last = full_mask.shape[1] - 1 - full_mask.flip(-1).long().argmax(-1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    if pooling == "cls":
        return h[:, offset]
    m = input_mask.to(h.dtype)[..., None]
    return (h[:, offset:] * m).sum(1) / m.sum(1).clamp_min(1)
