"""APT, Adaptive Prefix Tuning (Zhang et al., ACL 2023): prefix tuning with a token-level gate and a layer scale.

The prefix P_i (Hkv, P, D) of layer i is the prefix-tuning one (:mod:`.prefix_encoder`, same options). At layer i

    alpha_i = sigmoid(W_i h_{i-1} + b_i)  in R^P    (per sequence: (B, P)),   W_i: (P, d)
    prefix keys / values of sequence b = lambda_i * alpha_i[b, j] * P_i[:, j]   (token j)

with lambda_i a learned scalar per layer and h_{i-1} (B, d) the input's representation entering layer i: the
first token for encoders, the mean of the non-padding tokens for decoders. Our reading for decoders: the mean
is divided by its root-mean-square (no parameters), because a pre-norm decoder's residual stream is not
normalised (SmolLM2's reaches norms in the thousands, which would saturate the sigmoid) while a post-norm
encoder's is; and the gate sees the whole input, which is harmless for classification. h_{i-1} is read by a forward
pre-hook on each transformer layer; the (B, P) scale lambda_i * alpha_i reaches the attention kernel as
``PrefixInputs.scales`` (the prefix is never expanded per sequence). W_i = 0, b_i = 0 and lambda_i = 1 at
initialisation: every prefix token starts at half weight. Gradient checkpointing: transformers checkpoints a
layer's forward, not its hooks, so the recompute reads the gates this forward's hook computed (a hook that
fired again would recompute the same values; tested: same gradients). :meth:`APT.last_gates` and
:attr:`APT.lambdas` expose the learned gates; :func:`plot_gates` draws them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import register_method
from .layers import transformer_layers
from .prefix_encoder import PrefixConfig, PrefixEncoderMethod


@dataclass
class APTConfig(PrefixConfig):
    """The prefix-tuning options (P, reparameterisation MLP); the gates and layer scales have none."""


class _LayerScales:
    """Indexable by layer: the (B, P) scale lambda_i * alpha_i of the current forward (computed lazily)."""

    def __init__(self, method):
        self.method = method

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.method.lambdas[layer] * self.method._gates[layer]


@register_method("apt")
class APT(PrefixEncoderMethod):
    config_class = APTConfig

    def __init__(self, config: APTConfig, info, base, tokenizer, cache=None):
        super().__init__(config, info, base, tokenizer, cache)
        P, n = config.num_virtual_tokens, info.num_layers
        self.gate_weight = nn.Parameter(torch.zeros(n, P, info.hidden_size))
        self.gate_bias = nn.Parameter(torch.zeros(n, P))
        self.lambdas = nn.Parameter(torch.ones(n))
        self._gates: dict = {}
        self._mask = None
        for i, layer in enumerate(transformer_layers(base)):
            self.add_hook(layer.register_forward_pre_hook(self._gate_hook(i), with_kwargs=True))

    def _gate_hook(self, i: int):
        def hook(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).float()
            if self.info.causal:
                m = self._mask.float()[..., None]
                pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
                pooled = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6)
            else:
                pooled = h[:, 0]
            with torch.autocast(h.device.type, enabled=False):
                self._gates[i] = torch.sigmoid(pooled @ self.gate_weight[i].T + self.gate_bias[i])
        return hook

    def begin_forward(self, input_ids, attention_mask, **batch) -> None:
        self._mask = attention_mask
        self._gates = {}

    def prefix_scales(self, hidden_states=None):
        return _LayerScales(self)

    def last_gates(self) -> list:
        """alpha_i of the last forward: per layer a (B, P) tensor (detached)."""
        return [self._gates[i].detach() for i in sorted(self._gates)]


def plot_gates(gates: torch.Tensor, path: str, title: str = "APT gates") -> None:
    """Write a PNG heat-map of ``gates`` (layers, P), e.g. the mean of lambda_i * alpha_i over a data set."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    g = gates.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * g.shape[1] + 2), max(3.0, 0.25 * g.shape[0] + 1.5)))
    im = ax.imshow(g, aspect="auto", cmap="viridis", origin="lower")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("prefix token")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
