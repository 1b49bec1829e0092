"""Cost of the kernel input validation on the hot path: the SmolLM2 row of bench_prefix_attention, before / after.

Runs the public ``ltuning.kernels.prefix_attention(..., backend="cpu")`` (Python checks + C++ op with its own
checks) at the SmolLM2 attention shape (B=8, Hq=9, Hkv=3, L=128, P=20, D=64, causal, a bank of N=2 entries, q/k/v
as Hugging Face's transposed views), fwd (no_grad) and fwd+bwd, fp32 and bf16, in two source trees: ``--before``
(a checkout of the commit without the checks) and this tree. Each worker is a fresh process that imports ltuning
from its tree; the driver alternates the trees for ``--rounds`` rounds (same process count each) and reports the
median over rounds of each worker's median. In this tree it also times the Python checks alone
(``check_inputs`` as the CPU entry point calls it) and the O(B) value scan (``check_values``).

``--inprocess-so`` runs the more precise A/B instead: both versions in ONE process, interleaved per repetition
(the before tree's Python check and its compiled C++ op against this tree's), see :func:`inprocess`.

    git archive <commit> | tar -x -C /tmp/before
    python benchmarks/kernels/bench_validation_overhead.py --before /tmp/before --json benchmarks/results/validation_overhead.json
    python benchmarks/kernels/bench_validation_overhead.py --before /tmp/before --inprocess-so BUILD/<name>.so --reps 200 \
        --json benchmarks/results/validation_overhead.json
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
sys.path.insert(0, str(HERE.parent))  # benchmarks/: common (imports nothing of ltuning)
from common import git_commit, median_ms  # noqa: E402
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
            out[f"{name} {pas}"] = median_ms(fn, reps)
        try:  # the checks alone (this tree only)
            from ltuning.kernels.cpu.prefix_attention import DTYPES
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


def inprocess(before: Path, before_so: Path, reps: int, threads: int) -> dict:
    """Both versions in ONE process, interleaved per repetition: the before tree's Python check (``_check`` of its
    reference module) + its C++ op (the built ``.so`` of its source) against this tree's ``check_inputs`` + C++ op,
    same inputs, same kernel code (only the argument checks differ). Forward (check + op) and backward (op)."""
    import importlib.machinery
    import importlib.util
    import math

    import torch
    torch.set_num_threads(threads)
    from ltuning.kernels.cpu import prefix_attention as cpa
    from ltuning.kernels.validation import check_inputs
    spec = importlib.util.spec_from_file_location("before_reference", before / "ltuning/kernels/reference.py")
    ref_before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_before)
    name = before_so.stem
    ext_before = importlib.machinery.ExtensionFileLoader(name, str(before_so)).load_module()
    ext_after = cpa._EXT.get()
    s = SHAPE
    scale = 1.0 / math.sqrt(s["D"])
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)

        def hf(H):
            return torch.randn(s["B"], s["L"], H, s["D"], generator=g).to(dtype).transpose(1, 2)

        q, k, v = hf(s["Hq"]), hf(s["Hkv"]), hf(s["Hkv"])
        bk = torch.randn(s["N"], s["Hkv"], s["P"], s["D"], generator=g).to(dtype)
        bv = torch.randn(s["N"], s["Hkv"], s["P"], s["D"], generator=g).to(dtype)
        idx = torch.randint(0, s["N"], (s["B"],), generator=g)
        go = torch.randn(s["B"], s["Hq"], s["L"], s["D"], generator=g).to(dtype)

        def fwd_before():
            ref_before._check(q, k, v, bk, bv, idx, None, None, None)
            return ext_before.forward(q, k, v, bk, bv, idx.long(), None, None, None, True, scale, None)

        def fwd_after():
            check_inputs(q, k, v, bk, bv, idx, dtypes=cpa.DTYPES, device_type="cpu", values=False,
                         where="prefix_attention_cpu")
            return ext_after.forward(q, k, v, bk, bv, idx.long(), None, None, None, True, scale, None)

        o, lse = fwd_after()
        o2, _ = fwd_before()
        assert torch.equal(o, o2), "the two builds disagree"

        def bwd(ext):
            return lambda: ext.backward(go, None, q, k, v, bk, bv, idx.long(), None, None, None, lse, True, scale,
                                        None)

        fns = {"fwd before": fwd_before, "fwd after": fwd_after, "bwd before": bwd(ext_before),
               "bwd after": bwd(ext_after)}
        times = {key: [] for key in fns}
        for fn in fns.values():
            fn()
        keys = list(fns)
        for r in range(reps):
            for key in (keys if r % 2 == 0 else keys[::-1]):
                t0 = time.perf_counter()
                fns[key]()
                times[key].append(time.perf_counter() - t0)
        dn = str(dtype).replace("torch.", "")
        for pas in ("fwd", "bwd"):
            b, a = (statistics.median(times[f"{pas} {w}"]) * 1e3 for w in ("before", "after"))
            out[f"{dn} {pas}"] = dict(before_ms=round(b, 4), after_ms=round(a, 4), after_over_before=round(a / b, 4))
        for label, fn in (("python check before (reference._check)", lambda: ref_before._check(
                q, k, v, bk, bv, idx, None, None, None)),
                          ("python check after (check_inputs, values in C++)", lambda: check_inputs(
                              q, k, v, bk, bv, idx, dtypes=cpa.DTYPES, device_type="cpu", values=False))):
            n = 3000
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out[f"{dn} {label} us"] = round((time.perf_counter() - t0) / n * 1e6, 3)
    return out


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
    ap.add_argument("--inprocess-so", default=None,
                    help="the before tree's built prefix-attention .so: run the one-process A/B instead and add it "
                         "to --json under 'inprocess'")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.reps, a.threads)))
        return
    if a.inprocess_so:
        res = inprocess(Path(a.before).resolve(), Path(a.inprocess_so).resolve(), a.reps, a.threads)
        for key, val in res.items():
            print(f"{key:<55} {val}")
        if a.json:
            path = Path(a.json)
            rec = json.loads(path.read_text()) if path.exists() else {}
            rec["inprocess"] = dict(results=res, reps=a.reps, before_so=str(a.inprocess_so),
                                    before_commit=a.before_commit, after_commit=git_commit(HERE.parents[1]),
                                    machine=machine(a.threads), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                    command="python " + " ".join([f"benchmarks/kernels/{Path(sys.argv[0]).name}"]
                                                                 + sys.argv[1:]))
            path.write_text(json.dumps(rec, indent=1) + "\n")
        return
    trees = {"before": Path(a.before).resolve(), "after": HERE.parents[1]}
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
                   after_commit=git_commit(HERE.parents[1]), machine=machine(a.threads),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   command="python " + " ".join([f"benchmarks/kernels/{Path(sys.argv[0]).name}"] + sys.argv[1:]))
        Path(a.json).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
