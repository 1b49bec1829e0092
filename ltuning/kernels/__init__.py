"""Shared-prefix attention kernels: reference (oracle), SDPA fallback, C++ CPU kernel, Triton GPU kernels."""
from .dispatch import BACKENDS, prefix_attention, prefix_attention_varlen, resolve_backend
from .reference import prefix_attention_reference, prefix_attention_varlen_reference, visible_mask
from .sdpa import prefix_attention_sdpa
from .validation import KernelInputError, check_inputs

__all__ = [
    "BACKENDS", "KernelInputError", "check_inputs", "prefix_attention", "prefix_attention_varlen", "resolve_backend",
    "prefix_attention_reference", "prefix_attention_varlen_reference", "prefix_attention_sdpa", "visible_mask",
]
