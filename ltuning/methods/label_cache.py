"""The label cache: all label texts encoded by the frozen model in ONE batched forward, once.

``h_k = M_frozen(y_k)`` (K, l, d) with a (K, l) mask of real tokens, plus the texts' input embeddings E(y_k).
With ``with_kv`` the same forward also returns every layer's own keys/values of the texts (after RoPE),
(layers, K, Hkv, l, D) each. It is stored with the adapter and recomputed only when the label texts or the
base model fingerprint change (:meth:`ltuning.model.LTuningModel.from_pretrained`). ``ENCODE_CALLS``
counts frozen forwards (tests).
"""
from __future__ import annotations

import torch

from ..models import capture_kv

ENCODE_CALLS = 0


@torch.no_grad()
def encode_texts(base, tokenizer, texts, with_kv: bool = False):
    """One no-grad forward of ``texts`` through ``base``: ``(hidden (K, l, d) fp32, mask (K, l) bool, embeds)``,
    plus ``(keys, values)`` with ``with_kv`` (:func:`ltuning.models.capture_kv`; needs the ltuning attention
    enabled on ``base``)."""
    global ENCODE_CALLS
    ENCODE_CALLS += 1
    side = getattr(tokenizer, "padding_side", "right")
    try:  # right padding: real tokens first, so an entry's length says which bank positions are real
        tokenizer.padding_side = "right"
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    dev = base.get_input_embeddings().weight.device
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    if with_kv:
        kv, out = capture_kv(base, with_output=True, input_ids=ids, attention_mask=mask)
    else:
        out = base(input_ids=ids, attention_mask=mask, use_cache=False)
    embeds = base.get_input_embeddings()(ids)
    res = (out.last_hidden_state.float(), mask.bool(), embeds.float())
    if with_kv:
        res += tuple(torch.stack([layer[j] for layer in kv]).float() for j in (0, 1))
    return res
