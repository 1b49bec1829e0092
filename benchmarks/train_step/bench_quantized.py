"""Frozen-base memory and training-step time: SmolLM2-135M in fp32 vs NF4 vs LLM.int8 (bitsandbytes, CPU).

One process holds the three bases, patched with the same method (LT-prefix by default); the timed steps
(forward + backward + AdamW on the trainables, B real SST-2 training inputs) alternate between the variants
round by round, and the median per variant is reported, so the ratios are taken side by side under the same
load. Memory: the bytes of the frozen base's parameters, buffers and quantization state as stored
(``ltuning.models.quantize.frozen_weight_bytes``), not RSS (three bases share one process).

    OMP_NUM_THREADS=2 python benchmarks/train_step/bench_quantized.py --json benchmarks/results/quantized_step.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
from common import DATA, RESULTS, ROOT, atomic_json  # noqa: E402


def machine_info() -> dict:
    """CPU model, AMX / AVX512-BF16 flags, threads, date, commit (for every JSON of this topic)."""
    import torch

    from ltuning.models.registry import cpu_flags
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    flags = cpu_flags()
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"cpu": model, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
            "load_average_at_start": os.getloadavg(),
            "note": os.environ.get("LTUNING_BENCH_NOTE", "load average at start recorded; other jobs on the "
                                   "machine are not otherwise known to this script")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="lt-prefix")
    ap.add_argument("--variants", default="fp32,nf4,int8")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(RESULTS, "quantized_step.json"))
    a = ap.parse_args(argv)

    import torch

    import ltuning
    from ltuning.data import encode, load_split
    from ltuning.models import load_base
    from ltuning.models.quantize import frozen_weight_bytes
    from ltuning.train import TrainConfig, param_groups

    recs = load_split(os.path.join(DATA, "sst2"), "train")[:a.batch_size]
    names = ["negative", "positive"]
    texts = [f"The sentiment of the text is {n}." for n in names]
    models, opts, mem, loads = {}, {}, {}, {}
    for v in a.variants.split(","):
        t0 = time.perf_counter()
        base, tok = load_base("smollm2-135m", quantize=None if v == "fp32" else v)
        loads[v] = time.perf_counter() - t0
        mem[v] = frozen_weight_bytes(base)
        torch.manual_seed(0)
        m = ltuning.patch(base, ltuning.make_config(a.method, label_names=names, label_texts=texts), tok)
        m.train()
        models[v] = m
        opts[v] = torch.optim.AdamW(param_groups(m, TrainConfig(lr=1e-3)), lr=1e-3)
    enc = encode(recs, models[next(iter(models))].tokenizer, names, 128, True)
    from ltuning.data import collate
    batch = collate(enc.input_ids, models[next(iter(models))].tokenizer.pad_token_id, enc.labels)
    ids, mask, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def step(v):
        t = time.perf_counter()
        loss, _ = models[v].loss(ids, mask, lab)
        opts[v].zero_grad(set_to_none=True)
        loss.backward()
        opts[v].step()
        return time.perf_counter() - t, loss.item()

    for v in models:  # warm-up (kernel builds, first-call costs)
        step(v)
    times = {v: [] for v in models}
    for r in range(a.rounds):
        for v in (list(models) if r % 2 == 0 else list(models)[::-1]):
            dt, loss = step(v)
            times[v].append(dt)
            print(f"round {r} {v}: {dt:.2f} s (loss {loss:.4f})", flush=True)
    ref = statistics.median(times["fp32"]) if "fp32" in times else None
    rows = [{"variant": v, "frozen_base_MB": mem[v] / 2 ** 20, "load_s": loads[v],
             "step_median_s": statistics.median(times[v]), "step_times_s": times[v],
             "step_time_vs_fp32": statistics.median(times[v]) / ref if ref else None,
             "memory_vs_fp32": mem[v] / mem["fp32"] if "fp32" in mem else None} for v in models]
    for r in rows:
        print(f"{r['variant']:5s} frozen base {r['frozen_base_MB']:7.1f} MB  step {r['step_median_s']:.2f} s "
              f"({r['step_time_vs_fp32'] or 0:.2f}x fp32)")
    res = {"model": "smollm2-135m", "method": a.method, "batch": {"B": a.batch_size, "tokens": int(mask.sum()),
                                                                   "max_len": ids.shape[1], "labels": 2},
           "command": "OMP_NUM_THREADS=%s python benchmarks/train_step/bench_quantized.py %s" % (
               os.environ.get("OMP_NUM_THREADS", "?"), " ".join(argv if argv is not None else sys.argv[1:])),
           "machine": machine_info(), "rows": rows,
           "peak_rss_MB_all_variants": __import__("resource").getrusage(0).ru_maxrss / 1024}
    atomic_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
