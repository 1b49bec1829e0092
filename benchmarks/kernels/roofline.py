"""Roofline MODEL (not a measurement) of shared-prefix attention in a Llama-2-7B training step on an H100 SXM.

Compares (a) PEFT prefix tuning -- the prefix expanded to every row, ``cat`` onto K/V in every layer, a
FlashAttention-2 kernel over ``P + S`` keys, the per-row prefix gradients reduced afterwards -- with (b) the fused
Triton kernels of ``ltuning.kernels.triton.prefix_attention``. For each kernel launched, the time floor is
``max(FLOPs / 989e12, bytes / 3.35e12)`` (bf16 dense tensor-core peak, HBM3 bandwidth); a step's floor is the sum
over kernels and 32 layers. Nothing here runs on a GPU.

Counting assumptions (per layer; H = 32 query = KV heads, D = 128, bf16 activations E = 2 bytes, fp32 F = 4):

* Scope: only what differs around attention -- from the projected q, k, v to o and back to dq, dk, dv, d(prefix).
  Projections, the MLP, norms and the optimizer are identical in both paths and left out.
* FLOPs: 2 per multiply-add of the matmuls only (softmax, exp and masking are ignored). Causal attention with the
  prefix always visible: ``pairs = B * H * (S * P + S * (S + 1) / 2)`` (query, key) pairs, both paths skip hidden
  tiles. Forward: QK^T and PV, ``4 D pairs``. PEFT backward: FlashAttention-2's five matmuls (dq accumulated with
  fp32 atomics), ``10 D pairs``. Fused backward: seven, ``14 D pairs`` -- the dQ kernel recomputes QK^T and dO V^T
  so that dQ, dK/dV and d(bank) are written without atomics (deterministic).
* Bytes: the minimum HBM traffic of each kernel -- every input read once, every output written once (perfect
  on-chip reuse inside a kernel, nothing kept across kernels). ``X = B H S D`` elements per activation,
  ``R = B H S`` rows (lse, Delta in fp32), ``Kp = H P D`` elements per bank entry for K (same for V), ``N`` bank
  entries in use (1: a single task).
* PEFT path, generous to PEFT: the expanded per-row prefix is written in bf16; the ``cat`` outputs
  ``2 (X + B Kp)`` elements and attention reads them; no attention mask is materialised (FlashAttention-2 with
  bottom-right causal alignment); the backward of ``cat`` is a free view; the expand backward reads the
  ``2 B Kp`` per-row gradients and writes the fp32 parameter gradient ``2 Kp``. FA2's dq fp32 accumulator is
  counted as written and read once.
* Fused path: forward reads q, k, v and the bank once; the backward runs Delta = rowsum(dO O), dQ (reads q, dO, k,
  v, bank), sequence dK/dV (reads q, dO, k, v) and prefix dK/dV (reads q, dO and the bank again: its extra cost),
  which writes fp32 partial sums over ``splits`` chunks of each entry's sequences (``prefix_splits`` with 132
  SMs); the host adds them into the fp32 bank gradient.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from ltuning.kernels.triton.prefix_attention import prefix_splits  # noqa: E402

LAYERS, HEADS, HEAD_DIM = 32, 32, 128
PEAK_FLOPS, HBM_BW, SMS = 989e12, 3.35e12, 132
E, F = 2, 4
GRID = dict(batch=(1, 8, 32), seq=(128, 512, 2048), prefix=(16, 64, 256))


def _floor(flops, nbytes):
    return max(flops / PEAK_FLOPS, nbytes / HBM_BW)


def _shapes(B, S, P, N):
    H, D = HEADS, HEAD_DIM
    return dict(X=B * H * S * D, R=B * H * S, Kp=H * P * D, Kc=B * H * (S + P) * D,
                seq_pairs=B * H * S * (S + 1) // 2, pre_pairs=B * H * S * P, D=D, B=B, N=N)


def peft_kernels(B, S, P, N=1):
    """[(name, FLOPs, bytes)] of one layer's PEFT prefix-tuning path (forward + backward)."""
    s = _shapes(B, S, P, N)
    X, R, Kp, Kc, D = s["X"], s["R"], s["Kp"], s["Kc"], s["D"]
    pairs = s["seq_pairs"] + s["pre_pairs"]
    return [
        ("expand prefix", 0, 2 * N * Kp * F + 2 * B * Kp * E),
        ("cat K/V", 0, (2 * B * Kp + 2 * X) * E + 2 * Kc * E),
        ("FA2 forward", 4 * D * pairs, (X + 2 * Kc + X) * E + R * F),
        ("Delta", 2 * X, 2 * X * E + R * F),
        ("FA2 backward", 10 * D * pairs, (2 * X + 2 * Kc + 2 * Kc + X) * E + 2 * R * F + 2 * X * F),
        ("reduce prefix grads", 2 * B * Kp, 2 * B * Kp * E + 2 * N * Kp * F),
    ]


