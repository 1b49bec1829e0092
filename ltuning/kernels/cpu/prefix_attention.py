"""Fused shared-prefix attention on CPU: the C++ kernel of ``ltuning/kernels/cpu/csrc/prefix_attention.cpp``.

Same semantics and return value as :func:`ltuning.kernels.reference.prefix_attention_reference`::

    o, lse = softmax(scale * q [s * bank_k[idx] ; k]^T) [s * bank_v[idx] ; v],  o (B, Hq, Lq, D), lse (B, Hq, Lq)

The extension is compiled at first use (:mod:`ltuning.kernels.cpu.build`) into ``$LTUNING_BUILD_DIR`` or
``~/.cache/ltuning/`` (rebuilt when the source, flags or torch change). The forward and backward are
``torch.library`` custom ops (``ltuning::prefix_attention_cpu_fwd`` / ``_bwd``) with a registered autograd
formula and fake implementation, so autograd and ``torch.compile`` see one opaque op. float32, bfloat16 and
float64 run natively (fp32 accumulation for bf16); float16 runs in float32. Without a working compiler
the functions fall back to the reference with one warning.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..reference import prefix_attention_reference, prefix_attention_varlen_reference
from ..validation import KernelInputError, check_inputs
from .build import CppExtension, acc_dtype, none_if_empty

# q/k/v dtypes the entry points take (float16 runs in float32); the raw ops take float32, bfloat16, float64
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_EXT = CppExtension("prefix_attention.cpp", "ltuning_prefix_attention", "prefix-attention kernel")


def is_available() -> bool:
    """Build (once per process, cached on disk) and load the extension; False with one warning on failure."""
    return _EXT.is_available()


def _ext():
    return _EXT.get()


def _layout_like(g: Tensor, t: Tensor) -> Tensor:
    """``g`` with the strides of ``torch.empty_like(t)`` (what the fake kernels promise ``torch.compile``). The C++
    kernel writes some results (e.g. the bank gradients) contiguously while the input was a strided view."""
    if g.stride() == t.stride():
        return g
    want = torch.empty_like(t)
    return g if g.stride() == want.stride() else want.copy_(g)


@torch.library.custom_op("ltuning::prefix_attention_cpu_fwd", mutates_args=(), device_types="cpu")
def _fwd(q: Tensor, k: Tensor, v: Tensor, bank_k: Optional[Tensor], bank_v: Optional[Tensor],
         prefix_idx: Optional[Tensor], key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
         prefix_scale: Optional[Tensor], causal: bool, softmax_scale: float,
         prefix_lengths: Optional[Tensor] = None, prefix_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    o, lse = _ext().forward(q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask, cu_seqlens, prefix_scale,
                            causal, softmax_scale, prefix_lengths, prefix_bias)
    return _layout_like(o, q), lse


OP_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def check_op_args(q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask, cu_seqlens, prefix_scale, softmax_scale,
                  prefix_lengths, prefix_bias=None, where="prefix_attention_cpu"):
    """The C++ op's shape / dtype / device rules, in Python: run by the fake (meta) kernels, so a call whose
    tensors are not all on the CPU (the dispatcher then picks the fake kernel) or a traced call fails as the real
    op would. Index values are not looked at (fake tensors have none); the C++ op scans them."""
    check_inputs(q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask=key_padding_mask, prefix_scale=prefix_scale,
                 prefix_lengths=prefix_lengths, prefix_bias=prefix_bias, softmax_scale=softmax_scale,
                 cu_seqlens=cu_seqlens, varlen=cu_seqlens is not None, dtypes=OP_DTYPES, values=False, where=where)
    if bank_k is not None and bank_k.dtype != q.dtype:
        raise KernelInputError(f"{where}: bank_k must have q's dtype {q.dtype}; got {bank_k.dtype}")


@_fwd.register_fake
def _(q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask, cu_seqlens, prefix_scale, causal, softmax_scale,
      prefix_lengths=None, prefix_bias=None):
    check_op_args(q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask, cu_seqlens, prefix_scale, softmax_scale,
                  prefix_lengths, prefix_bias)
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype))


@torch.library.custom_op("ltuning::prefix_attention_cpu_bwd", mutates_args=(), device_types="cpu")
def _bwd(grad_o: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, bank_k: Optional[Tensor],
         bank_v: Optional[Tensor], prefix_idx: Optional[Tensor], key_padding_mask: Optional[Tensor],
         cu_seqlens: Optional[Tensor], prefix_scale: Optional[Tensor], lse: Tensor, causal: bool,
         softmax_scale: float, prefix_lengths: Optional[Tensor] = None, prefix_bias: Optional[Tensor] = None
         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _ext().backward(grad_o, grad_lse, q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask, cu_seqlens,
                            prefix_scale, lse, causal, softmax_scale, prefix_lengths, prefix_bias)
    like = (q, k, v, bank_k, bank_v, prefix_scale)
    return tuple(q.new_empty(0) if g is None else g if t is None else _layout_like(g, t) for g, t in zip(grads, like))


@_bwd.register_fake
def _(grad_o, grad_lse, q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask, cu_seqlens, prefix_scale, lse,
      causal, softmax_scale, prefix_lengths=None, prefix_bias=None):
    check_op_args(q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask, cu_seqlens, prefix_scale, softmax_scale,
                  prefix_lengths, prefix_bias)
    rows = tuple(q.shape[:-1])
    for name, t, want in (("grad_o", grad_o, tuple(q.shape)), ("lse", lse, rows), ("grad_lse", grad_lse, rows)):
        if t is not None and (tuple(t.shape) != want or t.device != q.device or not t.is_floating_point()):
            raise KernelInputError(f"prefix_attention_cpu: {name} must be a floating {want} tensor on {q.device}; "
                                   f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    has_bank = bank_k is not None and bank_k.shape[2] > 0
    like = [q, k, v, bank_k if has_bank else None, bank_v if has_bank else None,
            prefix_scale if has_bank else None]
    return tuple(q.new_empty(0) if t is None else torch.empty_like(t) for t in like)


def _setup_context(ctx, inputs, output):
    q, k, v, bank_k, bank_v, prefix_idx, mask, cu, prefix_scale, causal, softmax_scale, plen, pbias = inputs
    ctx.save_for_backward(q, k, v, bank_k, bank_v, prefix_idx, mask, cu, prefix_scale, plen, pbias,
                          output[1])  # not o
    ctx.causal, ctx.softmax_scale = causal, softmax_scale


def _backward(ctx, grad_o, grad_lse):
    q, k, v, bank_k, bank_v, prefix_idx, mask, cu, prefix_scale, plen, pbias, lse = ctx.saved_tensors
    dq, dk, dv, dbk, dbv, dps = _bwd(grad_o, grad_lse, q, k, v, bank_k, bank_v, prefix_idx, mask, cu, prefix_scale,
                                     lse, ctx.causal, ctx.softmax_scale, plen, pbias)
    dbk, dbv = (none_if_empty(dbk), none_if_empty(dbv)) if bank_k is not None else (None, None)
    dps = none_if_empty(dps) if prefix_scale is not None else None
    return dq, dk, dv, dbk, dbv, None, None, None, dps, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _prepare(q, k, v, bank_k, bank_v, prefix_scale):
    """Cast to the kernel's compute dtype (float16 -> float32) and make last dims contiguous (differentiable)."""
    cd = q.dtype if q.dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32

    def prep(t):
        if t is None:
            return None
        t = t.to(cd)
        return t if t.stride(-1) == 1 else t.contiguous()

    ps = None if prefix_scale is None else prefix_scale.to(acc_dtype(cd))
    return prep(q), prep(k), prep(v), prep(bank_k), prep(bank_v), ps


