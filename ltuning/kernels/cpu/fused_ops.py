"""Fused elementwise ops of Llama-family blocks on CPU: the C++ kernels of ``cpu/csrc/fused_llama_ops.cpp``.

* :func:`rms_norm` ``(x, weight, eps)``: ``weight * (x * rsqrt(mean(x^2, -1) + eps))`` in one pass per row; the
  backward reuses the saved per-row ``rstd`` and computes the weight gradient only when the weight needs one.
* :func:`swiglu` ``(gate, up)``: ``silu(gate) * up``; the backward recomputes the sigmoid.
* :func:`rotary` ``(q, k, cos, sin)``: transformers' Llama ``apply_rotary_pos_emb`` (rotate_half convention)
  for q (B, Hq, L, D), k (B, Hkv, L, D), cos/sin (B or 1, L, D), both tensors in one call, any row strides
  (the transposed views transformers passes are not copied; the results keep their layout).

Each is a ``torch.library`` custom op (``ltuning::fused_*``) with a registered autograd formula and fake
implementation. float32, bfloat16 (float32 arithmetic, one rounding) and float64 run natively. The plain-PyTorch
``*_reference`` functions are the test oracle. The extension is built like the prefix-attention kernel
(:mod:`ltuning.kernels.cpu.build`, cached in ``$LTUNING_BUILD_DIR`` or ``~/.cache/ltuning``); without a working
compiler the functions fall back to the references with one warning.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..validation import KernelInputError
from .build import CppExtension, acc_dtype

_EXT = CppExtension("fused_llama_ops.cpp", "ltuning_fused_llama_ops", "fused Llama ops",
                    "the reference implementations")
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def is_available() -> bool:
    """Build (once per process, cached on disk) and load the extension; False with one warning on failure."""
    return _EXT.is_available()


def _ext():
    return _EXT.get()


# ------------------------------------------------------------------------------------------------------------
# References (the oracle): plain PyTorch, any dtype; the tests run them in float64.

def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.to(acc_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(y.dtype) * y).to(x.dtype)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    return torch.nn.functional.silu(gate) * up


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# ------------------------------------------------------------------------------------------------------------
# Argument checks (public functions and fake kernels)

def _fail(where: str, msg: str):
    raise KernelInputError(f"{where}: {msg}")


def _tensors(where: str, **ts) -> None:
    for name, t in ts.items():
        if not isinstance(t, Tensor):
            _fail(where, f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            _fail(where, f"{name} must be floating point; got {t.dtype}")
    devs = {t.device for t in ts.values()}
    if len(devs) > 1:
        _fail(where, "all tensors must be on one device; got " + ", ".join(f"{n} on {t.device}" for n, t in ts.items()))


def check_rms_norm(x: Tensor, weight: Tensor, eps: float) -> None:
    """x (..., d) with at least one dim, weight (d,), both floating on one device; eps a finite number >= 0."""
    _tensors("rms_norm", x=x, weight=weight)
    if x.dim() < 1 or weight.shape != x.shape[-1:]:
        _fail("rms_norm", f"weight must be (d,) with d = x.shape[-1]; got x {tuple(x.shape)}, weight "
                          f"{tuple(weight.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps >= 0 and eps < float("inf")):
        _fail("rms_norm", f"eps must be a finite number >= 0; got {eps!r}")


def check_swiglu(gate: Tensor, up: Tensor) -> None:
    """gate and up of one shape, floating, on one device."""
    _tensors("swiglu", gate=gate, up=up)
    if gate.shape != up.shape:
        _fail("swiglu", f"up must have gate's shape {tuple(gate.shape)}; got {tuple(up.shape)}")


def check_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    """q (B, Hq, L, D), k (B, Hkv, L, D), D even; cos = sin shape (B or 1, L, D); floating, one device."""
    _tensors("rotary", q=q, k=k, cos=cos, sin=sin)
    if q.dim() != 4:
        _fail("rotary", f"q must be 4-D (B, Hq, L, D); got shape {tuple(q.shape)}")
    B, _, L, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (L, D):
        _fail("rotary", f"k must be (B={B}, Hkv, L={L}, D={D}); got shape {tuple(k.shape)}")
    if D % 2:
        _fail("rotary", f"q's head dim must be even (rotate_half); got D={D}")
    if cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1:] != (L, D):
        _fail("rotary", f"cos must be (B={B} or 1, L={L}, D={D}); got shape {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        _fail("rotary", f"sin must have cos's shape {tuple(cos.shape)}; got {tuple(sin.shape)}")


# ------------------------------------------------------------------------------------------------------------
# Custom ops

@torch.library.custom_op("ltuning::fused_rms_norm_fwd", mutates_args=(), device_types="cpu")
def _rms_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y, rstd = _ext().rms_norm_fwd(x, weight, eps)
    return y, rstd


def _check_op(where: str, **ts) -> None:
    """The raw ops take one native dtype for every tensor argument (the fake kernels check it, see below)."""
    d = next(iter(ts.values())).dtype
    if d not in NATIVE_DTYPES:
        _fail(where, f"{next(iter(ts))} must be float32, bfloat16 or float64; got {d}")
    for name, t in ts.items():
        if t.dtype != d:
            _fail(where, f"{name} must have the dtype {d} of {next(iter(ts))}; got {t.dtype}")


# The fake (meta) kernels check the arguments as the C++ ops do: a call with a tensor off the CPU (the dispatcher
# then picks the fake kernel) or a traced call fails like the real op.

@_rms_fwd.register_fake
def _(x, weight, eps):
    check_rms_norm(x, weight, eps)
    _check_op("fused_rms_norm_fwd", x=x, weight=weight)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype))


@torch.library.custom_op("ltuning::fused_rms_norm_bwd", mutates_args=(), device_types="cpu")
def _rms_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, need_dx: bool, need_dw: bool
             ) -> tuple[Tensor, Tensor]:
    dx, dw = _ext().rms_norm_bwd(dy, x, weight, rstd, need_dx, need_dw)
    return dx, dw


@_rms_bwd.register_fake
def _(dy, x, weight, rstd, need_dx, need_dw):
    check_rms_norm(x, weight, 0.0)
    _check_op("fused_rms_norm_bwd", x=x, weight=weight)
    _tensors("fused_rms_norm_bwd", x=x, dy=dy, rstd=rstd)
    if dy.shape != x.shape or rstd.shape != x.shape[:-1]:
        _fail("fused_rms_norm_bwd", f"dy must be {tuple(x.shape)} and rstd {tuple(x.shape[:-1])}; got "
                                    f"{tuple(dy.shape)}, {tuple(rstd.shape)}")
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            x.new_empty(x.shape[-1:]) if need_dw else x.new_empty(0))


def _rms_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])  # not y


def _rms_backward(ctx, dy, drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if dy is None or not (need_dx or need_dw):
        return None, None, None
    dx, dw = _rms_bwd(dy, x, weight, rstd, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None


_rms_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


@torch.library.custom_op("ltuning::fused_swiglu_fwd", mutates_args=(), device_types="cpu")
def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return _ext().swiglu_fwd(gate, up)


@_swiglu_fwd.register_fake
def _(gate, up):
    check_swiglu(gate, up)
    _check_op("fused_swiglu_fwd", gate=gate, up=up)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("ltuning::fused_swiglu_bwd", mutates_args=(), device_types="cpu")
def _swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor, need_dg: bool, need_du: bool) -> tuple[Tensor, Tensor]:
    dg, du = _ext().swiglu_bwd(dout, gate, up, need_dg, need_du)
    return dg, du


@_swiglu_bwd.register_fake
def _(dout, gate, up, need_dg, need_du):
    check_swiglu(gate, up)
    _check_op("fused_swiglu_bwd", gate=gate, up=up)
    _tensors("fused_swiglu_bwd", gate=gate, dout=dout)
    if dout.shape != gate.shape:
        _fail("fused_swiglu_bwd", f"dout must have gate's shape {tuple(gate.shape)}; got {tuple(dout.shape)}")
    return (gate.new_empty(gate.shape) if need_dg else gate.new_empty(0),
            gate.new_empty(gate.shape) if need_du else gate.new_empty(0))


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    need_dg, need_du = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if dout is None or not (need_dg or need_du):
        return None, None
    dg, du = _swiglu_bwd(dout, gate, up, need_dg, need_du)
    return (dg if need_dg else None), (du if need_du else None)


_swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("ltuning::fused_rotary", mutates_args=(), device_types="cpu")
def _rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
    qo, ko = _ext().rope(q, k, cos, sin, backward)
    return qo, ko


@_rope.register_fake
def _(q, k, cos, sin, backward):
    check_rotary(q, k, cos, sin)
    _check_op("fused_rotary", q=q, k=k, cos=cos, sin=sin)
    return torch.empty_like(q), torch.empty_like(k)


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward_ = backward


def _rope_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    if dq is None and dk is None:
        return None, None, None, None, None
    # the wrapper only calls the op with last-dim contiguous q, k, so grads keep those layouts
    dq = torch.zeros(ctx.q_shape, dtype=cos.dtype) if dq is None else dq
    dk = torch.zeros(ctx.k_shape, dtype=cos.dtype) if dk is None else dk
    dq, dk = (t if t.stride(-1) == 1 else t.contiguous() for t in (dq, dk))
    gq, gk = _rope(dq, dk, cos, sin, not ctx.backward_)
    return gq, gk, None, None, None


def _rope_setup_shapes(ctx, inputs, output):
    _rope_setup(ctx, inputs, output)
    ctx.q_shape, ctx.k_shape = inputs[0].shape, inputs[1].shape


_rope.register_autograd(_rope_backward, setup_context=_rope_setup_shapes)


# ------------------------------------------------------------------------------------------------------------
# Public functions

def _native(*ts: Tensor) -> bool:
    d = ts[0].dtype
    return d in NATIVE_DTYPES and all(t.device.type == "cpu" and t.dtype == d for t in ts) and is_available()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps))`` over the last dim; x and weight of one dtype.

    Malformed arguments raise :class:`~ltuning.kernels.validation.KernelInputError` (:func:`check_rms_norm`);
    well-formed ones the kernel does not take (other dtypes or devices, mixed dtypes) run the reference."""
    check_rms_norm(x, weight, eps)
    if not _native(x, weight):
        return rms_norm_reference(x, weight, eps)
    return _rms_fwd(x, weight, float(eps))[0]


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` for gate and up of one shape and dtype (else the reference runs)."""
    check_swiglu(gate, up)
    if not _native(gate, up):
        return swiglu_reference(gate, up)
    return _swiglu_fwd(gate, up)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``apply_rotary_pos_emb(q, k, cos, sin)`` of transformers' Llama (unsqueeze_dim=1); cos/sin get no gradient
    from the kernel, so they must not require one (the reference runs then)."""
    check_rotary(q, k, cos, sin)
    ok = _native(q, k, cos, sin) and not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
    if not ok:
        return rotary_reference(q, k, cos, sin)
    q_, k_ = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    return _rope(q_, k_, cos, sin, False)
