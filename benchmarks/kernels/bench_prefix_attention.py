"""Shared-prefix attention on CPU: the fused C++ kernel vs the two things people run today.

Implementations (same inputs, same semantics, outputs in the model dtype):

* ``ours``   ``ltuning.kernels.cpu.prefix_attention.prefix_attention_cpu`` (C++ kernel, bank never expanded)
* ``sdpa``   ``ltuning.kernels.prefix_attention_sdpa``: SDPA over ``cat(bank[idx].expand, K)`` (PEFT prefix tuning)
* ``eager``  the reference math (``prefix_attention_reference``) computed in the model dtype

Head shapes: SmolLM2 (Hq=9, Hkv=3, D=64, causal), MiniLM (H=12, D=32, non-causal), Llama-7B (H=32, D=128,
causal); B in {8, 32}, L in {64, 128, 512}, P in {10, 20, 64}; a bank of N=2 entries (labels) with a random
prefix_idx; q/k/v are HF-style transposes of (B, L, H, D) tensors; fp32 and bf16. Passes: ``fwd`` (no_grad),
``bwd`` (autograd.grad of a fresh forward, only the backward timed), ``fwd+bwd``.

Timing: one warm-up per implementation, then repetitions interleaved across implementations (rotating order),
median reported. Memory: ``peak_mb`` = peak of live heap bytes above the level at the start of the pass,
measured by interposing malloc/free (a tiny LD_PRELOAD library compiled at start; the script re-executes
itself with it), so every allocation counts: tensors, kernel workspaces, oneDNN scratch.

    python benchmarks/kernels/bench_prefix_attention.py [--quick] [--threads N] [--json PATH] [--png PATH]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

MODELS = {
    "smollm2": dict(Hq=9, Hkv=3, D=64, causal=True),
    "minilm": dict(Hq=12, Hkv=12, D=32, causal=False),
    "llama7b": dict(Hq=32, Hkv=32, D=128, causal=True),
}
FULL = [(m, B, L, P) for m in MODELS for B in (8, 32) for L in (64, 128, 512) for P in (10, 20, 64)]
QUICK = [("smollm2", 8, 128, 20), ("minilm", 8, 128, 20), ("llama7b", 8, 128, 20)]
IMPLS = ("ours", "sdpa", "eager")
PASSES = ("fwd", "bwd", "fwd+bwd")
N_BANK = 2

MEMTRACK_C = r"""
#include <malloc.h>
#include <stddef.h>
#include <stdatomic.h>
extern void *__libc_malloc(size_t), *__libc_calloc(size_t, size_t), *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);
static _Atomic long live_, peak_;
static void add(long n) {
  long v = atomic_fetch_add(&live_, n) + n, p = atomic_load(&peak_);
  while (v > p && !atomic_compare_exchange_weak(&peak_, &p, v)) {}
}
static void *track(void *p) { if (p) add((long)malloc_usable_size(p)); return p; }
void *malloc(size_t n) { return track(__libc_malloc(n)); }
void *calloc(size_t a, size_t b) { return track(__libc_calloc(a, b)); }
void *memalign(size_t a, size_t n) { return track(__libc_memalign(a, n)); }
void *aligned_alloc(size_t a, size_t n) { return track(__libc_memalign(a, n)); }
int posix_memalign(void **r, size_t a, size_t n) { void *p = track(__libc_memalign(a, n)); if (!p) return 12; *r = p; return 0; }
void free(void *p) { if (p) { add(-(long)malloc_usable_size(p)); __libc_free(p); } }
void *realloc(void *p, size_t n) {
  long old = p ? (long)malloc_usable_size(p) : 0;
  void *q = __libc_realloc(p, n);
  if (q) add((long)malloc_usable_size(q) - old); else if (p && n == 0) add(-old);
  return q;
}
long memtrack_live(void) { return atomic_load(&live_); }
long memtrack_peak(void) { return atomic_load(&peak_); }
void memtrack_reset(void) { atomic_store(&peak_, atomic_load(&live_)); }
"""


def memtrack_lib() -> Path:
    root = Path(os.environ.get("LTUNING_BUILD_DIR") or Path.home() / ".cache" / "ltuning") / "memtrack"
    root.mkdir(parents=True, exist_ok=True)
    src, lib = root / "memtrack.c", root / "libmemtrack.so"
    if not lib.exists() or not src.exists() or src.read_text() != MEMTRACK_C:
        src.write_text(MEMTRACK_C)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return lib


def reexec_with_memtrack():
    """Restart this script with the malloc tracker preloaded (once)."""
    if os.environ.get("LTUNING_MEMTRACK") == "1":
        mt = ctypes.CDLL(os.environ["LD_PRELOAD"])
        mt.memtrack_live.restype = mt.memtrack_peak.restype = ctypes.c_long
        return mt
    lib = memtrack_lib()
    env = dict(os.environ, LTUNING_MEMTRACK="1", LD_PRELOAD=str(lib))
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def make_inputs(model, B, L, P, dtype, seed=0):
    import torch

    cfg = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv, D = cfg["Hq"], cfg["Hkv"], cfg["D"]

    def hf(H):  # (B, H, L, D) view of a (B, L, H, D) tensor, as Hugging Face attention passes it
        return torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()

    q, k, v = hf(Hq), hf(Hkv), hf(Hkv)
    bank_k = torch.randn(N_BANK, Hkv, P, D, generator=g).to(dtype).requires_grad_()
    bank_v = torch.randn(N_BANK, Hkv, P, D, generator=g).to(dtype).requires_grad_()
    idx = torch.randint(0, N_BANK, (B,), generator=g)
    grad_out = torch.randn(B, L, Hq, D, generator=g).to(dtype).transpose(1, 2)
    return (q, k, v, bank_k, bank_v), idx, grad_out


def impl_fn(name, dtype):
    from ltuning.kernels import prefix_attention_reference, prefix_attention_sdpa
    from ltuning.kernels.cpu.prefix_attention import prefix_attention_cpu

    if name == "ours":
        return prefix_attention_cpu
    if name == "sdpa":
        return prefix_attention_sdpa
    return lambda *a, **kw: prefix_attention_reference(*a, compute_dtype=dtype, **kw)


def run_pass(fn, tensors, idx, grad_out, causal, pss):
    """One execution of a pass; returns the seconds of its timed part."""
    import torch

    if pss == "fwd":
        t = time.perf_counter()
        with torch.no_grad():
            fn(*tensors, idx, causal=causal)
        return time.perf_counter() - t
    t = time.perf_counter()
    o, _ = fn(*tensors, idx, causal=causal)
    if pss == "bwd":
        t = time.perf_counter()
    torch.autograd.grad(o, tensors, grad_out)
    return time.perf_counter() - t


def peak_mb(mt, fn, tensors, idx, grad_out, causal, pss):
    import torch

    if pss == "bwd":
        o, _ = fn(*tensors, idx, causal=causal)
        mt.memtrack_reset()
        base = mt.memtrack_live()
        torch.autograd.grad(o, tensors, grad_out)
        del o
    else:
        mt.memtrack_reset()
        base = mt.memtrack_live()
        run_pass(fn, tensors, idx, grad_out, causal, pss)
    return (mt.memtrack_peak() - base) / 2**20


def eager_gb(model, B, L, P, dtype_bytes):
    """Rough eager fwd+bwd footprint: ~8 live (B, Hq, L, P+L) score-sized tensors."""
    return 8 * B * MODELS[model]["Hq"] * L * (L + P) * max(dtype_bytes, 4) / 2**30


def bench_config(mt, model, B, L, P, dtype, budget_s, max_eager_gb):
    import torch

    causal = MODELS[model]["causal"]
    tensors, idx, grad_out = make_inputs(model, B, L, P, dtype)
    impls = [i for i in IMPLS if i != "eager" or eager_gb(model, B, L, P, dtype.itemsize) <= max_eager_gb]
    fns = {i: impl_fn(i, dtype) for i in impls}
    rows = []
    for pss in PASSES:
        warm = {i: run_pass(fns[i], tensors, idx, grad_out, causal, pss) for i in impls}
        reps = int(min(15, max(3, budget_s / max(sum(warm.values()), 1e-4))))
        times = {i: [] for i in impls}
        for r in range(reps):
            order = impls[r % len(impls):] + impls[:r % len(impls)]
            for i in order:
                times[i].append(run_pass(fns[i], tensors, idx, grad_out, causal, pss))
        for i in impls:
            rows.append({"model": model, **MODELS[model], "B": B, "L": L, "P": P, "N": N_BANK,
                         "dtype": str(dtype).split(".")[1], "pass": pss, "impl": i,
                         "median_ms": statistics.median(times[i]) * 1e3,
                         "peak_mb": peak_mb(mt, fns[i], tensors, idx, grad_out, causal, pss), "reps": reps,
                         "threads": torch.get_num_threads()})
    return rows


def fmt_table(rows):
    """One line per (shape, dtype, pass): ms and peak MB per implementation, and our speed-ups."""
    key = lambda r: (r["model"], r["B"], r["L"], r["P"], r["dtype"], r["pass"])
    groups = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["impl"]] = r
    head = ("| model | B | L | P | dtype | pass | ours ms | sdpa ms | eager ms | sdpa/ours | eager/ours "
            "| ours MB | sdpa MB | eager MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for k, g in groups.items():
        ms = {i: g[i]["median_ms"] if i in g else None for i in IMPLS}
        mb = {i: g[i]["peak_mb"] if i in g else None for i in IMPLS}
        f = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"
        ratio = lambda i: "-" if ms[i] is None else f"{ms[i] / ms['ours']:.2f}x"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {k[5]} | {f(ms['ours'])} | {f(ms['sdpa'])} "
                     f"| {f(ms['eager'])} | {ratio('sdpa')} | {ratio('eager')} | {f(mb['ours'], 1)} "
                     f"| {f(mb['sdpa'], 1)} | {f(mb['eager'], 1)} |")
    return "\n".join(lines)


def plot(rows, path):
    """Speed-up of ours over sdpa and eager (fwd+bwd), one panel per (dtype, model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(len(dtypes), len(models), figsize=(5.5 * len(models), 3.8 * len(dtypes)),
                             squeeze=False, sharey=True)
    for (i, dt), (j, model) in ((a, b) for a in enumerate(dtypes) for b in enumerate(models)):
        ax = axes[i, j]
        sel = [r for r in rows if r["dtype"] == dt and r["model"] == model and r["pass"] == "fwd+bwd"]
        shapes = sorted({(r["B"], r["L"], r["P"]) for r in sel})
        ms = {(r["B"], r["L"], r["P"], r["impl"]): r["median_ms"] for r in sel}
        for k, other in enumerate(("sdpa", "eager")):
            ys = [ms.get(s + (other,), float("nan")) / ms[s + ("ours",)] for s in shapes]
            ax.bar([x + 0.4 * k - 0.2 for x in range(len(shapes))], ys, width=0.4, label=f"{other} / ours")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)), [f"B{b} L{l} P{p}" for b, l, p in shapes], rotation=90, fontsize=7)
        ax.set_title(f"{model}, {dt}, fwd+bwd, {rows[0]['threads']} threads", fontsize=9)
        if j == 0:
            ax.set_ylabel("time ratio (higher = ours faster)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three B=8, L=128, P=20 shapes")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed runs per pass (sets repetitions)")
    ap.add_argument("--max-eager-gb", type=float, default=12.0, help="skip eager when its footprint is larger")
    ap.add_argument("--json", default=None, help="write one row per (shape, dtype, pass, impl)")
    ap.add_argument("--png", default=None, help="speed-up plot (default: next to --json, else benchmarks/results)")
    args = ap.parse_args()
    mt = reexec_with_memtrack()

    import torch
    from ltuning.kernels.cpu import prefix_attention as cpu_prefix_attention

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not cpu_prefix_attention.is_available():
        sys.exit("the C++ kernel did not build; nothing to benchmark")
    print(f"# extension ready in {time.perf_counter() - t0:.1f}s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 2.0)
    models = args.models.split(",")
    shapes = [s for s in (QUICK if args.quick else FULL) if s[0] in models]
    rows = []
    for dt in args.dtypes.split(","):
        for model, B, L, P in shapes:
            new = bench_config(mt, model, B, L, P, getattr(torch, dt), budget, args.max_eager_gb)
            rows += new
            for r in new:
                print(f"{r['model']:8s} B={r['B']:<3d} L={r['L']:<4d} P={r['P']:<3d} {r['dtype']:9s} {r['pass']:8s} "
                      f"{r['impl']:6s} {r['median_ms']:10.3f} ms {r['peak_mb']:9.1f} MB  (x{r['reps']})", flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.1f}\n")
    print(fmt_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    png = args.png or (str(Path(args.json).with_suffix(".png")) if args.json
                       else str(HERE.parent / "results" / "prefix_attention_cpu.png"))
    plot(rows, png)
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
