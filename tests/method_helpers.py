"""Helpers shared by the method tests (tests/methods/)."""
import contextlib

import torch

import ltuning

LABELS = ["negative", "positive"]
LT_LABELS = ["negative", "positive", "neutral"]
LT_TEXTS = ["The sentiment is negative.", "The sentiment of the text is positive.", "It is neutral."]


def build(method):
    """``"lt-prefix:kv"`` -> ("lt-prefix", {"variant": "kv"}); plain names -> (name, {})."""
    name, _, variant = method.partition(":")
    return name, ({"variant": variant, "position_offset": "prefix"} if variant else {})


def enc_lt(tok, texts=("great fun", "awful , just awful", "it exists", "a film")):
    return tok(list(texts), padding=True, return_tensors="pt")


def enc(tok, texts=("great fun", "awful , just awful and long", "it exists")):
    return tok(list(texts), padding=True, return_tensors="pt")


@contextlib.contextmanager
def patched(base, tok, method, **options):
    """patch -> yield -> always unpatch (the session models are shared by every test)."""
    m = ltuning.patch(base, ltuning.make_config(method, label_names=options.pop("labels", LABELS), **options), tok)
    try:
        yield m
    finally:
        ltuning.unpatch(m)


def randomize(m, std=0.05):
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * std)


def tiny_base(family, tok):
    """A small random model of the family over the real tokenizer's vocabulary (fp32; built in milliseconds)."""
    torch.manual_seed(0)
    if family == "decoder":
        from transformers import LlamaConfig, LlamaModel
        cfg = LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                          num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
        return LlamaModel(cfg).eval()
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=len(tok), max_position_embeddings=256)
    return BertModel(cfg, add_pooling_layer=False).eval()
