"""Shared-prefix attention kernels and the fused CPU ops of Llama-family blocks.

Layout: :mod:`.api` (public entry points and the backend table), :mod:`.reference` (the float64-capable oracle),
:mod:`.sdpa` (the PyTorch SDPA fallback), :mod:`.validation` (argument checks), :mod:`.cpu` (C++ kernels built at
first use: prefix attention, fused RMSNorm / SwiGLU / rotary) and :mod:`.triton` (GPU kernels). Import from here
(or :mod:`ltuning.kernels.api`), not from the submodules.
"""
from .api import BACKENDS, prefix_attention, prefix_attention_varlen, resolve_backend
from .cpu.fused_ops import is_available as fused_ops_available, rms_norm, rotary, swiglu
from .reference import prefix_attention_reference, prefix_attention_varlen_reference, visible_mask
from .sdpa import prefix_attention_sdpa
from .validation import KernelInputError, check_inputs

__all__ = [
    "BACKENDS", "KernelInputError", "check_inputs", "prefix_attention", "prefix_attention_varlen", "resolve_backend",
    "prefix_attention_reference", "prefix_attention_varlen_reference", "prefix_attention_sdpa", "visible_mask",
    "fused_ops_available", "rms_norm", "swiglu", "rotary",
]
