"""Before / after timing of a change to the CPU prefix-attention kernel (first written for the bank packed once per
call; ``--shapes`` / ``--dtypes`` pick what a later change is timed on).

Change 1 (``bank_pack.json``): the forward used to gather and pack (K^T, V in GEMM operand layouts) its bank entry inside every task, i.e. once per
(sequence b, KV head h, chunk of row tiles); it now packs every used (entry, KV head) block once per call. With one
long entry read by many short sequences (one-pass label scoring) the packing dominated. This script times
``ltuning.kernels.prefix_attention(..., backend="cpu")`` at those shapes, OLD (a source tree of the commit before
the change, given by --old, e.g. ``git archive <commit> ltuning | tar -x -C /tmp/old``; its kernel is built into
its own LTUNING_BUILD_DIR) vs NEW (this checkout), each in its own subprocess, alternated (the order flips every
round), one thread.

Shapes (fp32; q/k/v HF-style transposes of (B, L, H, D); bank (N, Hkv, P, D), prefix_idx all 0 for N = 1):

* ``minilm_onepass``   B=64, Lq=Lk=14, Hq=Hkv=12, D=32, N=1, P=912, not causal (BANKING77, K = 77 labels)
* ``smollm2_onepass``  B=16, Lq=Lk=14, Hq=9, Hkv=3, D=64, N=1, P=600, causal
* ``smollm2_default``  B=8, L=128, Hq=9, Hkv=3, D=64, N=2, P=20, causal (the old default shape: no regression)
* ``smollm2_b77_packed`` the serving engine's packed one-pass batch on BANKING77: 64 sequences of 12 tokens in one
  packed row (``prefix_attention_varlen``, cu_seqlens), Hq=9, Hkv=3, D=64, N=1, P=967 (77 label texts), causal
* ``smollm2_sst2_packed`` a packed prefix-tuning batch on SST-2: 32 sequences of 23 tokens, N=1, P=20, causal

Change 2 (``row_tiles.json``): a row tile of a short sequence was padded to a multiple of 16 rows (now 2); a
12-token sequence with 3 query heads per KV head has 36 rows, so every product against a ~970-key bank computed
48.

Passes: ``fwd`` (inference_mode) and ``fwd+bwd`` (autograd.grad of o.sum()-like loss w.r.t. q, k, v, bank).
Each subprocess warms up, then times ``--reps`` calls per (shape, pass) and reports the median; the JSON keeps every
subprocess median and their median over ``--rounds`` rounds. Each subprocess also hashes its outputs and gradients
(same seeded inputs in both): ``identical`` says whether OLD and NEW agree bit for bit.

    python benchmarks/kernels/bench_bank_pack.py --old /tmp/bankpack_old --old-commit <sha> \
        --json benchmarks/results/bank_pack.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/: common (imports nothing of ltuning)
from common import git_commit  # noqa: E402

SHAPES = {
    "minilm_onepass": dict(B=64, L=14, Hq=12, Hkv=12, D=32, N=1, P=912, causal=False),
    "smollm2_onepass": dict(B=16, L=14, Hq=9, Hkv=3, D=64, N=1, P=600, causal=True),
    "smollm2_default": dict(B=8, L=128, Hq=9, Hkv=3, D=64, N=2, P=20, causal=True),
    "smollm2_b77_packed": dict(B=64, L=12, Hq=9, Hkv=3, D=64, N=1, P=967, causal=True, packed=True),
    "smollm2_sst2_packed": dict(B=32, L=23, Hq=9, Hkv=3, D=64, N=1, P=20, causal=True, packed=True),
}
DEFAULT_SHAPES = "minilm_onepass,smollm2_onepass,smollm2_default"
PASSES = ("fwd", "fwd+bwd")


def inputs(B, L, Hq, Hkv, D, N, P, causal, packed=False, dtype="fp32"):
    """Seeded inputs: dense q/k/v (B, H, L, D) as HF-style transposes, or packed (B*L, H, D) with equal lengths."""
    import torch
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, Hq, D, generator=g)
    k = torch.randn(B, L, Hkv, D, generator=g)
    v = torch.randn(B, L, Hkv, D, generator=g)
    bk = torch.randn(N, Hkv, P, D, generator=g)
    bv = torch.randn(N, Hkv, P, D, generator=g)
    idx = torch.randint(0, N, (B,), generator=g)
    go = torch.randn(B, L, Hq, D, generator=g)
    if packed:
        q, k, v, go = (t.reshape(B * L, t.shape[2], D) for t in (q, k, v, go))
    else:
        q, k, v, go = (t.transpose(1, 2) for t in (q, k, v, go))
    return tuple(t.to(dt) if t.is_floating_point() else t for t in (q, k, v, bk, bv, idx)), go.to(dt)


def worker(reps: int, threads: int, shapes: list, dtypes: list) -> dict:
    import torch
    torch.set_num_threads(threads)
    from ltuning.kernels import prefix_attention, prefix_attention_varlen
    from ltuning.kernels.cpu import prefix_attention as cpa
    assert cpa.is_available(), "the C++ kernel did not build"
    res = {"ltuning": str(Path(cpa.__file__).resolve().parents[3])}
    for name, dtype in ((n, d) for n in shapes for d in dtypes):
        s = SHAPES[name]
        (q, k, v, bk, bv, idx), go = inputs(**s, dtype=dtype)
        causal = s["causal"]
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bk, bv)]
        if s.get("packed"):
            cu = torch.arange(0, s["B"] * s["L"] + 1, s["L"], dtype=torch.int32)

            def attend(q, k, v, bk, bv, **kw):
                return prefix_attention_varlen(q, k, v, cu, bk, bv, idx, causal=causal, backend="cpu", **kw)
        else:
            def attend(q, k, v, bk, bv, **kw):
                return prefix_attention(q, k, v, bk, bv, idx, causal=causal, backend="cpu", **kw)

        def fwd():
            with torch.inference_mode():
                return attend(q, k, v, bk, bv, return_lse=True)

        def fwd_bwd():
            return torch.autograd.grad(attend(*leaves), leaves, go)

        h = hashlib.sha256()
        for t in list(fwd()) + list(fwd_bwd()):
            h.update(t.contiguous().float().numpy().tobytes())
        key = name if dtype == "fp32" else f"{name} {dtype}"
        res[f"{key} sha256"] = h.hexdigest()
        for pname, fn in zip(PASSES, (fwd, fwd_bwd)):
            fn()  # warm-up
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            res[f"{key} {pname} ms"] = statistics.median(ts) * 1e3
    return res


def machine(threads: int) -> dict:
    model, flags = platform.processor(), []
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
        flags = next(ln for ln in info if ln.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        pass
    keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
    return dict(cpu=model, cores=os.cpu_count(), flags=[f for f in keep if f in flags], threads=threads)


def run(tree: Path, build_dir: str | None, reps: int, threads: int, shapes: str, dtypes: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if build_dir:
        env["LTUNING_BUILD_DIR"] = build_dir
    else:
        env.pop("LTUNING_BUILD_DIR", None)
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--reps", str(reps),
                          "--threads", str(threads), "--shapes", shapes, "--dtypes", dtypes], env=env, cwd="/", capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(res.pop("ltuning")) == tree.resolve(), f"{tree}: ltuning was imported from elsewhere"
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="source tree of the commit before the change (contains ltuning/)")
    ap.add_argument("--old-commit", default=None, help="the commit --old was extracted from (recorded)")
    ap.add_argument("--old-build-dir", default=None, help="LTUNING_BUILD_DIR of OLD (default: <old>/build)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
    ap.add_argument("--note", default=None,
                    help="what else ran on the machine (recorded)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.reps, a.threads, a.shapes.split(","), a.dtypes.split(","))))
        return
    if not a.old:
        ap.error("--old is required (a source tree of the commit before the change)")
    for n in a.shapes.split(","):
        if n not in SHAPES:
            ap.error(f"--shapes: unknown shape {n!r}; expected some of {', '.join(SHAPES)}")
    for d in a.dtypes.split(","):
        if d not in ("fp32", "bf16"):
            ap.error(f"--dtypes: unknown dtype {d!r}; expected fp32 or bf16")
    old = Path(a.old).resolve()
    sides = {"old": (old, a.old_build_dir or str(old / "build")), "new": (ROOT, os.environ.get("LTUNING_BUILD_DIR"))}
    load = {"before": os.getloadavg()}
    t_start = time.time()
    rounds = {"old": [], "new": []}
    for r in range(a.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            rounds[side].append(run(*sides[side], a.reps, a.threads, a.shapes, a.dtypes))
            print(f"round {r} {side}: " + ", ".join(f"{k} {v:.2f}" for k, v in rounds[side][-1].items()
                                                     if k.endswith("ms")), file=sys.stderr)
    load["after"] = os.getloadavg()
    rows = []
    for name, dtype in ((n, d) for n in a.shapes.split(",") for d in a.dtypes.split(",")):
        s = SHAPES[name]
        tag = name if dtype == "fp32" else f"{name} {dtype}"
        same = len({x[f"{tag} sha256"] for side in rounds for x in rounds[side]}) == 1
        for p in PASSES:
            key = f"{tag} {p} ms"
            o = [x[key] for x in rounds["old"]]
            n = [x[key] for x in rounds["new"]]
            rows.append(dict(shape=name, **s, dtype=dtype, pass_=p, old_ms=statistics.median(o),
                             new_ms=statistics.median(n), speedup=statistics.median(o) / statistics.median(n),
                             old_all_ms=o, new_all_ms=n, identical=same))
    res = dict(
        command="python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), elapsed_s=time.time() - t_start,
        machine=machine(a.threads), load_average_1_5_15=load,
        note=a.note,
        new_commit=git_commit(ROOT), old_commit=a.old_commit or "unknown", old_tree=str(old),
        rounds=a.rounds, reps_per_round=a.reps,
        timing="median over rounds of the per-subprocess median of reps calls (after one warm-up call)",
        rows=rows)
    text = json.dumps(res, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print("| shape | dtype | pass | old ms | new ms | speedup | bit-identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['dtype']} | {r['pass_']} | {r['old_ms']:.2f} | {r['new_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['identical']} |")


if __name__ == "__main__":
    main()
