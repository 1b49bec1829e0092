"""Where the transformer blocks of a bare backbone live (shared by methods that hook every block)."""
from __future__ import annotations

from torch import nn


def transformer_layers(base) -> nn.ModuleList:
    """The list of transformer blocks of a bare Llama-family (``layers``) or BERT-family (``encoder.layer``) model."""
    layers = getattr(base, "layers", None)
    if layers is None:
        layers = base.encoder.layer
    return layers
