"""FL-Tuning (Liu et al. 2022): m extra hidden units in every feed-forward network.

GELU FFN (BERT family; x = the FFN input, i.e. the attention output)::

    FFN'(x) = FFN(x) + act(x W1' + b1') W2'          W1' (d, m), b1' (m), W2' (m, d)

The extra term is added to the output of ``BertOutput.dense``, BEFORE BertOutput's residual LayerNorm, exactly
where m more columns of the intermediate layer would land. A pre-hook on ``BertOutput`` (whose second
argument is x) computes it and a forward hook on ``BertOutput.dense`` adds it.

Gated FFN (Llama family, SwiGLU ``LlamaMLP``): m more units in the gate, up and down projections::

    FFN'(x) = FFN(x) + (act(x Wg') * (x Wu')) Wd'     Wg', Wu' (d, m), Wd' (m, d)

(a forward hook on the MLP). The frozen weights are never concatenated or copied: the extra units run as
their own small matmuls. W1', Wg', Wu' ~ N(0, initializer_range); W2', Wd' = 0, so training starts at the
frozen model. kind ``"none"``: an ordinary K-way head reads the pooled output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Method, MethodConfig, register_method
from .layers import transformer_layers


@dataclass
class FLConfig(MethodConfig):
    cli_help: ClassVar[dict] = {**MethodConfig.cli_help, 'num_units': 'fl: extra hidden units m in every feed-forward network'}
    num_units: int = 64


@register_method("fl")
class FLTuning(Method):
    config_class = FLConfig
    kind = "none"
    no_weight_decay = ("b_in",)  # the extra units' stacked bias (n, m): a bias, though 2-D

    def __init__(self, config: FLConfig, info, base, tokenizer, cache=None):
        super().__init__(config, info, base, tokenizer, cache)
        n, d, m = info.num_layers, info.hidden_size, config.num_units
        std = getattr(base.config, "initializer_range", 0.02)
        layers = transformer_layers(base)
        self.gated = hasattr(layers[0], "mlp") and hasattr(layers[0].mlp, "gate_proj")
        if not self.gated and not (hasattr(layers[0], "intermediate") and hasattr(layers[0], "output")):
            raise NotImplementedError(f"fl: no known FFN in {type(layers[0]).__name__}")
        self.w_in = nn.Parameter(torch.randn(n, d, m) * std)   # W1' or Wg'
        self.w_out = nn.Parameter(torch.zeros(n, m, d))         # W2' or Wd'
        if self.gated:
            self.w_up = nn.Parameter(torch.randn(n, d, m) * std)
        else:
            self.b_in = nn.Parameter(torch.zeros(n, m))
        self._pending = {}
        for i, layer in enumerate(layers):
            if self.gated:
                self.add_hook(layer.mlp.register_forward_hook(self._gated_hook(i, layer.mlp.act_fn)))
            else:
                act = layer.intermediate.intermediate_act_fn
                self.add_hook(layer.output.register_forward_pre_hook(self._gelu_pre_hook(i, act)))
                self.add_hook(layer.output.dense.register_forward_hook(self._add_output_hook(i)))

    def extra(self, i: int, x: torch.Tensor, act) -> torch.Tensor:
        """The m extra units' contribution of layer i for FFN input x (..., d)."""
        x = x.to(self.w_in.dtype)
        if self.gated:
            return (act(x @ self.w_in[i]) * (x @ self.w_up[i])) @ self.w_out[i]
        return act(x @ self.w_in[i] + self.b_in[i]) @ self.w_out[i]

    def _gated_hook(self, i, act):
        def hook(module, args, out):
            return out + self.extra(i, args[0], act).to(out.dtype)
        return hook

    def _gelu_pre_hook(self, i, act):
        def hook(module, args):
            self._pending[i] = self.extra(i, args[1], act)
        return hook

    def _add_output_hook(self, i):
        def hook(module, args, out):
            return out + self._pending.pop(i).to(out.dtype)
        return hook
