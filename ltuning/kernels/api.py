"""Public entry points of shared-prefix attention and the table of backends behind them.

``prefix_attention(q, k, v, bank_k, bank_v, prefix_idx, ...)`` computes, for q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D)
and a bank (N, Hkv, P, D)::

    o = softmax(softmax_scale * q [s * bank_k[prefix_idx] ; k]^T) [s * bank_v[prefix_idx] ; v]    (B, Hq, Lq, D)

(masks, GQA, prefix scales, lengths and biases: :mod:`ltuning.kernels.reference`); ``prefix_attention_varlen`` is the
packed form, q (T, Hq, D), k/v (T, Hkv, D), ``cu_seqlens`` (B+1,). Both return ``o``, or ``(o, lse)`` with
``return_lse=True`` (lse (B, Hq, Lq) / (T, Hq), float32).

``backend``: ``"auto"`` (CUDA tensors -> Triton, CPU tensors -> the C++ kernel when it builds, else SDPA),
``"cpu"``, ``"triton"``, ``"sdpa"`` or ``"reference"``. The environment variable ``LTUNING_ATTN_BACKEND``
overrides ``"auto"`` (for tests and benchmarks). :data:`BACKEND_TABLE` maps each concrete backend to its
availability check, dense function and packed function; every function returns ``(o, lse)`` and validates its
arguments (:func:`check_inputs`), raising :class:`KernelInputError` naming a bad one.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

from .cpu import prefix_attention as cpu_attention
from .reference import prefix_attention_reference, prefix_attention_varlen_reference
from .sdpa import prefix_attention_sdpa
from .triton import prefix_attention as triton_attention
from .validation import KernelInputError, check_inputs

__all__ = ["BACKENDS", "BACKEND_TABLE", "Backend", "KernelInputError", "check_inputs", "prefix_attention",
           "prefix_attention_varlen", "resolve_backend"]


def _always() -> bool:
    return True


def _varlen_reference(q, k, v, cu_seqlens, bank_k=None, bank_v=None, prefix_idx=None, *, max_seqlen=None,
                      **kwargs):
    """The packed reference; ``max_seqlen`` (a grid size for the GPU kernels) is not needed and not read."""
    return prefix_attention_varlen_reference(q, k, v, cu_seqlens, bank_k, bank_v, prefix_idx, **kwargs)


class Backend(NamedTuple):
    available: Callable[[], bool]  # can it run here (the C++ kernel builds, Triton imports and has a target)
    fwd: Callable                  # dense form -> (o, lse); lse may be None (SDPA)
    varlen: Callable               # packed form -> (o, lse)


BACKEND_TABLE: dict[str, Backend] = {
    "cpu": Backend(cpu_attention.is_available, cpu_attention.prefix_attention_cpu,
                   cpu_attention.prefix_attention_varlen_cpu),
    "triton": Backend(triton_attention.is_available, triton_attention.prefix_attention_triton,
                      triton_attention.prefix_attention_varlen_triton),
    "sdpa": Backend(_always, prefix_attention_sdpa, _varlen_reference),  # SDPA has no packed form
    "reference": Backend(_always, prefix_attention_reference, _varlen_reference),
}
BACKENDS = ("auto", *BACKEND_TABLE)
AUTO = {"cuda": "triton", "cpu": "cpu"}  # device type -> the fused backend "auto" tries first; else "sdpa"


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
    fused = AUTO.get(device_type)
    return fused if fused is not None and BACKEND_TABLE[fused].available() else "sdpa"


def _device_type(q, where: str) -> str:
    if not isinstance(q, torch.Tensor):
        raise KernelInputError(f"{where}: q must be a torch.Tensor; got {type(q).__name__}")
    return q.device.type


def prefix_attention(
    q, k, v, bank_k=None, bank_v=None, prefix_idx=None, *, key_padding_mask=None, causal=False,
    prefix_scale=None, softmax_scale=None, prefix_lengths=None, prefix_bias=None, backend="auto", return_lse=False,
):
    """Attention of q over ``[bank[prefix_idx] ; k]`` (see :mod:`ltuning.kernels.reference` for shapes).

    Returns ``o`` (B, Hq, Lq, D), or ``(o, lse)`` with ``return_lse=True``. Every backend validates its arguments
    (:func:`check_inputs`) and raises :class:`KernelInputError` naming a bad one.
    """
    name = resolve_backend(backend, _device_type(q, "prefix_attention"))
    if name == "sdpa" and return_lse:  # SDPA gives no lse
        name = "reference"
    kw = dict(key_padding_mask=key_padding_mask, causal=causal, prefix_scale=prefix_scale,
              softmax_scale=softmax_scale)
    if prefix_lengths is not None:  # only passed when given, so every backend keeps its plain signature too
        kw["prefix_lengths"] = prefix_lengths
    if prefix_bias is not None:
        kw["prefix_bias"] = prefix_bias
    o, lse = BACKEND_TABLE[name].fwd(q, k, v, bank_k, bank_v, prefix_idx, **kw)
    return (o, lse) if return_lse else o


def prefix_attention_varlen(
    q, k, v, cu_seqlens, bank_k=None, bank_v=None, prefix_idx=None, *, causal=False, prefix_scale=None,
    softmax_scale=None, max_seqlen=None, prefix_lengths=None, prefix_bias=None, backend="auto", return_lse=False,
):
    """Packed variable-length form: q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (B+1,) int32."""
    name = resolve_backend(backend, _device_type(q, "prefix_attention_varlen"))
    kw = dict(causal=causal, prefix_scale=prefix_scale, softmax_scale=softmax_scale)
    if prefix_lengths is not None:
        kw["prefix_lengths"] = prefix_lengths
    if prefix_bias is not None:
        kw["prefix_bias"] = prefix_bias
    o, lse = BACKEND_TABLE[name].varlen(q, k, v, cu_seqlens, bank_k, bank_v, prefix_idx, max_seqlen=max_seqlen,
                                        **kw)
    return (o, lse) if return_lse else o
