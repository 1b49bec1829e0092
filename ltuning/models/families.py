"""What ltuning needs to know about a supported architecture family, read from its Hugging Face config."""
from __future__ import annotations

from dataclasses import dataclass

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")


@dataclass(frozen=True)
class ModelInfo:
    """Shapes of a supported model. ``family`` is ``"decoder"`` (causal, Llama-like) or ``"encoder"`` (BERT-like)."""
    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def causal(self) -> bool:
        return self.family == "decoder"

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def model_info(model) -> ModelInfo:
    """Read :class:`ModelInfo` from ``model.config``; a clear error for unsupported architectures."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt in DECODER_TYPES:
        family = "decoder"
    elif mt in ENCODER_TYPES:
        family = "encoder"
    else:
        raise NotImplementedError(
            f"ltuning does not support model_type={mt!r}; supported: Llama family {DECODER_TYPES} "
            f"and BERT family {ENCODER_TYPES}")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelInfo(family, mt, cfg.num_hidden_layers, cfg.hidden_size, heads,
                     getattr(cfg, "num_key_value_heads", None) or heads, head_dim)