def prefix_attention_cpu(q, k, v, bank_k=None, bank_v=None, prefix_idx=None, *, key_padding_mask=None, causal=False,
                         prefix_scale=None, softmax_scale=None, prefix_lengths=None, prefix_bias=None):
    """Fused attention of q (B, Hq, Lq, D) over ``[bank[prefix_idx] ; k]``; returns ``(o, lse)``.

    Differentiable w.r.t. q, k, v, bank_k, bank_v and prefix_scale; shapes as in the reference.
    """
    # shapes, dtypes, devices here; the O(B) index-range scans run in the C++ op (or in the reference fallback),
    # except for a bank with P = 0, which the op is not given
    B, Hq, Lq, D, Hkv, Lk, P, _ = check_inputs(
        q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask=key_padding_mask, prefix_scale=prefix_scale,
        prefix_lengths=prefix_lengths, prefix_bias=prefix_bias, softmax_scale=softmax_scale, dtypes=DTYPES,
        device_type="cpu", values=bank_k is not None and bank_k.shape[2:3] == (0,), where="prefix_attention_cpu")
    if not is_available():
        return prefix_attention_reference(q, k, v, bank_k, bank_v, prefix_idx, key_padding_mask=key_padding_mask,
                                          causal=causal, prefix_scale=prefix_scale, softmax_scale=softmax_scale,
                                          prefix_lengths=prefix_lengths, prefix_bias=prefix_bias)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    q_, k_, v_, bk, bv, ps = _prepare(q, k, v, bank_k if P else None, bank_v if P else None,
                                      prefix_scale if P else None)
    idx = prefix_idx.long() if P else None
    mask = key_padding_mask.bool() if key_padding_mask is not None else None
    plen = prefix_lengths.long() if (P and prefix_lengths is not None) else None
    pbias = prefix_bias.detach() if (P and prefix_bias is not None) else None
    o, lse = torch.ops.ltuning.prefix_attention_cpu_fwd(q_, k_, v_, bk, bv, idx, mask, None, ps, causal, float(scale),
                                                        plen, pbias)
    return o.to(q.dtype), lse.float()


