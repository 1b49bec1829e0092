"""A tiny random BERT (2 layers, width 32, a ~100-token word-piece vocabulary) saved as a Hugging Face model
directory: loads in milliseconds, so CLI tests and subprocess tests do not pay for a real model."""
from __future__ import annotations

import os

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "terrible", "film", "movie", "the", "a", "was"]


def make_tiny_bert(directory: str, seed: int = 0) -> str:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(directory, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + list(".,!?'-") + ["##" + c for c in chars] + WORDS
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary as ``vocab`` (``vocab_file=`` is silently ignored: every token became [UNK])
    tok = BertTokenizerFast(vocab=path, do_lower_case=True)
    assert tok.tokenize("good film") == ["good", "film"], tok.tokenize("good film")
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)
        BertModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_data(directory: str, n_train: int = 120, n_dev: int = 30, labels=("negative", "positive"), seed: int = 0):
    """train.jsonl / dev.jsonl of short word sequences whose label follows the words (learnable)."""
    import json
    import random

    rng = random.Random(seed)
    pos, neg = ["good", "fine", "great", "nice"], ["bad", "awful", "poor", "terrible"]
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                k = i % len(labels)
                vocab = pos if k % 2 else neg
                text = " ".join(rng.choice(vocab + ["the", "film", "was"]) for _ in range(rng.randint(3, 9)))
                f.write(json.dumps({"text": text, "label": labels[k]}) + "\n")
    return directory


def make_tiny_llama(directory: str, seed: int = 0, layers: int = 2) -> str:
    """A tiny random Llama (``layers`` decoder layers, width 32, 4 heads of which 2 key/value heads, RoPE) saved as a
    Hugging Face model directory, with the word-piece tokenizer of :func:`make_tiny_bert`."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    make_tiny_bert(directory, seed)  # writes the tokenizer (and a BERT, replaced below)
    for f in ("config.json", "model.safetensors"):
        os.remove(os.path.join(directory, f))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(directory)
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=max(tok.get_vocab().values()) + 1,  # vocab.txt repeats 'a'
                           hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id)
        LlamaModel(cfg).save_pretrained(directory)
    return directory
