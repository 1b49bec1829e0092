"""Are a model's pooled features still informative once a method's (untrained) prefix or prompt is attached?

For each method: patch the frozen model with a freshly initialised method (seed 0), pool the features the
head would read for ``--train`` SST-2 training sentences and ``--dev`` dev sentences, fit a standardised
logistic-regression probe on the training features (Adam, 300 full-batch steps, L2 1e-3) and report its dev
accuracy. Label-conditioned methods (lt-*) are probed twice: with label entry 0 for every sentence, and on
the difference h(x | y_1) - h(x | y_0) of the two label entries (a binary task), which is all a shared scalar
head w can read (score_1 - score_0 = w . difference). A method whose
probe falls far below ``linear-probe`` (no prefix) destroys the representation at initialisation; one that
stays close but trains to chance fails in training instead.

    python benchmarks/train_step/feature_probe.py --model smollm2-135m [--methods linear-probe,prefix,lt-prefix,sk-prefix]
    (variants as in the accuracy table, benchmarks/accuracy/experiment.py: "lt-prefix:variant=kv+position_offset=prefix")
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
from common import DATA, group  # noqa: E402

group("accuracy")
from experiment import parse_method  # noqa: E402  (the method-variant syntax of the accuracy table)
DATA = os.path.join(DATA, "sst2")


def probe_accuracy(xtr, ytr, xdv, ydv, steps=300) -> float:
    import torch
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xdv - mu) / sd
    w = torch.zeros(a.shape[1], 2, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (torch.nn.functional.cross_entropy(a @ w, ytr) + 1e-3 * w.pow(2).sum()).backward()
        opt.step()
    return ((b @ w).argmax(-1) == ydv).float().mean().item()


def main(argv=None) -> int:
    import torch

    import ltuning
    from ltuning.data import default_label_text, load_split
    from ltuning.models import load_base

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="linear-probe,prefix,lt-prefix,sk-prefix")
    ap.add_argument("--data", default=DATA, help="an SST-2-like directory (train.jsonl, dev.jsonl)")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--dev", type=int, default=300)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)

    base, tok = load_base(a.model)
    tr = random.Random(0).sample(load_split(a.data, "train"), a.train)
    dv = random.Random(1).sample(load_split(a.data, "dev"), a.dev)
    labels = sorted({r["label"] for r in tr})
    ytr = torch.tensor([labels.index(r["label"]) for r in tr])
    ydv = torch.tensor([labels.index(r["label"]) for r in dv])

    def features(m, recs, entry=0):
        out = []
        for i in range(0, len(recs), 32):
            enc = tok([r["text"] for r in recs[i:i + 32]], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
            with torch.no_grad():
                idx = torch.full((len(enc["input_ids"]),), entry, dtype=torch.long)
                out.append(m.encode(enc["input_ids"], enc["attention_mask"], idx))
        return torch.cat(out)

    rows = []
    for method in a.methods.split(","):
        torch.manual_seed(0)
        name, opts = parse_method(method)
        cfg = ltuning.make_config(name, label_names=labels, label_texts=[default_label_text(n) for n in labels],
                                  **opts)
        m = ltuning.patch(base, cfg, tok)
        diff_acc = None
        try:
            xtr, xdv = features(m, tr), features(m, dv)
            if m.method.label_conditioned and len(labels) == 2:
                dtr, ddv = features(m, tr, 1) - xtr, features(m, dv, 1) - xdv
                diff_acc = probe_accuracy(dtr, ytr, ddv, ydv)
        finally:
            ltuning.unpatch(m)
        acc = probe_accuracy(xtr, ytr, xdv, ydv)
        rows.append({"method": method, "probe_dev_accuracy": acc, "feature_norm": xtr.norm(dim=-1).mean().item(),
                     "difference_probe_dev_accuracy": diff_acc})
        extra = "" if diff_acc is None else f"   label-difference probe {100 * diff_acc:5.1f} %"
        print(f"{method:14s} probe dev accuracy {100 * acc:5.1f} %   mean feature norm {rows[-1]['feature_norm']:.1f}"
              + extra, flush=True)
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump({"model": a.model, "train": a.train, "dev": a.dev, "rows": rows}, f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
