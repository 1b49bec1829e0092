"""Cost of the kernel input validation on the hot path: the SmolLM2 row of bench_prefix_attention, before / after.

Runs the public ``ltuning.kernels.prefix_attention(..., backend="cpu")`` (Python checks + C++ op with its own
checks) at the SmolLM2 attention shape (B=8, Hq=9, Hkv=3, L=128, P=20, D=64, causal, a bank of N=2 entries, q/k/v
as Hugging Face's transposed views), fwd (no_grad) and fwd+bwd, fp32 and bf16, in two source trees: ``--before``
(a checkout of the commit without the checks) and this tree. Each worker is a fresh process that imports ltuning
from its tree; the driver alternates the trees for ``--rounds`` rounds (same process count each) and reports the
median over rounds of each worker's median. In this tree it also times the Python checks alone
(``check_inputs`` as the CPU entry point calls it) and the O(B) value scan (``check_values``).

    git archive <commit> | tar -x -C /tmp/before
    python benchmarks/bench_validation_overhead.py --before /tmp/before --json benchmarks/results/validation_overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = dict(B=8, Hq=9, Hkv=3, L=128, P=20, D=64, N=2, causal=True)


def worker(reps: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from ltuning.kernels import prefix_attention
    s = SHAPE
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)

        def hf(H, req=True):
            t = torch.randn(s["B"], s["L"], H, s["D"], generator=g).to(dtype).transpose(1, 2)
            return t.requires_grad_(req)

        q, k, v = hf(s["Hq"]), hf(s["Hkv"]), hf(s["Hkv"])
        bk = torch.randn(s["N"], s["Hkv"], s["P"], s["D"], generator=g).to(dtype).requires_grad_()
        bv = torch.randn(s["N"], s["Hkv"], s["P"], s["D"], generator=g).to(dtype).requires_grad_()
        idx = torch.randint(0, s["N"], (s["B"],), generator=g)
        go = torch.randn(s["B"], s["Hq"], s["L"], s["D"], generator=g).to(dtype)

        def fwd():
            with torch.no_grad():
                prefix_attention(q, k, v, bk, bv, idx, causal=True, backend="cpu")

        def fwdbwd():
            o = prefix_attention(q, k, v, bk, bv, idx, causal=True, backend="cpu")
            torch.autograd.grad(o, (q, k, v, bk, bv), go)

        name = str(dtype).replace("torch.", "")
        for pas, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            out[f"{name} {pas}"] = statistics.median(ts) * 1e3
        try:  # the checks alone (this tree only)
            from ltuning.kernels.cpu_prefix_attention import DTYPES
            from ltuning.kernels.validation import check_inputs, check_values
        except ImportError:
            continue
        for label, fn in (
                ("check_inputs (shapes, dtypes, devices)", lambda: check_inputs(
                    q, k, v, bk, bv, idx, dtypes=DTYPES, device_type="cpu", values=False)),
                ("check_values (index ranges, Python)", lambda: check_values(idx, s["N"], None, s["P"], None, 0))):
            n = 2000
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out[f"{name} {label} us"] = (time.perf_counter() - t0) / n * 1e6
    return out


def git_commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def machine(threads: int) -> dict:
    flags, model = "", platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=model, amx_bf16="amx_bf16" in flags, avx512_bf16="avx512_bf16" in flags, threads=threads,
                note="shared machine: 5 other helpers ran their own jobs at the same time")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=False, help="source tree of the commit without the checks")
    ap.add_argument("--before-commit", default=None, help="the commit --before was extracted from (recorded)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.reps, a.threads)))
        return
    trees = {"before": Path(a.before).resolve(), "after": HERE.parent}
    runs = {k: [] for k in trees}

    def run(tree):
        env = {**os.environ, "PYTHONPATH": str(trees[tree]), "OMP_NUM_THREADS": str(a.threads)}
        r = subprocess.run([sys.executable, str(HERE / "bench_validation_overhead.py"), "--worker", "--reps",
                            str(a.reps), "--threads", str(a.threads)], env=env, capture_output=True, text=True,
                           cwd="/tmp")
        if r.returncode:
            sys.exit(f"worker {tree} failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    for tree in trees:  # warm-up: builds the kernels of both trees, not recorded
        run(tree)
    for i in range(a.rounds):
        for tree in (("before", "after") if i % 2 == 0 else ("after", "before")):
            runs[tree].append(run(tree))
            print(tree, runs[tree][-1], flush=True)
    rows = []
    for key in runs["before"][0]:
        b = statistics.median(r[key] for r in runs["before"])
        af = statistics.median(r[key] for r in runs["after"])
        rows.append(dict(row=key, before_ms=round(b, 4), after_ms=round(af, 4), after_over_before=round(af / b, 4),
                         before_per_round=[round(r[key], 4) for r in runs["before"]],
                         after_per_round=[round(r[key], 4) for r in runs["after"]]))
    checks = {key: round(statistics.median(r[key] for r in runs["after"]), 3)
              for key in runs["after"][0] if key.endswith(" us")}
    for r in rows:
        print(f"{r['row']:<22} before {r['before_ms']:8.3f} ms  after {r['after_ms']:8.3f} ms  "
              f"ratio {r['after_over_before']:.3f}")
    for key, val in checks.items():
        print(f"{key:<50} {val:8.2f} us")
    if a.json:
        rec = dict(shape=SHAPE, rows=rows, checks_us=checks, rounds=a.rounds, reps=a.reps,
                   before_tree=str(trees["before"]), before_commit=a.before_commit,
                   after_commit=git_commit(HERE.parent), machine=machine(a.threads),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   command="python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:]))
        Path(a.json).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