def fused_kernels(B, S, P, N=1):
    """[(name, FLOPs, bytes)] of one layer's fused Triton kernels (forward + backward)."""
    s = _shapes(B, S, P, N)
    X, R, Kp, D = s["X"], s["R"], s["Kp"], s["D"]
    sp, pp = s["seq_pairs"], s["pre_pairs"]
    split = prefix_splits(B, N, HEADS, P, SMS)
    return [
        ("forward", 4 * D * (sp + pp), 4 * X * E + 2 * N * Kp * E + R * F),
        ("Delta", 2 * X, 2 * X * E + R * F),
        ("dQ", 6 * D * (sp + pp), 5 * X * E + 2 * N * Kp * E + 2 * R * F),
        ("dK/dV sequence", 8 * D * sp, 6 * X * E + 2 * R * F),
        ("dK/dV prefix", 8 * D * pp, 2 * X * E + 2 * N * Kp * E + 2 * R * F + 2 * split * N * Kp * F),
        ("sum bank partials", 2 * split * N * Kp, 2 * split * N * Kp * F + 2 * N * Kp * F),
    ]


def step(kernels):
    """Totals over the model's layers: FLOPs, bytes and the summed per-kernel time floor (seconds)."""
    return dict(flops=LAYERS * sum(k[1] for k in kernels), bytes=LAYERS * sum(k[2] for k in kernels),
                floor_s=LAYERS * sum(_floor(k[1], k[2]) for k in kernels))


def table(entries=1):
    rows = []
    for B in GRID["batch"]:
        for S in GRID["seq"]:
            for P in GRID["prefix"]:
                a, b = step(peft_kernels(B, S, P, entries)), step(fused_kernels(B, S, P, entries))
                rows.append(dict(batch=B, seq=S, prefix=P, peft=a, fused=b, floor_ratio=a["floor_s"] / b["floor_s"]))
    return rows