def prefix_attention_varlen_cpu(q, k, v, cu_seqlens, bank_k=None, bank_v=None, prefix_idx=None, *, max_seqlen=None,
                                causal=False, prefix_scale=None, softmax_scale=None, prefix_lengths=None,
                                prefix_bias=None):
    """Packed form: q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (B+1,); returns o (T, Hq, D), lse (T, Hq).

    Sequence b owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``. ``max_seqlen`` is accepted for API parity with the
    GPU kernels; the lengths are read from ``cu_seqlens``.
    """
    # shapes, dtypes, devices here; index values in the C++ op (here too when max_seqlen is given, or P = 0)
    B, Hq, T, D, Hkv, _, P, _ = check_inputs(
        q, k, v, bank_k, bank_v, prefix_idx, prefix_scale=prefix_scale, prefix_lengths=prefix_lengths,
        prefix_bias=prefix_bias, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        varlen=True, dtypes=DTYPES,
        device_type="cpu", values=max_seqlen is not None or (bank_k is not None and bank_k.shape[2:3] == (0,)),
        where="prefix_attention_varlen_cpu")
    if not is_available():
        return prefix_attention_varlen_reference(q, k, v, cu_seqlens, bank_k, bank_v, prefix_idx, causal=causal,
                                                 prefix_scale=prefix_scale, softmax_scale=softmax_scale,
                                                 prefix_lengths=prefix_lengths, prefix_bias=prefix_bias)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    q_, k_, v_, bk, bv, ps = _prepare(q, k, v, bank_k if P else None, bank_v if P else None,
                                      prefix_scale if P else None)
    idx = prefix_idx.long() if P else None
    plen = prefix_lengths.long() if (P and prefix_lengths is not None) else None
    pbias = prefix_bias.detach() if (P and prefix_bias is not None) else None
    o, lse = torch.ops.ltuning.prefix_attention_cpu_fwd(q_, k_, v_, bk, bv, idx, None, cu_seqlens.long(), ps, causal,
                                                        float(scale), plen, pbias)
    return o.to(q.dtype), lse.float()
