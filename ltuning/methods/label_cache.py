"""The label cache: all label texts encoded by the frozen model in ONE batched forward, once.

``h_k = M_frozen(y_k)`` (K, l, d) with a (K, l) mask of real tokens, plus the texts' input embeddings E(y_k).
With ``capture_kv`` the same forward also returns every layer's own keys/values of the texts (after RoPE),
(layers, K, Hkv, l, D) each. It is stored with the adapter and recomputed only when the label texts or the
base model fingerprint change (:meth:`ltuning.model.LTuningModel.from_pretrained`). ``ENCODE_CALLS``
counts frozen forwards (tests).
"""
from __future__ import annotations

import torch

ENCODE_CALLS = 0


@torch.no_grad()
def encode_texts(base, tokenizer, texts, capture_kv: bool = False):
    """One no-grad forward of ``texts`` through ``base``: ``(hidden (K, l, d) fp32, mask (K, l) bool, embeds)``,
    plus ``(keys, values)`` with ``capture_kv`` (needs the ltuning attention enabled on ``base``)."""
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
    capture = {} if capture_kv else None
    kw = {"ltuning_capture": capture} if capture_kv else {}
    out = base(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    embeds = base.get_input_embeddings()(ids)
    res = (out.last_hidden_state.float(), mask.bool(), embeds.float())
    if capture_kv:
        if not capture:
            raise RuntimeError("capture_kv needs the ltuning attention enabled on the base model")
        layers = sorted(capture)
        res += tuple(torch.stack([capture[i][j] for i in layers]).float() for j in (0, 1))
    return res