def render(rows) -> str:
    head = ("| B | S | P | GFLOP PEFT | GFLOP fused | GB PEFT | GB fused | floor PEFT ms | floor fused ms "
            "| PEFT/fused |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        a, b = r["peft"], r["fused"]
        lines.append(f"| {r['batch']} | {r['seq']} | {r['prefix']} | {a['flops'] / 1e9:,.0f} | {b['flops'] / 1e9:,.0f} "
                     f"| {a['bytes'] / 1e9:.2f} | {b['bytes'] / 1e9:.2f} | {a['floor_s'] * 1e3:.3f} "
                     f"| {b['floor_s'] * 1e3:.3f} | {r['floor_ratio']:.2f}x |")
    return "\n".join(lines)


def plot(rows, path):
    """Grouped bars of the floor ratio PEFT / fused (> 1: the fused kernels have the lower floor)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(GRID["batch"]), figsize=(4.5 * len(GRID["batch"]), 3.8), sharey=True)
    width = 0.8 / len(GRID["prefix"])
    for ax, B in zip(axes, GRID["batch"]):
        for i, P in enumerate(GRID["prefix"]):
            ratio = [r["floor_ratio"] for r in rows if r["batch"] == B and r["prefix"] == P]
            ax.bar([x + (i - 1) * width for x in range(len(GRID["seq"]))], ratio, width, label=f"P = {P}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(GRID["seq"])), [f"S = {s}" for s in GRID["seq"]])
        ax.set_title(f"batch {B}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("time floor PEFT / fused (model)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("MODEL, not a measurement: roofline floors of Llama-2-7B attention fwd+bwd (32 layers) on H100 SXM "
                 "(989 TFLOP/s bf16, 3.35 TB/s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------------------
# Whole 7B step MODEL (``--whole-step``): projections + MLP + elementwise ops + attention, bf16 or NF4 weights.
D_MODEL, FFN = HEADS * HEAD_DIM, 11008
LAYER_PARAMS = 4 * D_MODEL * D_MODEL + 3 * D_MODEL * FFN  # q, k, v, o + gate, up, down (Llama-2-7B)
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit block absmax (double quant) + its scale
WHOLE_STEP = {  # scenario -> (inputs B, labels K, sequence S, label-text prefix P, passes over the weights)
    "train (B=8, K=2, S=128, P=16; checkpointing)": (8, 2, 128, 16, 3),
    "classify (B=64, K=2, S=128, P=16)": (64, 2, 128, 16, 1),
}


def dense_kernels(T, weights, passes):
    """[(name, FLOPs, bytes)] of one layer's frozen Linears and elementwise ops over ``passes`` passes of T rows.

    Assumptions: a frozen weight gets no gradient, so each pass (forward, checkpoint recompute, backward's
    grad-input) is one product of 2 T N FLOPs; bf16 weights are read once per pass (2 N bytes); NF4 weights as
    bitsandbytes runs them in training (and on the CPU here): a dequantize kernel reads the 4-bit codes and block
    statistics and writes a bf16 copy, which the product reads (0.52 N + 2 N + 2 N bytes); activations are read
    and written once per product; RMSNorm x2, rotary (q, k) and SwiGLU each read and write their tensors once."""
    d, f = D_MODEL, FFN
    act = T * (4 * d + 4 * d + 3 * d + 3 * f) * E  # in/out of q,k,v,o and gate,up,down (inputs shared)
    if weights == "bf16":
        w = [("weights + products", 2 * T * LAYER_PARAMS, LAYER_PARAMS * E + act)]
    else:
        w = [("dequantize NF4 -> bf16", 0, LAYER_PARAMS * (NF4_BYTES_PER_WEIGHT + E)),
             ("products (bf16 copy)", 2 * T * LAYER_PARAMS, LAYER_PARAMS * E + act)]
    elementwise = ("norms, rotary, SwiGLU", 0, T * E * (2 * 2 * d + 2 * 2 * d + 3 * f))
    return [(n, fl * passes, by * passes) for n, fl, by in w + [elementwise]]


def attention_kernels(path, B, S, P, N, train):
    """The attention kernels above; classification (no grad) keeps only the forward ones; a checkpointed
    training step runs the forward twice."""
    ks = peft_kernels(B, S, P, N) if path == "sdpa-cat" else fused_kernels(B, S, P, N)
    fwd = {"expand prefix", "cat K/V", "FA2 forward", "forward"}
    if not train:
        return [k for k in ks if k[0] in fwd]
    return ks + [k for k in ks if k[0] in fwd]  # recompute under checkpointing


def whole_step_table():
    rows = []
    for name, (B, K, S, P, passes) in WHOLE_STEP.items():
        train = passes > 1
        for weights in ("bf16", "nf4"):
            for path in ("sdpa-cat", "ltuning"):
                dense = step(dense_kernels(B * K * S, weights, passes))
                attn = step(attention_kernels(path, B * K, S, P, K, train))
                total = dense["floor_s"] + attn["floor_s"]
                rows.append(dict(scenario=name, weights=weights, attention=path, dense_floor_s=dense["floor_s"],
                                 attention_floor_s=attn["floor_s"], floor_s=total,
                                 attention_share=attn["floor_s"] / total))
    for r in rows:
        ref = next(x for x in rows if x["scenario"] == r["scenario"] and x["weights"] == r["weights"]
                   and x["attention"] == "sdpa-cat")
        r["sdpa_cat_over_this"] = ref["floor_s"] / r["floor_s"]
    return rows


def render_whole(rows) -> str:
    lines = ["| scenario | weights | attention | dense floor ms | attention floor ms | step floor ms | attention share "
             "| SDPA-cat / this |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['weights']} | {r['attention']} | {r['dense_floor_s'] * 1e3:.1f} "
                     f"| {r['attention_floor_s'] * 1e3:.2f} | {r['floor_s'] * 1e3:.1f} | {100 * r['attention_share']:.1f} % "
                     f"| {r['sdpa_cat_over_this']:.3f}x |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1, help="bank entries in use (tasks in the batch)")
    ap.add_argument("--json", help="write the rows (and per-kernel counts) here")
    ap.add_argument("--png", help="write the plot here")
    ap.add_argument("--whole-step", action="store_true",
                    help="model a whole 7B training step and classification batch (bf16 and NF4 weights) instead")
    args = ap.parse_args(argv)
    if args.whole_step:
        rows = whole_step_table()
        print("MODEL (roofline floors, not measurements): a whole Llama-2-7B LT-prefix step on an H100 SXM, "
              "ltuning's kernels vs SDPA over cat(expand(prefix), K)")
        print(render_whole(rows))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(dict(model="roofline floors, not measurements", gpu="H100 SXM", peak_flops=PEAK_FLOPS,
                               hbm_bytes_per_s=HBM_BW, layers=LAYERS, d_model=D_MODEL, ffn=FFN,
                               nf4_bytes_per_weight=NF4_BYTES_PER_WEIGHT, scenarios=WHOLE_STEP, rows=rows,
                               assumptions=dense_kernels.__doc__ + attention_kernels.__doc__), f, indent=1)
        return
    rows = table(args.entries)
    print("MODEL (roofline floors, not measurements): Llama-2-7B attention, fwd+bwd, 32 layers, H100 SXM bf16, "
          f"{args.entries} bank entr{'y' if args.entries == 1 else 'ies'} in use")
    print(render(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        kernels = {"peft": peft_kernels(8, 512, 64, args.entries), "fused": fused_kernels(8, 512, 64, args.entries)}
        with open(args.json, "w") as f:
            json.dump(dict(model="roofline floors, not measurements", gpu="H100 SXM", peak_flops=PEAK_FLOPS,
                           hbm_bytes_per_s=HBM_BW, layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM,
                           entries=args.entries, rows=rows,
                           per_layer_kernels_B8_S512_P64={k: [dict(name=n, flops=fl, bytes=by) for n, fl, by in v]
                                                          for k, v in kernels.items()}), f, indent=1)
    if args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        plot(rows, args.png)


if __name__ == "__main__":
    main()
