"""Model families, loading and drop-in attention patching."""
from .attention import PrefixInputs, capture_kv, disable, enable, ltuning_attention_forward, register
from .families import ModelInfo, model_info
from .registry import NAMED_MODELS, check_model, fingerprint, load_base, resolve_model

__all__ = ["PrefixInputs", "capture_kv", "disable", "enable", "ltuning_attention_forward", "register", "ModelInfo", "model_info",
           "NAMED_MODELS", "check_model", "fingerprint", "load_base", "resolve_model"]
