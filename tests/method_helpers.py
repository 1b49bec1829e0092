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

