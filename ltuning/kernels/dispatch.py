"""Backend choice for shared-prefix attention.

``backend``: ``"auto"`` (CUDA tensors -> Triton, CPU tensors -> the C++ kernel when it builds, else SDPA),
``"cpu"``, ``"triton"``, ``"sdpa"`` or ``"reference"``. The environment variable ``LTUNING_ATTN_BACKEND``
overrides ``"auto"`` (for tests and benchmarks).
"""
from __future__ import annotations

import os

import torch

from .reference import prefix_attention_reference, prefix_attention_varlen_reference
from .sdpa import prefix_attention_sdpa
from .validation import KernelInputError

BACKENDS = ("auto", "cpu", "triton", "sdpa", "reference")


def _cpu_available() -> bool:
    try:
        from . import cpu_prefix_attention as m
    except ImportError:
        return False
    return m.is_available()


def _triton_available() -> bool:
    try:
        from . import triton_prefix_attention as m
    except ImportError:
        return False
    return m.is_available()


def resolve_backend(backend: str, device_type: str) -> str:
    """The concrete backend ``auto`` stands for on ``device_type``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get("LTUNING_ATTN_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"LTUNING_ATTN_BACKEND={backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device_type == "cuda" and _triton_available():
        return "triton"
    if device_type == "cpu" and _cpu_available():
        return "cpu"
    return "sdpa"


def _device_type(q, where: str) -> str:
    if not isinstance(q, torch.Tensor):
        raise KernelInputError(f"{where}: q must be a torch.Tensor; got {type(q).__name__}")
    return q.device.type


def prefix_attention(
    q, k, v, bank_k=None, bank_v=None, prefix_idx=None, *, key_padding_mask=None, causal=False,
    prefix_scale=None, softmax_scale=None, prefix_lengths=None, backend="auto", return_lse=False,
):
    """Attention of q over ``[bank[prefix_idx] ; k]`` (see :mod:`ltuning.kernels.reference` for shapes).

    Returns ``o`` (B, Hq, Lq, D), or ``(o, lse)`` with ``return_lse=True``. Every backend validates its arguments
    (:func:`ltuning.kernels.validation.check_inputs`) and raises :class:`KernelInputError` naming a bad one.
    """
    name = resolve_backend(backend, _device_type(q, "prefix_attention"))
    kw = dict(key_padding_mask=key_padding_mask, causal=causal, prefix_scale=prefix_scale,
              softmax_scale=softmax_scale)
    if prefix_lengths is not None:  # only passed when given, so every backend keeps its plain signature too
        kw["prefix_lengths"] = prefix_lengths
    if name == "sdpa" and return_lse:
        name = "reference"
    if name == "cpu":
        from .cpu_prefix_attention import prefix_attention_cpu as fn
    elif name == "triton":
        from .triton_prefix_attention import prefix_attention_triton as fn
    elif name == "sdpa":
        fn = prefix_attention_sdpa
    else:
        fn = prefix_attention_reference
    o, lse = fn(q, k, v, bank_k, bank_v, prefix_idx, **kw)
    return (o, lse) if return_lse else o


def prefix_attention_varlen(
    q, k, v, cu_seqlens, bank_k=None, bank_v=None, prefix_idx=None, *, causal=False, prefix_scale=None,
    softmax_scale=None, max_seqlen=None, prefix_lengths=None, backend="auto", return_lse=False,
):
    """Packed variable-length form: q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (B+1,) int32."""
    name = resolve_backend(backend, _device_type(q, "prefix_attention_varlen"))
    kw = dict(causal=causal, prefix_scale=prefix_scale, softmax_scale=softmax_scale)
    if prefix_lengths is not None:
        kw["prefix_lengths"] = prefix_lengths
    if name == "cpu":
        from .cpu_prefix_attention import prefix_attention_varlen_cpu as fn
        o, lse = fn(q, k, v, cu_seqlens, bank_k, bank_v, prefix_idx, max_seqlen=max_seqlen, **kw)
    elif name == "triton":
        from .triton_prefix_attention import prefix_attention_varlen_triton as fn
        o, lse = fn(q, k, v, cu_seqlens, bank_k, bank_v, prefix_idx, max_seqlen=max_seqlen, **kw)
    else:
        o, lse = prefix_attention_varlen_reference(q, k, v, cu_seqlens, bank_k, bank_v, prefix_idx, **kw)
    return (o, lse) if return_lse else o
