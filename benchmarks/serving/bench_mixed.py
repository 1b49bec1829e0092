"""A mixed stream over several prefix-family adapters (issue 21): shared-bank batches vs one batch per adapter.

SST-2 dev records (the first ``--n``), each assigned one of ``--methods`` adapters (seeded, uniform), all
adapters on one frozen base (``--model``), their trainables seeded random (speed does not depend on what they
learned; written to a temporary folder). Two engines in this one process, the same adapters and limits
(``--max-batch-tokens``, ``--max-batch-rows``), fp32: ``shared`` (``Engine(shared_bank=True)``, the default:
every chunk's inputs planned together, one forward per mixed batch, :mod:`ltuning.serving.shared_bank`) and
``per-adapter`` (``shared_bank=False``: each chunk split by adapter, each adapter's inputs in batches of their
own, what the engine did before). The stream is cut into chunks of ``--chunk`` records, as ``ltuning classify
--chunk-size`` (1024: the offline default) or the server's batcher (a round of queued requests: a few dozen) cut it;
each chunk is one :meth:`Engine.score_mixed` call. Timed: the scoring of the whole stream (tokenisation done
before, once). One warm-up pass per engine, then ``--rounds`` rounds, the two engines alternating (which one goes
first alternates too); medians. The scores of the two are compared (max relative error, recorded), and the
base's forward calls and padded tokens (rows x padded length) of one pass are counted (a forward pre-hook).
Besides wall time, the process's CPU time per pass (``time.process_time``, all threads) is recorded: on a shared
machine it is less disturbed by other jobs (it still counts OpenMP threads spinning while they wait for a core),
and ``passes_shared_faster`` counts the rounds in which the shared pass beat the per-adapter pass of that round.

The machine may be shared: the load average is recorded before and after each timed pass.

    OMP_NUM_THREADS=2 python benchmarks/serving/bench_mixed.py [--model minilm-l6] [--chunks 1024,32]
        [--out benchmarks/results/serving_mixed_minilm.json]
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
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
from common import DATA, RESULTS, ROOT, atomic_json  # noqa: E402

LABELS = ["negative", "positive"]


def make_adapters(model_name: str, methods: list, folder: str, seed: int = 0) -> dict:
    """One adapter per method on ``model_name`` (seeded random trainables), saved under ``folder``."""
    import torch

    import ltuning
    from ltuning.models import load_base
    base, tok = load_base(model_name)
    out = {}
    for i, m in enumerate(methods):
        torch.manual_seed(seed + i)
        clf = ltuning.Classifier(model_name, m, base=base, tokenizer=tok)
        clf.build(LABELS)
        with torch.no_grad():
            for p in clf.model.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.05)
        name = f"{i}-{m}"
        out[name] = os.path.join(folder, name)
        clf.save_pretrained(out[name])
        ltuning.unpatch(clf.model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--methods", default="prefix,lt-prefix,sk-prefix")
    ap.add_argument("--n", type=int, default=872, help="SST-2 dev records (872 = all)")
    ap.add_argument("--chunks", default="1024,32", help="records per score_mixed call (comma list)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--max-batch-rows", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch

    from ltuning.serving import cpu
    from ltuning.serving.engine import Engine
    load_start = os.getloadavg()
    git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    commit, dirty = git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "ltuning", "benchmarks"))
    recs = [json.loads(x) for x in open(os.path.join(DATA, "sst2", "dev.jsonl"))][:a.n]
    methods = [m for m in a.methods.split(",") if m]
    chunks = [int(c) for c in a.chunks.split(",") if c]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(a.model, methods, tmp)
        kw = dict(dtype="fp32", max_batch_tokens=a.max_batch_tokens, max_batch_rows=a.max_batch_rows)
        engines = {"shared": Engine(dirs, shared_bank=True, **kw), "per-adapter": Engine(dirs, shared_bank=False, **kw)}
    assert engines["shared"].shared is not None and len(engines["shared"].shared.members) == len(dirs)
    rng = random.Random(0)
    names = list(dirs)
    assign = [rng.choice(names) for _ in recs]
    e0 = engines["shared"]
    ids = [e0.tokenize([{"text": r["text"]}], e0.adapters[n])[0] for r, n in zip(recs, assign)]
    rows = sum(e0.adapters[n].rows_per_input for n in assign)
    tokens = sum(len(x) * e0.adapters[n].rows_per_input for x, n in zip(ids, assign))

    def forwards(mode: str, chunk: int) -> dict:
        """The base's forward calls and padded rows x length of one pass (a pre-hook counts them)."""
        seen = []
        h = engines[mode].base.register_forward_pre_hook(
            lambda mod, args, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
        try:
            run(mode, chunk)
        finally:
            h.remove()
        return {"forwards": len(seen), "padded_tokens": sum(seen)}

    def run(mode: str, chunk: int) -> list:
        e = engines[mode]
        ads = [e.adapters[n] for n in assign]
        out = []
        for s in range(0, len(ids), chunk):
            out += e.score_mixed(ads[s:s + chunk], ids[s:s + chunk])
        return out

    results = []
    for chunk in chunks:
        ref = {m: run(m, chunk) for m in engines}  # warm-up, and the scores compared
        err = max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(ref["shared"], ref["per-adapter"]))
        agree = sum(int(x.argmax() == y.argmax()) for x, y in zip(ref["shared"], ref["per-adapter"]))
        counts = {m: forwards(m, chunk) for m in engines}
        times, cpu_times = {m: [] for m in engines}, {m: [] for m in engines}
        loads = []
        for r in range(a.rounds):
            order = list(engines) if r % 2 == 0 else list(engines)[::-1]
            for m in order:
                l0 = os.getloadavg()[0]
                t0, c0 = time.perf_counter(), time.process_time()
                run(m, chunk)
                times[m].append(time.perf_counter() - t0)
                cpu_times[m].append(time.process_time() - c0)
                loads.append((m, round(l0, 2), round(os.getloadavg()[0], 2)))
        med = {m: statistics.median(t) for m, t in times.items()}
        row = {"chunk": chunk, "examples": len(ids), "rows": rows, "tokens": tokens,
               "seconds": {m: [round(x, 4) for x in t] for m, t in times.items()},
               "median_seconds": {m: round(v, 4) for m, v in med.items()},
               "examples_per_s": {m: round(len(ids) / v, 2) for m, v in med.items()},
               "speedup_shared": round(med["per-adapter"] / med["shared"], 3),
               "cpu_seconds": {m: [round(x, 4) for x in t] for m, t in cpu_times.items()},
               "speedup_shared_cpu_time": round(statistics.median(cpu_times["per-adapter"])
                                                / statistics.median(cpu_times["shared"]), 3),
               "passes_shared_faster": sum(int(x < y) for x, y in zip(times["shared"], times["per-adapter"])),
               "forwards": {m: c["forwards"] for m, c in counts.items()},
               "padded_tokens": {m: c["padded_tokens"] for m, c in counts.items()},
               "max_rel_err_shared_vs_per_adapter": err, "same_prediction": agree,
               "load_average_before_after": loads}
        results.append(row)
        print(json.dumps({k: row[k] for k in ("chunk", "examples_per_s", "speedup_shared", "speedup_shared_cpu_time",
                                              "passes_shared_faster", "forwards",
                                              "max_rel_err_shared_vs_per_adapter")}), flush=True)
    rec = {"command": "OMP_NUM_THREADS=%s python benchmarks/serving/bench_mixed.py %s" % (
               os.environ.get("OMP_NUM_THREADS", ""), " ".join(sys.argv[1:])),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
           "uncommitted_changes": dirty,
           "machine": cpu.machine(), "threads": torch.get_num_threads(), "model": a.model,
           "adapters": {n: m for n, m in zip(names, methods)}, "dtype": "fp32",
           "max_batch_tokens": a.max_batch_tokens, "max_batch_rows": a.max_batch_rows, "rounds": a.rounds,
           "load_average_start": load_start, "load_average_end": os.getloadavg(), "results": results}
    out = a.out or os.path.join(RESULTS, f"serving_mixed_{a.model.split('-')[0]}.json")
    atomic_json(out, rec)
    print(out)


if __name__ == "__main__":
    main()
