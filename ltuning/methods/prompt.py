"""Prompt tuning (Lester et al. 2021): P trainable vectors prepended to the frozen input embeddings.

``inputs_embeds = [prompt (P, d) ; E(x) (L, d)]`` (B, P + L, d) on encoders; on decoders the prompt runs once as a
shared prefix with the same result (:mod:`.injection`). An ordinary K-way linear head reads the pooled output:
logits (B, K) = W pool(M([prompt ; E(x)])) + b.
Initialisation: ``"vocab"`` (embeddings of P random vocabulary tokens) or ``"text"`` (the tokens of
``init_text``, repeated/truncated to P).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from .base import Method, MethodConfig, register_method


@dataclass
class PromptConfig(MethodConfig):
    cli_help: ClassVar[dict] = {**MethodConfig.cli_help, 'num_virtual_tokens': 'number of virtual tokens P (prompt, prefix)', 'init': 'prompt initialisation: vocab or text', 'init_text': 'text to initialise the prompt from (--init text)'}
    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: Optional[str] = None


def init_token_ids(tokenizer, n: int, init: str, text: Optional[str], vocab_size: int) -> torch.Tensor:
    """Token ids to initialise ``n`` soft tokens from: random vocabulary ids or the tokens of ``text``."""
    if init == "text":
        if not text:
            raise ValueError("init='text' needs init_text")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        reps = -(-n // len(ids))
        return torch.tensor((ids * reps)[:n])
    if init == "vocab":
        return torch.randint(0, min(vocab_size, 5000), (n,))
    raise ValueError(f"unknown init {init!r}; expected 'vocab' or 'text'")


@register_method("prompt")
class PromptTuning(Method):
    default_lr = 3e-2
    lr_grid = (1e-2, 3e-2, 1e-1)
    config_class = PromptConfig
    kind = "prompt"

    def __init__(self, config: PromptConfig, info, base, tokenizer, cache=None):
        super().__init__(config, info, base, tokenizer, cache)
        emb = base.get_input_embeddings().weight
        ids = init_token_ids(tokenizer, config.num_virtual_tokens, config.init, config.init_text, emb.shape[0])
        self.embedding = nn.Parameter(emb.detach()[ids].float().clone())

    def prompts(self):
        P = self.embedding.shape[0]
        return self.embedding[None], torch.ones(1, P, dtype=torch.bool, device=self.embedding.device)
