"""Frozen elements each rank stores under ``--fsdp`` for Llama-2-7B's backbone, counted on the meta device.

The real architecture (``LlamaConfig`` of Llama-2-7B: 32 layers, d 4096, 32 heads, FFN 11008, vocabulary 32000) is
built on the meta device (no memory, no download); its parameters are counted: those of the transformer layers
(sharded by :func:`ltuning.distributed.shard_frozen_base`: rank r stores its dim-0 chunk, ceil(n / N) rows of each
weight) and the rest (embeddings and final norm, replicated on every rank). For N ranks, rank 0 (the largest chunk)
stores ``rest + sum over layer weights of ceil(rows / N) * cols``. A count, not a run: no GPU here.

    python benchmarks/train_step/fsdp_shares.py --json benchmarks/results/fsdp_7b_shares.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
from common import RESULTS, atomic_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="2,4,8")
    ap.add_argument("--json", default=os.path.join(RESULTS, "fsdp_7b_shares.json"))
    a = ap.parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    layer_params = [p for layer in model.layers for p in layer.parameters()]
    ids = {id(p) for p in layer_params}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in ids)
    layers = sum(p.numel() for p in layer_params)
    total = rest + layers
    shares = {}
    for n in (int(x) for x in a.ranks.split(",")):
        mine = rest + sum(-(-p.shape[0] // n) * (p.numel() // p.shape[0]) for p in layer_params)
        shares[str(n)] = {"elements_rank0": mine, "share": mine / total, "bf16_GB": mine * 2 / 1e9}
    res = {"what": "Llama-2-7B backbone (no LM head): frozen elements stored by rank 0 under --fsdp for N ranks; "
                   "counted on the meta device, not a run",
           "total_elements": total, "layer_elements": layers, "replicated_elements": rest,
           "replicated_share": rest / total, "per_ranks": shares,
           "command": "python benchmarks/train_step/fsdp_shares.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(res, indent=1))
    atomic_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
