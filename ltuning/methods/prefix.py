"""Prefix tuning / P-tuning v2 (Li & Liang 2021; Liu et al. 2022), equal to Hugging Face PEFT's PrefixEncoder.

Per layer i, keys/values for P virtual tokens, K_i, V_i (1, Hkv, P, D), from
``Embedding(P, w) -> Linear(w, r) -> tanh -> Linear(r, layers * 2 * kv_dim)`` (``prefix_projection=True``),
or a plain ``Embedding(P, layers * 2 * kv_dim)`` (:mod:`.prefix_encoder`). Keys carry no RoPE. The input x
(B, L) attends to [K_i ; K_i(x)] in every layer; one bank entry shared by every row; an ordinary K-way linear
head reads the pooled output: logits (B, K) = W pool(M(x; P)) + b.
"""
from __future__ import annotations

from .base import register_method
from .prefix_encoder import PrefixConfig, PrefixEncoderMethod

__all__ = ["PrefixConfig", "PrefixTuning"]


@register_method("prefix")
class PrefixTuning(PrefixEncoderMethod):
    config_class = PrefixConfig
