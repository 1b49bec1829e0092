"""What the one-pass label bank costs per layer at classification, against the layer's own matrix products, and the
utilisation that leaves (issue 21's "85 % of the one-pass ceiling" at K = 77).

The one-pass ceiling (``bench_classify.one_pass_ceiling``) counts only the per-token Linear products. A one-pass
LT forward also attends, in every layer, from each input token to the P bank tokens: 4 Hq D P FLOPs per token
(QK^T and PV), which the ceiling does not count. This script times, side by side in one process on one SmolLM2-shaped
layer (Hq = 9, Hkv = 3, D = 64, d = 576, MLP 1536, causal) and a packed batch of B inputs of 8-17 tokens:

* ``linear_ms``: the layer's seven Linear products (q, k, v, o, gate, up, down) on the T batch tokens;
* ``attention_ms``: the fused CPU attention op (``prefix_attention_varlen``, inference) over the inputs' own keys and
  a bank of P tokens (one entry shared by every input), for P = 0 (what prefix-free LoRA pays) and each ``--banks``;
* ``bank_ms_at_matrix_rate``: the bank's 4 Hq D P T FLOPs at the Linears' measured rate, the time the bank would
  take if its products ran at the Linear layers' rate with a free softmax (a lower bound);
* ``bound_vs_no_bank``: (linear + attention(0)) / (linear + attention(P)), the share of LoRA's utilisation a method
  with this bank can keep if everything else in its forward ran as LoRA's does:
  ``util(onepass) <= util(LoRA) x (linear + attention(0)) / (linear + attention(P))``; ``linear`` is the median
  over the dtype's rows (``linear_ms_all_rows``: the same work in each); ``bound_vs_no_bank_free_softmax`` the same
  with ``bank_ms_at_matrix_rate`` in place of attention(P) - attention(0).

``--lora-from RECORD`` (a ``bench_classify.py`` JSON): each row also gets ``lora_utilisation`` (LoRA's utilisation
of the one-pass ceiling in that record, same dtype; the median over its LoRA rows) and the utilisation a method with
this bank can reach at most, ``allowed_utilisation`` = lora_utilisation x bound (``allowed_utilisation_ideal``
with the free-softmax bound).

Defaults: P = 83 and 299, the ``bank_tokens=last`` and full (merged) banks of SmolLM2 on BANKING77.

    OMP_NUM_THREADS=1 python benchmarks/serving/bank_attention_share.py \
        --lora-from benchmarks/results/serving_classify_banking77_last.json --json benchmarks/results/bank_attention_share.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
from common import ROOT, atomic_json, git_commit, median_ms  # noqa: E402

import torch  # noqa: E402

from ltuning.kernels.api import prefix_attention_varlen  # noqa: E402
from ltuning.serving import cpu  # noqa: E402

HQ, HKV, D, HIDDEN, MLP = 9, 3, 64, 576, 1536
LINEARS = [(HIDDEN, HQ * D), (HIDDEN, HKV * D), (HIDDEN, HKV * D), (HQ * D, HIDDEN), (HIDDEN, MLP), (HIDDEN, MLP),
           (MLP, HIDDEN)]  # (in, out) of q, k, v, o, gate, up, down


def measure(dtype: torch.dtype, batch: int, banks: list, reps: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(8, 18, (batch,), generator=g)
    T = int(lens.sum())
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    x = {i: torch.randn(T, i, generator=g).to(dtype) for i in {a for a, _ in LINEARS}}
    lins = [torch.nn.Linear(a, b, bias=False).to(dtype) for a, b in LINEARS]
    lin_flops = 2 * T * sum(a * b for a, b in LINEARS)
    q = torch.randn(T, HQ, D, generator=g).to(dtype)
    k, v = (torch.randn(T, HKV, D, generator=g).to(dtype) for _ in range(2))
    own_pairs = sum(int(n) * (int(n) + 1) // 2 for n in lens)
    rows = []
    with torch.inference_mode():
        def linear():
            for m, (a, _) in zip(lins, LINEARS):
                m(x[a])
        for P in [0] + banks:
            if P:
                bk, bv = (torch.randn(1, HKV, P, D, generator=g).to(dtype) for _ in range(2))
                idx = torch.zeros(batch, dtype=torch.long)
                attn = lambda: prefix_attention_varlen(q, k, v, cu, bk, bv, idx, causal=True,  # noqa: E731
                                                       max_seqlen=int(lens.max()), backend="cpu")
            else:
                attn = lambda: prefix_attention_varlen(q, k, v, cu, causal=True,  # noqa: E731
                                                       max_seqlen=int(lens.max()), backend="cpu")
            lin_ms, att_ms = [], []
            for _ in range(3):  # interleaved: each sample times both, so drift hits both alike
                lin_ms.append(median_ms(linear, reps))
                att_ms.append(median_ms(attn, reps))
            lin, att = statistics.median(lin_ms), statistics.median(att_ms)
            rate = lin_flops / lin / 1e6  # GFLOP/s of the layer's Linears
            bank_flops = 4 * HQ * D * P * T
            rows.append({"dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype], "batch": batch, "tokens": T,
                         "bank_tokens": P,
                         "linear_ms": lin, "linear_gflops": rate, "attention_ms": att,
                         "attention_flops": 4 * HQ * D * (P * T + own_pairs), "bank_flops": bank_flops,
                         "attention_share_of_linear": att / lin})
    # the Linears are the same work in every row: the bounds use their median over the rows, so that drift between
    # rows does not read as a bank effect
    lin = statistics.median(r["linear_ms"] for r in rows)
    rate = lin_flops / lin / 1e6
    a0 = rows[0]["attention_ms"]
    for r in rows:
        r["linear_ms_all_rows"] = lin
        r["bank_ms_at_matrix_rate"] = r["bank_flops"] / rate / 1e6
        r["bound_vs_no_bank"] = (lin + a0) / (lin + r["attention_ms"])
        r["bound_vs_no_bank_free_softmax"] = (lin + a0) / (lin + a0 + r["bank_ms_at_matrix_rate"])
    return rows


def lora_utilisation(path: str, ap) -> dict:
    """{"fp32": u, "bf16": u}: the median utilisation of the ``ltuning lora`` rows of a bench_classify record."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError) as e:
        ap.error(f"--lora-from {path}: not a bench_classify.py record ({e})")
    out = {}
    for dt in ("fp32", "bf16"):
        u = [r["utilisation"] for r in rows if r.get("system") == "ltuning lora" and r.get("dtype") == dt
             and "utilisation" in r]
        if u:
            out[dt] = statistics.median(u)
    if not out:
        ap.error(f"--lora-from {path}: no 'ltuning lora' row with a utilisation")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--banks", default="83,299", help="bank sizes P (tokens) besides 0")
    ap.add_argument("--batch", type=int, default=54, help="inputs per packed batch (~680 tokens, the engine's)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="bf16 only where the CPU multiplies it natively")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--lora-from", help="bench_classify.py record: LoRA's utilisation per dtype for the bounds")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    lora = lora_utilisation(a.lora_from, ap) if a.lora_from else {}
    try:
        banks = [int(x) for x in a.banks.split(",") if x]
    except ValueError:
        ap.error(f"--banks: expected comma-separated integers, got {a.banks!r}")
    if any(p <= 0 for p in banks) or a.batch < 1 or a.reps < 1:
        ap.error("--banks values, --batch and --reps must be positive")
    dts = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    for name in a.dtypes.split(","):
        if name not in dts:
            ap.error(f"--dtypes: expected fp32 and/or bf16, got {name!r}")
        if name == "bf16" and not cpu.native_bf16():
            print("bf16: not native on this CPU, skipped", file=sys.stderr)
            continue
        for r in measure(dts[name], a.batch, banks, a.reps):
            if name in lora:
                r["lora_utilisation"] = lora[name]
                r["allowed_utilisation"] = lora[name] * r["bound_vs_no_bank"]
                r["allowed_utilisation_ideal"] = lora[name] * r["bound_vs_no_bank_free_softmax"]
            rows.append(r)
            print(f"{r['dtype']:8s} P={r['bank_tokens']:4d}  linear {r['linear_ms']:6.2f} ms "
                  f"({r['linear_gflops']:5.0f} "
                  f"GFLOP/s)  attention {r['attention_ms']:6.2f} ms = {100 * r['attention_share_of_linear']:5.1f} % of "
                  f"linear  bound {100 * r['bound_vs_no_bank']:5.1f} % (free softmax "
                  f"{100 * r['bound_vs_no_bank_free_softmax']:5.1f} %)", flush=True)
    out = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python "
                      + " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)] + (argv or sys.argv[1:])),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(ROOT),
           "machine": cpu.machine(), "torch_threads": torch.get_num_threads(),
           "load_average": list(os.getloadavg()), "rows": rows}
    atomic_json(a.json, out)
    print("wrote", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
