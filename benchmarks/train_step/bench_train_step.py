"""One optimizer step of prefix training on SmolLM2-135M: ltuning vs Hugging Face PEFT prefix tuning vs eager.

Configurations (B=8, L=128, P=20 prefix tokens, 30 layers, 9 query / 3 KV heads), each timed in its own
subprocess (so peak RSS is per configuration), 3 warm-up steps then ``--steps`` timed steps, median reported:

* ``peft-fp32``      PEFT PrefixTuningConfig(num_virtual_tokens=20) on the fp32 model, SDPA attention (what
                     users run);  ``peft-bf16``: the same under ``torch.autocast(bfloat16)``.
* ``eager-fp32``     the unpatched fp32 model with eager attention and no prefix; the input embeddings require
                     grad so the backward runs through every layer as in a prefix step (the backbone's cost).
* ``ours-prefix-*``  ltuning ``prefix`` method (same P=20 per-layer K/V reparameterisation as PEFT) through the
                     shared-prefix attention; ``fp32`` = fp32 weights, ``bf16`` = bf16 frozen weights + autocast
                     (fp32 trainable parameters and optimizer state). Backend: ``--backend`` (auto = C++ kernel).
                     ``ours-prefix-fp32-compile``: the same with every decoder layer under ``torch.compile``
                     (fusing the RMSNorm / RoPE / SwiGLU elementwise work); its compile time is in
                     ``first_step_s``.
* ``ours-lt-prefix-bf16``  ``lt-prefix`` with label texts padded to 20 tokens, listwise over K=2 labels: twice
                     the rows of the others (every input is scored against both labels), reported for reference.

MFU = model FLOPs / step time / the best matrix rate measured in the same run (2048^3 products: fp32 before
and after the configurations, bf16 before). Model
FLOPs per step count the matrix products a frozen-base step needs: forward 2*N*T, backward (input gradients
only, the base is frozen) 2*N*T, with N the non-embedding parameters and T the tokens, plus attention
(QK^T and PV over P+L keys: 4*T*(P+L)*H*D forward, twice that backward).

    python benchmarks/train_step/bench_train_step.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
from common import RESULTS, ROOT  # noqa: E402

B, L, P = 8, 128, 20
CONFIGS = ["peft-fp32", "peft-bf16", "eager-fp32", "ours-prefix-fp32", "ours-prefix-bf16", "ours-prefix-fp32-compile",
           "ours-lt-prefix-fp32", "ours-lt-prefix-bf16"]


def product_rate(m: int, k: int, n: int, dtype, reps: int) -> float:
    """Median rate (TFLOP/s) of an (m, k) x (k, n) product in ``dtype`` over ``reps`` timed calls after one warm-up."""
    import torch
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(ts) / 1e12


def matmul_tflops(dtype_name: str, n=2048, reps=10) -> float:
    """Median rate of an n^3 matrix product in the given dtype (TFLOP/s). bf16 is probed on a small product
    first: on CPUs without AVX512-BF16/AMX PyTorch emulates it at ~1 GFLOP/s and a 2048^3 probe takes minutes."""
    import torch
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype_name])
    small = product_rate(256, 256, 256, dtype, 3)
    return small if small < 0.02 else product_rate(n, n, n, dtype, reps)


def model_flops(info, n_params_nonembed: int, rows: int) -> float:
    T = rows * L
    attn = 4 * T * (P + L) * info.num_heads * info.head_dim * info.num_layers
    return 4 * n_params_nonembed * T + 3 * attn


def _batch(tok, rows, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, tok.vocab_size - 100, (rows, L), generator=g)
    mask = torch.ones(rows, L, dtype=torch.long)
    mask[1, L - 37:] = 0  # some padding, as real batches have
    return ids, mask


# op-name patterns -> category for the --profile breakdown (self CPU time of the profiled steps)
PROFILE_CATEGORIES = [
    ("matrix products", ("addmm", "::mm", "bmm", "matmul", "linear", "baddbmm")),
    ("attention", ("attention", "prefix_attention", "softmax")),
    ("optimizer", ("adamw", "_foreach", "optimizer")),
]


def profile_breakdown(step, opt, reps: int = 2) -> dict:
    """Share of self CPU time per category over ``reps`` profiled steps (elementwise = everything else)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            opt.zero_grad(set_to_none=True)
            step()
            opt.step()
    totals = {c: 0.0 for c, _ in PROFILE_CATEGORIES}
    totals["elementwise and other"] = 0.0
    for ev in prof.key_averages():
        name = ev.key.lower()
        cat = next((c for c, pats in PROFILE_CATEGORIES if any(p in name for p in pats)), "elementwise and other")
        totals[cat] += ev.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    return {"shares": {c: t / whole for c, t in totals.items()},
            "top_ops": [[e.key, e.self_cpu_time_total / whole] for e in top]}


