"""Heat-map of a trained APT adapter's gates: mean of lambda_i * alpha_i over dev examples, per layer x prefix token.

    python benchmarks/accuracy/plot_apt_gates.py --adapter runs/sst2-apt --data ../shared/data/sst2 --out apt_gates.png
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


def main() -> None:
    import torch

    from ltuning import Classifier
    from ltuning.data import collate, load_split
    from ltuning.methods.apt import plot_gates

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="directory of an adapter trained with --method apt")
    ap.add_argument("--data", required=True, help="directory with dev.jsonl")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--max-examples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()

    clf = Classifier.from_pretrained(a.adapter)
    model, method = clf.model, clf.model.method
    if model.config.method != "apt":
        raise SystemExit(f"{a.adapter}: an adapter of method {model.config.method!r}, not apt")
    ids = clf.encode(load_split(a.data, "dev")[:a.max_examples], with_labels=False).input_ids
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(ids), a.batch_size):
            batch = collate(ids[s:s + a.batch_size], model.tokenizer.pad_token_id)
            x, mask = batch["input_ids"], batch["attention_mask"]
            model(x, mask)
            total = total + torch.stack(method.last_gates()).sum(1)  # (layers, P)
            n += x.shape[0]
    gates = method.lambdas.detach()[:, None] * total / n
    plot_gates(gates, a.out, f"APT: mean lambda * alpha ({n} dev examples)")
    print(f"wrote {a.out}; layer scales lambda = {[round(v, 3) for v in method.lambdas.tolist()]}")


if __name__ == "__main__":
    main()
