"""Run by ``tests/serving/test_fsdp.py`` under ``torchrun --nproc-per-node 2`` (gloo): FSDP2 over the frozen base.

``python -m torch.distributed.run --nproc-per-node 2 tests/serving/fsdp_worker.py WORKDIR CLI_ARGS...``.
WORKDIR holds ``llama/``, ``bert/`` (tiny random models) and ``data/``. Each rank:

1. before joining the process group, trains every case of :data:`CASES` in one process (the reference);
2. joins the group (gloo) and trains every case again twice: plain data parallel (DDP over the trainables) and
   with ``fsdp=True`` (the base's layers sharded); checks that every sharded weight is a DTensor whose local
   shard holds rows ``[r * ceil(n / 2), ...)`` of the full weight, i.e. the rank's half;
3. rank 0 writes ``WORKDIR/fsdp_cases.json``: per case, the relative error of each adapter tensor between the
   runs and the frozen-parameter counts each rank stores;
4. runs ``ltuning train CLI_ARGS`` (``ltuning.cli.main``; the group is already joined, main leaves it at the end).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

CASES = {
    # the prompt bank's K/V captured from inside the sharded layers every step (two base forwards per step),
    # gradient checkpointing, the fused RMSNorm / SwiGLU / rotary kernels and RoPE of a Llama
    "llama-lt-prompt-ckpt": ("llama", "lt-prompt", {"gradient_checkpointing": True}),
    # forward hooks on Linears inside the sharded layers (LoRA), a BERT
    "bert-lora": ("bert", "lora", {}),
}


def fit_case(work, model, method, extra, fsdp):
    from ltuning.classifier import Classifier
    from ltuning.data import load_split
    clf = Classifier(os.path.join(work, model), method, label_names=["negative", "positive"])
    hist = clf.fit(load_split(os.path.join(work, "data"), "train")[:23], progress=False, seed=3, epochs=1.0,
                   batch_size=3, eval_every=3, fsdp=fsdp, **extra)
    state = {k: v for k, v in clf.model.adapter_state_dict().items() if v.is_floating_point()}
    return clf, state, hist


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def local_rows_ok(clf) -> bool:
    """Every sharded frozen weight: a DTensor whose local tensor is this rank's dim-0 chunk of the full one."""
    W, r = dist.get_world_size(), dist.get_rank()
    ok = n = 0
    for p in clf.model.base.parameters():
        if not hasattr(p, "to_local"):
            continue
        full, local = p.full_tensor(), p.to_local()
        chunk = -(-full.shape[0] // W)
        ok += int(torch.equal(local, full[r * chunk:(r + 1) * chunk]))
        n += 1
    return n > 0 and ok == n


def main(work, cli_args):
    refs = {name: fit_case(work, *case, fsdp=False)[1] for name, case in CASES.items()}  # one process
    dist.init_process_group("gloo")
    out = {}
    for name, case in CASES.items():
        _, ddp, _ = fit_case(work, *case, fsdp=False)
        clf, fs, hist = fit_case(work, *case, fsdp=True)
        out[name] = {"fsdp_vs_one": {k: rel(fs[k], refs[name][k]) for k in fs},
                     "fsdp_vs_ddp": {k: rel(fs[k], ddp[k]) for k in fs},
                     "frozen": hist["fsdp_frozen_parameters"], "local_rows_ok": local_rows_ok(clf)}
    oks = [None] * dist.get_world_size()
    dist.all_gather_object(oks, {k: v["local_rows_ok"] for k, v in out.items()})
    if dist.get_rank() == 0:
        for name in out:
            out[name]["local_rows_ok"] = all(o[name] for o in oks)
        with open(os.path.join(work, "fsdp_cases.json"), "w") as f:
            json.dump(out, f, indent=1)
    from ltuning.cli import main as cli_main
    return cli_main(cli_args)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
