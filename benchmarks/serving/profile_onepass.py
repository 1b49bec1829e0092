"""Where a one-pass training step's time goes at K = 77 (BANKING77), against LoRA: the torch profiler's self CPU
time of one step, split into four parts by what each op works on.

* ``bank attention``: the shared-prefix attention op (``ltuning::prefix_attention*``, forward and backward), i.e.
  every input token attending to the label bank (and to its own tokens);
* ``label generator``: matrix products with a dimension that is a multiple of the number of bank tokens T (the
  label-side generator over the T label tokens and its backward; the per-layer maps of the ``kv`` variant, batched
  as (layers, Hkv x T, D));
* ``model matmuls``: every other matrix product (the frozen model's Linears over the padded batch, forward and
  input-gradient backward, LoRA's own);
* ``other``: everything else (norms, activations, copies, the optimizer); its 12 largest ops by self time are
  listed per row (``other_top_ms``).

Same batch as ``bench_scoring.py`` (16 seeded BANKING77 training examples, AdamW), two warm-up steps, then the median
of ``--steps`` timed steps and one profiled step (its total is the profiler's, a little above the timed median).
``--mode classify``: the same split of one inference forward (eval, ``inference_mode``, the label bank built once
and cached as ``ltuning classify`` does) over ``--batch`` seeded BANKING77 examples instead of a training step.

    OMP_NUM_THREADS=1 python benchmarks/serving/profile_onepass.py --models minilm-l6,smollm2-135m \
        --json benchmarks/results/profile_onepass_k77.json
    OMP_NUM_THREADS=1 python benchmarks/serving/profile_onepass.py --mode classify --batch 64 --models smollm2-135m \
        --json benchmarks/results/profile_onepass_k77_classify.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE), HERE]
from bench_scoring import bank_tokens, load_task, machine, make_model, parse_method  # noqa: E402
from common import ROOT  # noqa: E402

PARTS = ("bank attention", "label generator", "model matmuls", "other")


def part_of(name: str, shapes, bank_tokens) -> str:
    if name.startswith("ltuning::prefix_attention") or "prefix_attention_cpu" in name:
        return "bank attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"):
        dims = {d for s in shapes for d in (s or []) if isinstance(d, int) and d > 0}
        label_side = bank_tokens and any(d % bank_tokens == 0 for d in dims)  # (T, .) or (layers, Hkv * T, D)
        return "label generator" if label_side else "model matmuls"
    return "other"


def profile(model_name: str, config: str, steps: int, mode: str = "train", batch: int = 16) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from ltuning.data import collate, encode, label_names_of
    from ltuning.models import load_base
    from ltuning.train import make_optimizer

    base, tok = load_base(model_name)
    recs = load_task(77)
    names = label_names_of(recs)
    torch.manual_seed(0)
    model = make_model(config, base, tok, names)  # "onepass", "onepass:variant=pooled", "lora", ...
    tokens = None if parse_method(config)[0] == "lora" else bank_tokens(model)
    sample = random.Random(0).sample(recs, batch)
    enc = encode(sample, tok, names, 128, model.info.causal)
    b = collate(enc.input_ids, tok.pad_token_id, enc.labels)
    if mode == "classify":
        model.eval()

        def step():
            with torch.inference_mode():
                model(b["input_ids"], b["attention_mask"])
    else:
        opt = make_optimizer(model.trainable_parameters(), 1e-4)  # the trainer's AdamW
        model.train()

        def step():
            loss, _ = model.loss(b["input_ids"], b["attention_mask"], b["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    ms, other = dict.fromkeys(PARTS, 0.0), {}
    for ev in prof.key_averages(group_by_input_shape=True):
        part = part_of(ev.key, ev.input_shapes, tokens)
        ms[part] += ev.self_cpu_time_total / 1000
        if part == "other":
            other[ev.key] = other.get(ev.key, 0.0) + ev.self_cpu_time_total / 1000
    total = sum(ms.values())
    per_s = batch / statistics.median(times)
    return {"model": model_name, "config": config, "mode": mode, "batch": batch, "bank_tokens": tokens,
            "padded_input_tokens": int(b["attention_mask"].numel()),
            "real_input_tokens": int(b["attention_mask"].sum()), "step_times_s": times,
            "median_step_s": statistics.median(times),
            ("classify_examples_per_s" if mode == "classify" else "train_examples_per_s"): per_s,
            "profiled_total_ms": total, "parts_ms": ms, "parts_share": {k: v / total for k, v in ms.items()},
            "other_top_ms": dict(sorted(other.items(), key=lambda kv: -kv[1])[:12])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm-l6,smollm2-135m")
    ap.add_argument("--configs", default="onepass,lora")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mode", choices=("train", "classify"), default="train")
    ap.add_argument("--batch", type=int, default=16, help="examples per step / forward")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    rows = []
    for m in a.models.split(","):
        for c in a.configs.split(","):
            r = profile(m, c, a.steps, a.mode, a.batch)
            rows.append(r)
            rate = r.get("classify_examples_per_s", r.get("train_examples_per_s"))
            print(f"{m:14s} {c:8s} {rate:6.2f} ex/s  " + "  ".join(
                f"{k} {v:6.0f} ms ({100 * r['parts_share'][k]:.0f} %)" for k, v in r["parts_ms"].items()), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"command": "OMP_NUM_THREADS=1 python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "git_commit": commit, "machine": machine(), "rows": rows}
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", a.json)


if __name__ == "__main__":
    main()