def run_config(name: str, steps: int, backend: str, profile_steps: int = 0) -> dict:
    """Time one configuration in this process; returns medians and peak RSS."""
    import torch

    import ltuning
    from ltuning.models import load_base, model_info

    dtype = "bf16" if "bf16" in name and name.startswith("ours") else "fp32"
    base, tok = load_base("smollm2-135m", dtype)
    info = model_info(base)
    ids, mask = _batch(tok, B)
    labels = torch.randint(0, 2, (B,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in name)
    rows = B
    if name.startswith("peft"):
        import peft
        pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P,
                                                               prefix_projection=True, encoder_hidden_size=512))
        head = torch.nn.Linear(info.hidden_size, 2)
        params = [p for p in pm.parameters() if p.requires_grad] + list(head.parameters())

        def step():
            with autocast:
                h = pm(input_ids=ids, attention_mask=mask).last_hidden_state
                loss = torch.nn.functional.cross_entropy(head(h[:, -1].float()), labels)
            loss.backward()
            return loss
    elif name.startswith("eager"):
        base.set_attn_implementation("eager")
        head = torch.nn.Linear(info.hidden_size, 2)
        params = list(head.parameters())

        def step():
            # the input embeddings require grad, so the backward runs through every layer (input gradients only,
            # as in a prefix step); nothing of the frozen base is trained
            emb = base.get_input_embeddings()(ids).detach().requires_grad_(True)
            h = base(inputs_embeds=emb, attention_mask=mask, use_cache=False).last_hidden_state
            loss = torch.nn.functional.cross_entropy(head(h[:, -1]), labels)
            loss.backward()
            return loss
    else:
        method = "lt-prefix" if "lt-prefix" in name else "prefix"
        opts = {"backend": backend}
        if method == "prefix":
            opts.update(num_virtual_tokens=P, encoder_hidden_size=512)
            texts = None
        else:
            texts = [" ".join(["negative"] * P), " ".join(["positive"] * P)]
            rows = 2 * B
        cfg = ltuning.make_config(method, label_names=["negative", "positive"], label_texts=texts, **opts)
        m = ltuning.patch(base, cfg, tok)
        if method == "lt-prefix":
            assert m.method.label_hidden.shape[1] == P, m.method.label_hidden.shape
        m.train()
        params = m.trainable_parameters()
        if name.endswith("-compile"):  # torch.compile each decoder layer (fuses RMSNorm / RoPE / SwiGLU work)
            for layer in base.layers:
                layer.compile()

        def step():
            with autocast:
                loss, _ = m.loss(ids, mask, labels)
            loss.backward()
            return loss
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, first = [], None
    for i in range(3 + steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step()
        opt.step()
        if i == 0:
            first = time.perf_counter() - t
        if i >= 3:
            times.append(time.perf_counter() - t)
    n_nonembed = sum(p.numel() for n, p in base.named_parameters() if "embed" not in n)
    extra = {"profile": profile_breakdown(step, opt, profile_steps)} if profile_steps else {}
    extra["first_step_s"] = first  # includes torch.compile's compile time for the -compile configurations
    return {**extra, "config": name, "median_s": statistics.median(times), "min_s": min(times), "steps": steps, "rows": rows,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "model_flops": model_flops(info, n_nonembed, rows), "backend": backend if name.startswith("ours") else "sdpa"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (5) and configurations")
    ap.add_argument("--force-bf16", action="store_true",
                    help="run the bf16 configurations even when this CPU's bf16 products are slower than fp32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backend", default="auto", help="ltuning attention backend for the ours-* rows")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", default=os.path.join(RESULTS, "train_step.json"))
    ap.add_argument("--png", default=None, help="bar chart (default: next to --json)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile N more steps per configuration and report the share of matrix "
                         "products / attention / optimizer / elementwise work (torch.profiler, self CPU time)")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        print(json.dumps(run_config(a._child, a.steps, a.backend, a.profile)))
        return 0
    steps = 5 if a.quick else a.steps
    configs = a.configs.split(",")
    if a.quick:
        configs = [c for c in configs if c in ("peft-fp32", "peft-bf16", "ours-prefix-fp32", "ours-prefix-bf16")]
    peak = {"fp32": matmul_tflops("fp32"), "bf16": matmul_tflops("bf16")}
    print(f"matrix rate: fp32 {1000 * peak['fp32']:.0f} GFLOP/s, bf16 {1000 * peak['bf16']:.0f} GFLOP/s", flush=True)
    skipped = {}
    if peak["bf16"] < peak["fp32"] and not a.force_bf16:
        why = (f"bf16 products run at {1000 * peak['bf16']:.1f} GFLOP/s on this CPU vs fp32 at "
               f"{1000 * peak['fp32']:.0f} GFLOP/s (no AVX512-BF16/AMX): bf16 configurations skipped (--force-bf16)")
        print(why, flush=True)
        for c in [c for c in configs if "bf16" in c]:
            skipped[c] = why
        configs = [c for c in configs if c not in skipped]
    best = max(peak.values())
    rows = []
    for c in configs:
        out = subprocess.run([sys.executable, __file__, "--_child", c, "--steps", str(steps), "--backend", a.backend,
                              "--profile", str(a.profile)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"configuration {c} failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{c:22s} {1000 * r['median_s']:9.1f} ms  rows {r['rows']:3d}  peak RSS {r['peak_rss_mb']:7.0f} MB",
              flush=True)
        if "profile" in r:
            print("    " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["profile"]["shares"].items()), flush=True)
    peak_after = {"fp32": matmul_tflops("fp32"), "bf16": peak["bf16"]}
    # the best rate probed before or after the configurations: one probe can be low on a shared machine (seen: 150
    # GFLOP/s at the start of a run, 270 at its end), which would inflate every MFU
    best = max(best, peak_after["fp32"])
    print(f"matrix rate after: fp32 {1000 * peak_after['fp32']:.0f} GFLOP/s; MFU against {1000 * best:.0f}:", flush=True)
    for r in rows:
        r["mfu"] = r["model_flops"] / r["median_s"] / (best * 1e12)
        print(f"{r['config']:22s} MFU {100 * r['mfu']:5.1f}%", flush=True)
    by = {r["config"]: r for r in rows}
    res = {"shape": {"B": B, "L": L, "P": P, "model": "smollm2-135m"},
           "matmul_tflops_before": peak, "matmul_tflops_after": peak_after, "mfu_peak": "max(fp32 before, fp32 after, bf16) rate",
           "cpu_capability": _cpu_capability(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d %H:%M"), "skipped": skipped,
           "command": " ".join(["python", "benchmarks/train_step/bench_train_step.py"] + (argv or sys.argv[1:])), "rows": rows}
    ours_name = "ours-prefix-bf16" if "ours-prefix-bf16" in by else "ours-prefix-fp32"
    ours = by.get(ours_name)
    if ours:
        res["ours"] = ours_name
        for ref in ("peft-fp32", "peft-bf16", "eager-fp32"):
            res[f"speedup_vs_{ref.replace('-', '_')}"] = by[ref]["median_s"] / ours["median_s"] if ref in by else None
        res["mfu"] = ours["mfu"]
        res["speedups"] = {o: {ref: by[ref]["median_s"] / by[o]["median_s"] for ref in by if not ref.startswith("ours")}
                           for o in by if o.startswith("ours")}
    print(json.dumps({k: v for k, v in res.items() if k.startswith(("speedup", "mfu", "ours"))}))
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(a.json + ".tmp", a.json)
    _plot(rows, a.png or os.path.splitext(a.json)[0] + ".png")
    return 0


def _cpu_capability() -> str:
    import torch

    from ltuning.models.registry import cpu_flags
    extra = sorted({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return "+".join([torch.backends.cpu.get_cpu_capability()] + extra)


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["config"] for r in rows]
    ax.barh(names, [1000 * r["median_s"] for r in rows], color=["tab:gray" if n.startswith(("peft", "eager"))
                                                               else "tab:blue" for n in names])
    for i, r in enumerate(rows):
        ax.text(1000 * r["median_s"], i, f" {1000 * r['median_s']:.0f} ms, MFU {100 * r['mfu']:.0f}%", va="center",
                fontsize=8)
    ax.set_xlabel("median step time (ms), SmolLM2-135M, B=8, L=128, P=20 (lower is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
