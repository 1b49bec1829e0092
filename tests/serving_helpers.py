"""Helpers of the serving tests: tiny adapters trained on real MiniLM + SST-2, their reference scores."""
from __future__ import annotations

import json
import os
import socket

import torch

DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))

TEXTS = ["a gripping , beautifully made film .", "dull and lifeless", "it 's a charming and often affecting journey .",
         "the plot makes no sense at all , and the acting is worse .", "ok", "an utterly forgettable sequel",
         "one of the year 's best", "i walked out halfway through"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tiny(method: str, out: str, base, tok, steps: int = 3, seed: int = 0, extra_texts=()) -> torch.Tensor:
    """A few AdamW steps of ``method`` on 48 SST-2 training examples, saved to ``out``. Returns the reference
    scores (len(TEXTS) + len(extra_texts), 2) of the trained model through :meth:`Classifier.predict_scores`;
    the method is removed from ``base`` afterwards (``ltuning.unpatch``)."""
    import ltuning
    from ltuning.data import collate, read_records

    torch.manual_seed(seed)
    clf = ltuning.Classifier("minilm-l6", method, base=base, tokenizer=tok)
    clf.build(["negative", "positive"])
    recs = read_records(os.path.join(DATA, "sst2", "train.jsonl"))[:48]
    enc = clf.encode(recs)
    opt = torch.optim.AdamW(clf.model.trainable_parameters(), lr=1e-2)
    clf.model.train()
    for s in range(steps):
        b = range(16 * s % 48, 16 * s % 48 + 16)
        batch = collate([enc.input_ids[i] for i in b], tok.pad_token_id, [enc.labels[i] for i in b])
        ids, mask, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
        loss, _ = clf.model.loss(ids, mask, lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.model.eval()
    clf.save_pretrained(out)
    ref = clf.predict_scores(list(TEXTS) + list(extra_texts))
    ltuning.unpatch(clf.model)
    return ref


def write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
