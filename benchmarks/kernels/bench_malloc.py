"""Does glibc's allocator cost CPU training time? One training step under three allocator settings.

PyTorch's CPU allocator is plain ``malloc``. glibc serves blocks above a (dynamic) threshold with fresh ``mmap``
pages and returns freed heap tops to the OS, so the activations of every step may page-fault again. Settings,
each in a fresh process, alternated ``--rounds`` times (median of the per-process step medians):

* ``default``: glibc's defaults;
* ``env``: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296`` set before the process starts;
* ``mallopt``: the same at run time through glibc's ``mallopt`` (trim threshold 2 GiB: it takes an int), what a
  library could do for its users.

Measured on SmolLM2 LT-prefix SST-2 and RTE steps (``benchmarks/RESULTS.md``, section 4): the page faults go, the
step time does not change beyond noise, so ltuning does not change the allocator. Linux with glibc only.

Prints the step time and the minor page faults per step of each, writes ``--json``.

    OMP_NUM_THREADS=1 python benchmarks/kernels/bench_malloc.py lt-prefix sst2 --rounds 3 --json benchmarks/results/malloc.json
    OMP_NUM_THREADS=1 python benchmarks/kernels/bench_malloc.py lt-prefix rte --rounds 2 --json benchmarks/results/malloc_rte.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
from common import atomic_json, group  # noqa: E402
ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
SETTINGS = ("default", "env", "mallopt")


def child(setting: str, method: str, task: str, model: str) -> dict:
    """One process: median step time and minor page faults per step (``getrusage``) of ``setting``."""
    import resource

    if setting == "mallopt":
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        assert libc.mallopt(-3, 32 << 20) == 1 and libc.mallopt(-1, (1 << 31) - 1) == 1  # M_MMAP_/M_TRIM_THRESHOLD
    from profile_step import training_step

    _, _, _, step, median_step = training_step(method, task, model)
    median_step()  # warm-up, then measure a second time with the page faults
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = median_step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 7  # 2 warm-up + 5 timed steps
    return {"setting": setting, "step_s": t, "minor_faults_per_step": faults}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("method", nargs="?", default="lt-prefix")
    ap.add_argument("task", nargs="?", default="rte")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    group("train_step")  # profile_step.training_step
    if a.child:
        print(json.dumps(child(a.child, a.method, a.task, a.model)))
        return
    rows = []
    t0 = time.time()
    for r in range(a.rounds):
        for s in SETTINGS:
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            for k in ENV:
                env.pop(k, None)
            if s == "env":
                env.update(ENV)
            out = subprocess.run([sys.executable, __file__, a.method, a.task, "--model", a.model, "--child", s],
                                 env=env, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["round"] = r
            rows.append(row)
            print(f"round {r} {s:8s} step {row['step_s']:.2f} s, {row['minor_faults_per_step']:.0f} minor faults "
                  f"per step", flush=True)
    summary = {}
    for s in SETTINGS:
        ts = [x["step_s"] for x in rows if x["setting"] == s]
        fs = [x["minor_faults_per_step"] for x in rows if x["setting"] == s]
        summary[s] = {"step_s": statistics.median(ts), "minor_faults_per_step": statistics.median(fs)}
    base = summary["default"]["step_s"]
    print(f"\n{a.model} {a.task} {a.method}, {a.rounds} rounds (medians):")
    print("| setting | step s | minor faults / step | speed-up |\n|---|---:|---:|---:|")
    for s in SETTINGS:
        v = summary[s]
        print(f"| {s} | {v['step_s']:.2f} | {v['minor_faults_per_step']:.0f} | {base / v['step_s']:.2f}x |")
    if a.json:
        atomic_json(a.json, {
            "command": "python benchmarks/kernels/bench_malloc.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "elapsed_s": time.time() - t0, "env": ENV,
            "method": a.method, "task": a.task, "model": a.model, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
