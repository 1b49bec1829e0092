"""Identity-initialised per-layer maps on keys and values (shared by sk-prefix and lt-prefix / shared-input).

For layer i, with K_i, V_i (..., D) a text's (or the input's) own keys / values::

    K'_i = K_i (I + dWk_i) + bk_i,   V'_i = V_i (I + dWv_i) + bv_i     dWk_i, dWv_i (D, D), bk_i, bv_i (D,)

one Linear(head_dim, head_dim) per layer on K and one on V, shared by the heads and tokens, written as identity +
a zero-initialised residual so that training starts from the unmapped K/V (and weight decay pulls towards the
identity). The parameters live on the method module as ``key_delta`` (layers, D, D), ``key_bias`` (layers, D),
``value_delta``, ``value_bias`` (the adapters' state dict names).
"""
from __future__ import annotations

import torch
from torch import nn


def near_identity(x, delta, bias):
    """Per layer l: x_l (I + delta_l) + bias_l, for x (layers, ..., D), delta (layers, D, D), bias (layers, D)."""
    b = bias.view(bias.shape[0], *([1] * (x.dim() - 2)), bias.shape[1])
    return x + torch.einsum("l...d,lde->l...e", x, delta) + b


def add_kv_maps(module: nn.Module, num_layers: int, head_dim: int) -> None:
    """Register the per-layer near-identity maps on K and V (``key_delta``, ``key_bias``, ``value_delta``,
    ``value_bias``; all zero, so the maps start as the identity)."""
    for name in ("key", "value"):
        module.register_parameter(f"{name}_delta", nn.Parameter(torch.zeros(num_layers, head_dim, head_dim)))
        module.register_parameter(f"{name}_bias", nn.Parameter(torch.zeros(num_layers, head_dim)))


def apply_kv_maps(module: nn.Module, keys, values):
    """``(K (I + dWk) + bk, V (I + dWv) + bv)`` per layer, keys/values (layers, ..., D)."""
    return (near_identity(keys, module.key_delta, module.key_bias),
            near_identity(values, module.value_delta, module.value_bias))
