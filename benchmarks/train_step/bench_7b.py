"""A Llama-2-7B-shaped base in NF4 on this CPU: one LT-prefix training step and one classification batch.

The model has Llama-2-7B's transformer (32 layers, d 4096, 32 heads of 128, FFN 11008, RMSNorm eps 1e-5, rope
theta 1e4) with random weights (N(0, 0.02)); nothing is downloaded. The vocabulary is SmolLM2's (49,152 tokens
instead of Llama-2's 32,000), because the offline tokenizer here is SmolLM2's: the embedding table is 0.07B
parameters larger than Llama-2's, the 32 layers are identical. It is built on the meta device and materialised
one layer at a time: each Linear gets a full-precision random weight that is quantized to NF4 (bitsandbytes,
double quantization, bf16 compute) and freed before the next, so the peak is the 4-bit model plus one fp32
Linear, never the 27 GB of an fp32 7B model.

Then ``ltuning.patch`` with LT-prefix (K = 2 labels, the label texts' own K/V as prefix), gradient checkpointing
on, and: one training step (B = 1 input of L = 128 tokens -> 2 label rows; forward, backward, AdamW), profiled
with torch.profiler to split the time into NF4 dequantisation (bitsandbytes' dequantize ops), matrix products
(aten mm/addmm/bmm) and the rest; then a classification batch (``--eval-batch`` inputs of 128 tokens, all K
labels each, no grad). Peak RSS from getrusage. Not in CI (several minutes and ~5 GB).

    OMP_NUM_THREADS=2 python benchmarks/train_step/bench_7b.py --json benchmarks/results/bench_7b.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]
sys.path.insert(0, HERE)
from common import RESULTS, ROOT  # noqa: E402,F401

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                 hidden_act="silu", tie_word_embeddings=False)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def build_7b_nf4(vocab_size: int, quantize: str = "nf4", seed: int = 0):
    """The Llama-2-7B-shaped ``LlamaModel`` with NF4 Linears, materialised layer by layer (see the docstring)."""
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaModel
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ltuning.models.quantize import keep_trainable_layout, quantized_linear

    cfg = LlamaConfig(vocab_size=vocab_size, **LLAMA2_7B)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    g = torch.Generator().manual_seed(seed)
    model.embed_tokens = nn.Embedding(vocab_size, cfg.hidden_size, device="cpu")
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 0.02, generator=g)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    full = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                    with torch.no_grad():
                        full.weight.normal_(0, 0.02, generator=g)
                    setattr(parent, name, quantized_linear(full, quantize))
                    del full
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = nn.Parameter(torch.ones(cfg.hidden_size))
    model.norm.weight = nn.Parameter(torch.ones(cfg.hidden_size))
    model.rotary_emb = LlamaRotaryEmbedding(config=cfg)  # built off the meta device: real inv_freq
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    model.name_or_path = "llama-2-7b-shaped-random"
    return keep_trainable_layout(model), cfg


def shares(prof) -> dict:
    """Self CPU time by category: NF4 dequantisation, matrix products, everything else (seconds)."""
    out = {"dequantize": 0.0, "matmul": 0.0, "other": 0.0}
    for e in prof.key_averages():
        t = e.self_cpu_time_total / 1e6
        if "dequantize" in e.key:
            out["dequantize"] += t
        elif e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm"):
            out["matmul"] += t
        else:
            out["other"] += t
    total = sum(out.values())
    return {"seconds": out, "shares": {k: v / total for k, v in out.items()}, "profiled_self_cpu_s": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--eval-batch", type=int, default=4)
    ap.add_argument("--json", default=os.path.join(RESULTS, "bench_7b.json"))
    a = ap.parse_args(argv)

    import torch

    import ltuning
    from bench_quantized import machine_info
    from ltuning.models.quantize import frozen_weight_bytes

    from transformers import AutoTokenizer

    from ltuning.models.registry import resolve_model
    path, gguf = resolve_model("smollm2-135m")  # its tokenizer only
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "right"
    t0 = time.perf_counter()
    base, cfg = build_7b_nf4(len(tok))
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in base.parameters())
    print(f"built in {build_s:.0f} s; frozen base {frozen_weight_bytes(base) / 2 ** 30:.2f} GiB, "
          f"peak RSS {rss_gb():.2f} GiB", flush=True)
    names = ["negative", "positive"]
    t0 = time.perf_counter()
    model = ltuning.patch(base, ltuning.make_config("lt-prefix", label_names=names,
                                                    label_texts=[f"The sentiment of the text is {n}." for n in names]),
                          tok)
    patch_s = time.perf_counter() - t0
    trainable, _ = model.count_parameters()
    print(f"patched (label cache) in {patch_s:.0f} s; {trainable:,} trainable", flush=True)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, len(tok) - 100, (1, a.length), generator=g)
    mask = torch.ones_like(ids)
    lab = torch.tensor([1])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss, _ = model.loss(ids, mask, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step_s = time.perf_counter() - t0
    grad_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.trainable_parameters())
    sh = shares(prof)
    print(f"train step {step_s:.1f} s (loss {loss.item():.4f}, grads finite {grad_ok}); {sh['shares']}; "
          f"peak RSS {rss_gb():.2f} GiB", flush=True)
    del prof
    model.eval()
    eids = torch.randint(100, len(tok) - 100, (a.eval_batch, a.length), generator=g)
    t0 = time.perf_counter()
    with torch.inference_mode():
        scores = model(eids, torch.ones_like(eids))
    eval_s = time.perf_counter() - t0
    print(f"classification batch {a.eval_batch}x{a.length} ({a.eval_batch * len(names)} rows): {eval_s:.1f} s; "
          f"peak RSS {rss_gb():.2f} GiB", flush=True)
    res = {"model": "Llama-2-7B-shaped, random weights, NF4 (double quant, bf16 compute)",
           "config": {**LLAMA2_7B, "vocab_size": len(tok)}, "parameters": n_params,
           "frozen_base_GiB": frozen_weight_bytes(base) / 2 ** 30, "build_s": build_s,
           "label_cache_s": patch_s, "trainable_parameters": trainable,
           "train_step": {"B": 1, "L": a.length, "K": 2, "gradient_checkpointing": True, "seconds": step_s,
                          "loss": loss.item(), "grads_finite": grad_ok, "profile": sh},
           "classification_batch": {"B": a.eval_batch, "L": a.length, "K": 2, "seconds": eval_s,
                                    "scores_shape": list(scores.shape)},
           "peak_rss_GiB": rss_gb(), "rss_target_GiB": 10,
           "command": "OMP_NUM_THREADS=%s python benchmarks/train_step/bench_7b.py %s" % (
               os.environ.get("OMP_NUM_THREADS", "?"), " ".join(argv if argv is not None else sys.argv[1:])),
           "machine": machine_info()}
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(a.json + ".tmp", a.json)
    print(json.dumps({k: res[k] for k in ("peak_rss_GiB", "frozen_base_GiB")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
