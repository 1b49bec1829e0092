"""Where a table run's time goes: one training step of a real model, profiled; the matrix rates at its shape.

Prints (1) the median time of a training step of METHOD on a batch of 16 TASK examples around the median length
(one thread, as the accuracy table runs; for a prompt method on a decoder, first the step with the prompt
concatenated vs run once as a shared prefix, and on a Llama-family model the step without vs with the fused
RMSNorm / SwiGLU / rotary kernels, alternately), (2) the torch profiler's ops by self CPU time, (3) the fp32 and bf16
rates of a product of the model's MLP shape (16 x 80 tokens, 576 -> 1536), (4) the fixed cost of one
forward pass in tokens, (5) the padding of the evaluation batches (the validation split of 50 examples and the dev
set: sorted chunks of 64 and of 16 rows, and ``predict_scores``' split) and the time of ``predict_scores`` on the
validation split with each.

    OMP_NUM_THREADS=1 python benchmarks/train_step/profile_step.py lt-prefix rte --json benchmarks/results/profile_step_lt-prefix_rte.json

``--json`` writes every figure printed (step times and ratios, the profile's shares, rates, overhead, padding) with
the machine (CPU model, AMX / AVX512-BF16 flags, threads), date, git commit and command: the record that the
figures quoted in ``benchmarks/RESULTS.md`` come from.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]


def training_step(method="lt-prefix", task="rte", model="smollm2-135m"):
    """The table's set-up of ``method`` on ``task`` (200 training examples, seed 0) and a batch of the 16 examples
    around the median length. Returns ``(clf, enc, (ids, mask, labels), step, median_step)``: ``step()`` runs one
    forward + backward, ``median_step()`` the median of 5 timed steps after 2 warm-up steps."""
    import torch

    import ltuning
    from ltuning.data import collate, label_names_of, load_split
    from common import DATA

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train = random.Random(0).sample(load_split(os.path.join(DATA, task), "train"), 200)
    clf = ltuning.Classifier(model, method)
    torch.manual_seed(0)
    clf.build(label_names_of(train))
    enc = clf.encode(train)
    order = sorted(range(len(enc.input_ids)), key=lambda i: len(enc.input_ids[i]))
    b = order[92:108]  # 16 examples around the median length
    batch = collate([enc.input_ids[i] for i in b], clf.model.tokenizer.pad_token_id, [enc.labels[i] for i in b])
    ids, mask, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
    m = clf.model
    m.train()
    params = list(m.trainable_parameters())

    def step():
        loss, _ = m.loss(ids, mask, lab)
        loss.backward()
        for p in params:
            p.grad = None

    def median_step():
        for _ in range(2):
            step()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    return clf, enc, (ids, mask, lab), step, median_step


def machine_record() -> dict:
    """Where a figure was measured: CPU model name, whether AMX-BF16 / AVX512-BF16 are present, cores, threads."""
    import torch

    name, flags = platform.processor() or "cpu", set()
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    name = ln.split(":", 1)[1].strip()
                elif ln.startswith("flags"):
                    flags = set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": name, "arch": platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.dirname(HERE)), capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(method="lt-prefix", task="rte", model="smollm2-135m", json_path=None, note="", rounds=2) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ltuning.batching import plan_batches as sorted_batches
    from ltuning.data import load_split
    from ltuning.inference import OVERHEAD_TOKENS, predict_scores
    sys.path.insert(0, HERE)
    from bench_train_step import product_rate
    from common import DATA

    rec = {"command": "OMP_NUM_THREADS=%s python benchmarks/train_step/profile_step.py %s" % (
               os.environ.get("OMP_NUM_THREADS", "(unset)"), " ".join(sys.argv[1:])),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
           "machine": machine_record(), "note": note, "method": method, "task": task, "model": model}
    clf, enc, (ids, mask, lab), step, median_step = training_step(method, task, model)
    m = clf.model
    rec["batch"] = list(ids.shape)

    def timed():
        """Medians of 5 steps after 2 warm-up steps: (wall s, process CPU s). With one thread the CPU time is far
        less sensitive to other jobs on a shared machine than the wall time."""
        for _ in range(2):
            step()
        wall, cpu = [], []
        for _ in range(5):
            t, c = time.perf_counter(), time.process_time()
            step()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return statistics.median(wall), statistics.median(cpu)

    def alternate(name, switch, labels):
        """``rounds`` x (off, on) alternately; medians of each side, wall and CPU; the ratio off / on."""
        pairs = []
        for _ in range(rounds):
            for flag in (False, True):
                switch(flag)
                pairs.append((flag, *timed()))
        res = {"pairs [flag, wall_s, cpu_s]": pairs}
        for i, kind in ((1, "wall"), (2, "cpu")):
            off = statistics.median(p[i] for p in pairs if not p[0])
            on = statistics.median(p[i] for p in pairs if p[0])
            res[f"{labels[0]}_{kind}_s"], res[f"{labels[1]}_{kind}_s"], res[f"speedup_{kind}"] = off, on, off / on
        print(f"{name}: {labels[0]} {res[labels[0] + '_wall_s']:.2f} s, {labels[1]} {res[labels[1] + '_wall_s']:.2f} s "
              f"wall ({res['speedup_wall']:.2f}x); CPU time {res['speedup_cpu']:.2f}x")
        return res

    if m.method.kind == "prompt" and m.prompt_as_prefix:  # the same step with the prompt concatenated, alternately
        rec["prompt_as_prefix"] = alternate("prompt concatenated [p ; x] vs run once as a shared prefix",
                                            lambda f: setattr(m, "prompt_as_prefix", f),
                                            ("concatenated", "shared_prefix"))
    from ltuning.models.fused_ops import disable_fused_ops, enable_fused_ops, fused_ops_enabled
    if fused_ops_enabled(m.base):  # the same step without the fused RMSNorm / SwiGLU / rotary kernels, alternately
        rec["fused_ops"] = alternate("fused RMSNorm / SwiGLU / rotary kernels",
                                     lambda f: (enable_fused_ops if f else disable_fused_ops)(m.base), ("off", "on"))
    rec["step_median_s"] = median_step()
    print(f"{model} {task} {method}: batch {tuple(ids.shape)}, step median {rec['step_median_s']:.2f} s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    avg = prof.key_averages()
    print(avg.table(sort_by="self_cpu_time_total", row_limit=20))
    total = sum(e.self_cpu_time_total for e in avg) or 1.0
    shares = sorted(((e.key, e.self_cpu_time_total / total) for e in avg), key=lambda kv: -kv[1])
    rec["profile_self_cpu_share"] = dict(shares[:20])
    rec["matrix_product_share"] = sum(v for k, v in shares if k in ("aten::mm", "aten::addmm", "aten::bmm",
                                                                     "aten::matmul", "aten::linear"))
    fp32, bf16 = (1000 * product_rate(16 * 80, 576, 1536, dt, 20) for dt in (torch.float32, torch.bfloat16))
    print(f"matrix rate at 1280x576x1536: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s")
    rec["matrix_rate_gflops"] = {"fp32": fp32, "bf16": bf16, "shape": [16 * 80, 576, 1536]}
    small, per_token = overhead_times(m, ids)
    rec["forward_overhead"] = {"ms_1x8": 1000 * small, "ms_per_token_8x128": 1000 * per_token,
                               "overhead_tokens": (small - 8 * per_token) / per_token}
    print(f"one forward pass, eval mode: {overhead_line(small, per_token)}")
    rec["evaluation_batches"] = []
    val_ids = enc.input_ids[:50]
    dev_ids = clf.encode(load_split(os.path.join(DATA, task), "dev")).input_ids
    for name, x in (("validation (50)", val_ids), ("dev", dev_ids)):
        ls = [len(t) for t in x]
        for bs, ovh in ((64, None), (16, None), (64, OVERHEAD_TOKENS["cpu"])):
            batches = sorted_batches(ls, bs, ovh)
            padded = sum(len(b) * max(ls[i] for i in b) for b in batches)
            how = f"batches of {bs}" if ovh is None else f"<= {bs} rows, overhead_tokens={ovh}"
            line = f"{name}, {how}: {len(batches)} batches, computes {padded / sum(ls):.2f}x its real tokens"
            row = {"split": name, "batch_size": bs, "overhead_tokens": ovh, "batches": len(batches),
                   "padded_over_real": padded / sum(ls)}
            if name.startswith("validation"):
                t = time.perf_counter()
                predict_scores(m, x, bs, overhead_tokens=ovh)
                row["predict_scores_s"] = time.perf_counter() - t
                line += f", predict_scores {row['predict_scores_s']:.1f} s"
            rec["evaluation_batches"].append(row)
            print(line)
    if json_path:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, json_path)
        print(f"wrote {json_path}")
    return rec


def overhead_times(model, ids) -> tuple:
    """Medians of a 1 x 8 token forward (s) and of an 8 x 128 token forward per token (s)."""
    import torch

    def t(B, L):
        x = ids[:1, :1].expand(B, L).contiguous()
        mask = torch.ones_like(x)
        with torch.inference_mode():
            model(x, mask)
            ts = []
            for _ in range(5):
                s = time.perf_counter()
                model(x, mask)
                ts.append(time.perf_counter() - s)
        model.train()
        return statistics.median(ts)

    model.eval()
    small, big = t(1, 8), t(8, 128)
    return small, big / (8 * 128)


def overhead_line(small, per_token) -> str:
    """The fixed cost of a forward pass in tokens, from :func:`overhead_times`."""
    return (f"1 x 8 tokens {1000 * small:.0f} ms, 8 x 128 tokens {1000 * per_token:.2f} ms per token: "
            f"overhead ~{(small - 8 * per_token) / per_token:.0f} tokens")



if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", nargs="?", default="lt-prefix")
    ap.add_argument("task", nargs="?", default="rte")
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--json", help="write the figures and where they were measured to this JSON file")
    ap.add_argument("--note", default="", help="recorded in the JSON, e.g. 'machine shared with other jobs'")
    ap.add_argument("--rounds", type=int, default=2, help="(off, on) rounds of each alternated comparison")
    a = ap.parse_args()
    main(a.method, a.task, a.model, a.json, a.note, a.rounds)
