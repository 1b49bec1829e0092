"""The PEFT-style prefix encoder shared by ``prefix`` and ``apt``, and the split of a flat prefix into layers.

For P virtual tokens on a model with ``layers`` layers of KV width kv_dim = Hkv * D::

    z = Linear(r, layers * 2 * kv_dim)(tanh(Linear(w, r)(E)))    E = Embedding(P, w).weight    (prefix_projection)
    z = E                                                         E = Embedding(P, layers * 2 * kv_dim)   (else)

z (P, layers * 2 * kv_dim) is read as (P, layers, 2, Hkv, D): layer i's keys z[:, i, 0], values z[:, i, 1], i.e.
one bank entry (N = 1) of (1, Hkv, P, D) keys and values per layer; the keys carry no RoPE. w =
``embedding_dim`` (None: d); PEFT's ``PrefixEncoder`` uses kv_dim there (below d on GQA models), so
``ltuning.peft_compat`` sets it to load PEFT's own encoder weights. Parameters: ``embedding.weight`` and
``transform.*`` on the method module (the adapters' state dict names).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from .base import Method, MethodConfig


@dataclass
class PrefixConfig(MethodConfig):
    cli_help: ClassVar[dict] = {**MethodConfig.cli_help, 'num_virtual_tokens': 'number of virtual tokens P (prompt, prefix)', 'encoder_hidden_size': 'hidden width r of the reparameterisation / label-transform MLP'}
    num_virtual_tokens: int = 20
    prefix_projection: bool = True
    encoder_hidden_size: int = 512
    embedding_dim: Optional[int] = None  # None: the model's hidden size (PEFT's encoder: the KV width Hkv * D)


def split_layers(z: torch.Tensor, info):
    """(N, P, layers * 2 * kv_dim) -> per-layer lists of keys and values, each (N, Hkv, P, D)."""
    N, P, _ = z.shape
    z = z.view(N, P, info.num_layers, 2, info.num_kv_heads, info.head_dim).permute(2, 3, 0, 4, 1, 5)
    return [z[i, 0] for i in range(info.num_layers)], [z[i, 1] for i in range(info.num_layers)]


class PrefixEncoderMethod(Method):
    """A method whose bank is one trained prefix from the encoder above (not registered itself)."""
    config_class = PrefixConfig
    kind = "prefix"

    def __init__(self, config: PrefixConfig, info, base, tokenizer, cache=None):
        super().__init__(config, info, base, tokenizer, cache)
        out = info.num_layers * 2 * info.kv_dim
        P = config.num_virtual_tokens
        if config.prefix_projection:
            width = config.embedding_dim or info.hidden_size
            self.embedding = nn.Embedding(P, width)
            self.transform = nn.Sequential(nn.Linear(width, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, out))
        else:
            self.embedding = nn.Embedding(P, out)
            self.transform = nn.Identity()

    def prefix(self):
        z = self.transform(self.embedding.weight)[None]
        return split_layers(z, self.info)
