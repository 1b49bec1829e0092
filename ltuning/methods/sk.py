"""SK-Tuning (Prottasha et al. 2024): a task-description text replaces random prefix / prompt tokens.

``task_text`` (default: one sentence per known label set, see :func:`default_task_text`) has T tokens.

``sk-prefix`` -- the frozen model prefills the text ONCE (the "text cache": its own per-layer keys/values after
  RoPE, :func:`ltuning.models.capture_kv`), stored with the adapter as buffers
  ``text_keys`` / ``text_values`` (layers, Hkv, T, D) and recomputed only when the text or the base model
  changes. Layer i's prefix (one bank entry, P = T) is
      K'_i = K_i (I + dWk_i) + bk_i,   V'_i = V_i (I + dWv_i) + bv_i     (:mod:`.kv_maps`)
  i.e. one Linear(head_dim, head_dim) per layer on K and one on V, shared by the heads and tokens, written as
  identity + a zero-initialised residual so training starts from the text's own K/V (and weight decay pulls
  towards the identity). Input positions continue after the text (``position_offset="prefix"``), so at
  initialisation a decoder computes exactly what it computes on ``[text ; input]``. Our reading: the text is
  tokenised as a standalone text (with the tokenizer's special tokens); for bidirectional encoders the text's
  K/V do not see the input (unlike a concatenated input).
``sk-prompt`` -- trainable embeddings initialised from the text's token embeddings E(text) (T, d) (no special
  tokens: the prompt goes in front of the input's own), passed through an optional Linear(d, d) initialised
  to the identity (``projection=True``: e + e dW + b, dW and b zero-initialised), prepended to E(x).
  ``projection`` is off by default, chosen by GLUE dev scores (SST-2, 500 training examples, 3 seeds; figures in
  ``benchmarks/RESULTS.md``; to be redone by validation selection, issue 20): on SmolLM2 the projection collapsed
  to chance on some seeds and no run without it did; on MiniLM the two are equal within noise. The d x d map's
  Adam steps add up over d inputs and soon outgrow a decoder's small embeddings, the same scale problem as
  lt-prompt's.
Both have an ordinary K-way classification head (not label-conditioned).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..models import capture_kv
from .base import Method, MethodConfig, register_method
from .kv_maps import add_kv_maps, apply_kv_maps

TASK_TEXTS = {
    frozenset({"negative", "positive"}): "Classify the sentiment of this movie review as negative or positive.",
    frozenset({"acceptable", "unacceptable"}): "Decide whether this sentence is grammatically acceptable or "
                                               "unacceptable.",
    frozenset({"entailment", "not_entailment"}): "Decide whether the premise entails the hypothesis.",
    frozenset({"equivalent", "not_equivalent"}): "Decide whether the two sentences are paraphrases of each other.",
    frozenset({"entailment", "neutral", "contradiction"}): "Decide whether the premise entails, contradicts or "
                                                           "is neutral to the hypothesis.",
}


def default_task_text(label_names: list) -> str:
    """The task description of a known label set, else ``"Classify this text as a, b or c."``."""
    text = TASK_TEXTS.get(frozenset(label_names))
    if text:
        return text
    names = [n.replace("_", " ") for n in label_names]
    return f"Classify this text as {', '.join(names[:-1])} or {names[-1]}."


@dataclass
class SKConfig(MethodConfig):
    cli_help: ClassVar[dict] = {**MethodConfig.cli_help, 'task_text': 'task description whose K/V (sk-prefix) or embeddings (sk-prompt) start the tuning'}
    task_text: Optional[str] = None


@dataclass
class SKPrefixConfig(SKConfig):
    position_offset: str = "prefix"


@dataclass
class SKPromptConfig(SKConfig):
    cli_help: ClassVar[dict] = {**SKConfig.cli_help, 'projection': 'sk-prompt: a trainable Linear(d, d) on the prompt'}
    projection: bool = False


class SKMethod(Method):
    """Base of sk-prefix / sk-prompt: resolves the task text into the config (the saved adapter records it)."""

    def __init__(self, config, info, base, tokenizer, cache=None):
        super().__init__(config, info, base, tokenizer, cache)
        if not config.task_text:
            config.task_text = default_task_text(config.label_names)


@torch.no_grad()
def prefill_text(base, tokenizer, text: str):
    """One no-grad forward of ``text``: its per-layer ``(keys, values)``, each (layers, Hkv, T, D) fp32."""
    dev = base.get_input_embeddings().weight.device
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(dev)
    kv = capture_kv(base, input_ids=ids, attention_mask=torch.ones_like(ids))
    keys = torch.stack([k[0] for k, _ in kv]).float()
    values = torch.stack([v[0] for _, v in kv]).float()
    return keys, values


@register_method("sk-prefix")
class SKPrefix(SKMethod):
    config_class = SKPrefixConfig
    kind = "prefix"
    cache_fields = ("task_text",)  # config fields the text cache derives from (besides the base model)

    def __init__(self, config: SKPrefixConfig, info, base, tokenizer, cache=None):
        super().__init__(config, info, base, tokenizer, cache)
        self.load_cache(cache, base, tokenizer)
        add_kv_maps(self, info.num_layers, info.head_dim)

    def refresh_cache(self, base, tokenizer) -> None:
        keys, values = prefill_text(base, tokenizer, self.config.task_text)
        self.register_buffer("text_keys", keys)
        self.register_buffer("text_values", values)

    def cache_keys(self) -> list:
        return ["text_keys", "text_values"]

    def prefix(self):
        k, v = apply_kv_maps(self, self.text_keys, self.text_values)
        return [x[None] for x in k.unbind(0)], [x[None] for x in v.unbind(0)]


@register_method("sk-prompt")
class SKPrompt(SKMethod):
    config_class = SKPromptConfig
    kind = "prompt"

    def __init__(self, config: SKPromptConfig, info, base, tokenizer, cache=None):
        super().__init__(config, info, base, tokenizer, cache)
        emb = base.get_input_embeddings().weight
        ids = tokenizer(config.task_text, add_special_tokens=False)["input_ids"]
        self.embedding = nn.Parameter(emb.detach()[torch.tensor(ids, device=emb.device)].float().clone())
        d = info.hidden_size
        if config.projection:
            self.projection_delta = nn.Parameter(torch.zeros(d, d))
            self.projection_bias = nn.Parameter(torch.zeros(d))

    def prompts(self):
        e = self.embedding
        if self.config.projection:
            e = e + e @ self.projection_delta + self.projection_bias
        return e[None], torch.ones(1, e.shape[0], dtype=torch.bool, device=e.device)
